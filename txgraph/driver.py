"""
The graph driver: Docker's GraphDriver semantics expressed as inputs to
the per-layer machines of L{txgraph.layers}.

This layer knows what Create, Get, Put, Remove, ApplyDiff, Diff... mean to
dockerd (which IDs are valid, what Init's options are, that Remove of an
unknown layer succeeds), and nothing of HTTP.  dockerd calls Init only once
per daemon life, so Init's arguments are persisted: a restarted txgraph
under a running dockerd reloads them from the store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from txgraph import faults, metrics
from txgraph.backends import Backend, LayerInfo, parse_options, set_traverse
from txgraph.backends.threaded import AsyncBackend
from txgraph.errors import BadRequest, ConfigurationError, InvalidLayerState
from txgraph.layers.registry import LayerRegistry
from txgraph.model import Change, IDMap
from txgraph.store import Store, states_in

log = Logger()

#: The longest layer ID, in UTF-8 bytes: a file name's limit (NAME_MAX).
MAX_ID_BYTES = 255

#: Characters no layer ID may hold, and why.
REFUSED_ID_CHARACTERS = {
    "/": "a path separator",
    "@": "RBD's snapshot separator",
    "%": "dockerd writes IDs unescaped into ApplyDiff's query string",
    "&": "dockerd writes IDs unescaped into ApplyDiff's query string",
    "+": "dockerd writes IDs unescaped into ApplyDiff's query string",
    "#": "dockerd writes IDs unescaped into ApplyDiff's query string",
}

#: IDs made only of printable ASCII that is not refused (what dockerd,
#: BuildKit and containerd send): valid at once, without
#: L{id_problem}'s walk through each character (0.3 against 8 us for a
#: 64-character ID, on the reactor, for every call that names a layer).
_PLAIN_ID = re.compile(
    "[" + "".join(re.escape(chr(c)) for c in range(0x21, 0x7F) if chr(c) not in REFUSED_ID_CHARACTERS)
    + "]{1,%d}" % MAX_ID_BYTES
)

#: What a valid layer ID is, for error messages.
ID_RULE = (
    "a layer ID is any name of at most 255 bytes that is safe as one file name: "
    "not empty, . or .., and without /, @, %, &, +, #, whitespace or control characters"
)

#: Where the host's boot id is; a different one means the host rebooted.
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def id_problem(value: str) -> str | None:
    """
    Why C{value} cannot be a layer ID, or None if it can.  dockerd makes
    64 hex digits (C{-init} for a container's init layer), BuildKit 25
    characters of base 36, moby's own driver tests names such as C{Base};
    anything safe as one path component is taken, since every backend
    stores layers under keys of their own (L{txgraph.backends.layer_key}).
    What is refused would break a path, an RBD image spec, dockerd's
    ApplyDiff query, or a log line.
    """
    if _PLAIN_ID.fullmatch(value) is not None and value not in (".", ".."):
        return None
    if value in (".", ".."):
        return f"{value} names a directory, not a file"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_ID_BYTES:
        return f"it is {size} bytes long, more than a file name may be ({MAX_ID_BYTES})"
    for char in value:
        why = REFUSED_ID_CHARACTERS.get(char)
        if why is not None:
            return f"it holds {char!r}, {why}"
        if char.isspace():
            return f"it holds whitespace ({char!r}), which dockerd's ApplyDiff query cannot carry"
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            # Control characters, and the invisible ones (bidi overrides)
            # that would make a log line lie.
            return f"it holds a control or formatting character ({char!r})"
    return None


def check_id(value: Any, field: str = "ID") -> str:
    """
    Return C{value} if it is a valid layer ID, else raise L{BadRequest}
    naming the field, the ID and what is wrong with it.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest(f"missing {field}: a layer ID is required")
    problem = id_problem(value)
    if problem is not None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise BadRequest(f"invalid {field} {shown!r}: {problem}; {ID_RULE}")
    return value


def parse_storage_opts(
    opts: list[str], backend: type[Backend]
) -> dict[str, str]:
    """
    Turn dockerd's C{--storage-opt} list into this backend's option values.
    Keys are C{txgraph.<backend>.<key>}; C{txgraph.backend} may restate
    the running backend.  Anything else is a L{ConfigurationError} naming
    the key.
    """
    values: dict[str, str] = {}
    for item in opts:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigurationError(
                f"invalid storage option {item!r}: expected key=value"
            )
        key, value = item.split("=", 1)
        key = key.strip().lower()
        if key == "txgraph.backend":
            if value != backend.name:
                raise ConfigurationError(
                    f"storage option txgraph.backend={value} does not match the "
                    f"running backend {backend.name}: start txgraph with "
                    f"--backend {value}"
                )
            continue
        prefix = f"txgraph.{backend.name}."
        if key.startswith(prefix):
            values[key[len(prefix) :]] = value
            continue
        raise ConfigurationError(
            f"unknown storage option {key!r}: txgraph accepts "
            f"txgraph.{backend.name}.* options for its {backend.name} backend"
        )
    return values


#: glibc's mallopt parameter for the most malloc arenas (malloc.h).
M_ARENA_MAX = -8

#: How many malloc arenas txgraph's threads share.  glibc gives each new
#: thread an arena of its own, up to 8 per core, and an arena keeps what it
#: once held: with 16 backend threads taking turns at extracting and
#: exporting layers, the daemon's RSS grew by some 8 MB per benchmark pass.
#: The GIL already serialises nearly every allocation, so sharing costs
#: nothing measurable.
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """
    Cap glibc's malloc arenas for the threads created from now on, unless
    C{MALLOC_ARENA_MAX} in the environment already says how many (the
    operator's choice wins).  Returns whether the cap was set (not on a
    libc without C{mallopt}).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))


def read_boot_id() -> str:
    """
    The host's boot id.
    """
    with open(BOOT_ID) as f:
        return f.read().strip()


@dataclass
class InitArgs:
    """
    What dockerd sent in Init, as persisted.
    """

    home: str
    opts: list[str]
    uid_maps: list[dict[str, int]] | None
    gid_maps: list[dict[str, int]] | None

    def to_json(self) -> dict[str, Any]:
        """
        A JSON-able form for the store.
        """
        return self.__dict__.copy()


class Driver:
    """
    The graph driver.

    @ivar ready: fires once state is restored and recovered; requests wait
        on it.
    """

    def __init__(
        self,
        reactor: Any,
        store: Store,
        backend: Backend,
        pool: ThreadPool,
        cli_options: dict[str, str],
        state_dir: str,
    ) -> None:
        # Before the backend pool starts its threads (it starts them on
        # demand, so none runs yet).
        limit_malloc_arenas()
        self._reactor = reactor
        self.store = store
        self.state_dir = state_dir
        self._pool = pool
        self._cli_options = cli_options
        self.backend = AsyncBackend(backend, reactor, pool)
        self.registry = LayerRegistry(store, self.backend, reactor)
        self.init_args: InitArgs | None = None
        self.ready: Deferred[None] = Deferred()
        self.started_at = time.time()
        self.recovered: dict[str, int] = {}
        self.max_lag = 0.0

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        """
        Reload Init's arguments and every layer from the store, recover what
        a crash left in flight, then declare the driver ready.
        """
        config = await self.store.get_config()
        init = config.get("init")
        if init is not None:
            self.init_args = InitArgs(**init)
            self.registry.id_map = IDMap.from_docker(
                self.init_args.uid_maps, self.init_args.gid_maps
            )
        await self._grant_traverse()
        boot_id = await self.backend.run(read_boot_id)
        rebooted = config.get("boot_id") not in (None, boot_id)
        rows = await self.store.load_layers()
        self.recovered = await self.registry.restore(rows, rebooted)
        await self.store.set_config({"boot_id": boot_id})
        log.info(
            "txgraph ready: {count} layers on the {backend} backend"
            "{reboot}; recovered {recovered}",
            count=len(rows),
            backend=self.backend.name,
            reboot=" after a host reboot" if rebooted else "",
            recovered=self.recovered or "nothing",
        )
        self.ready.callback(None)

    async def _grant_traverse(self) -> None:
        """
        Under userns-remap, let the containers' root search the way from the
        state directory to the layer roots; otherwise keep it root's only.
        """
        gid = None if self.registry.id_map.identity else self.registry.id_map.to_host(0, 0)[1]

        def grant() -> None:
            set_traverse(self.state_dir, gid)
            self.backend.sync.allow_traverse(gid)

        await self.backend.run(grant)

    # -- the protocol ----------------------------------------------------------

    async def init(
        self,
        home: str,
        opts: list[str],
        uid_maps: list[dict[str, int]] | None,
        gid_maps: list[dict[str, int]] | None,
    ) -> None:
        """
        Init: validate dockerd's storage options and ID maps and persist
        them.  Options may change only while there are no layers.
        """
        cls = type(self.backend.sync)
        values = parse_storage_opts(opts, cls)
        merged = {**self._cli_options, **values}
        effective = parse_options(cls, merged)
        id_map = IDMap.from_docker(uid_maps, gid_maps)
        if id_map != self.registry.id_map and self.registry.rows():
            # The existing layers' files carry host ids shifted by the old
            # maps: under new ones they would show the wrong owners, and
            # their Diffs would fail or carry wrong ids.
            raise ConfigurationError(
                "cannot change UIDMaps/GIDMaps (userns-remap) while layers exist: "
                "their files are owned by the host ids of the previous maps; give "
                "this dockerd its own txgraph (--state-dir and socket), or remove "
                "every image and container first"
            )
        if effective != self.backend.sync.config:
            if self.registry.rows():
                changed = sorted(
                    k
                    for k in effective
                    if effective[k] != self.backend.sync.config.get(k)
                )
                raise ConfigurationError(
                    "cannot change option(s) "
                    + ", ".join(f"txgraph.{cls.name}.{k}" for k in changed)
                    + " while layers exist"
                )
            replacement = cls(self.state_dir, effective)
            await self.backend.run(replacement.start)
            old = self.backend.sync
            self.backend.sync = replacement
            await self.backend.run(old.stop)
        self.registry.id_map = id_map
        await self._grant_traverse()
        self.init_args = InitArgs(home, list(opts), uid_maps, gid_maps)
        await self.store.set_config({"init": self.init_args.to_json()})

    async def create(
        self,
        layer_id: str,
        parent: str | None,
        readwrite: bool,
        storage_opt: dict[str, str],
    ) -> None:
        """
        Create or CreateReadWrite.  An image layer (Create) is committed
        after its ApplyDiff or when a layer is made on it, a container's
        C{-init} layer when the container's layer is made on it: the
        backend is told to expect the commit.  A read-write layer is a
        container's (its own or its C{-init}), as the backend is told too.
        """
        await self.registry.create(
            layer_id, parent, readwrite, storage_opt,
            commit_expected=not readwrite or layer_id.endswith("-init"),
            container=readwrite,
        )
        faults.point("create.committed")

    async def remove(self, layer_id: str) -> None:
        """
        Remove (a layer that does not exist is already removed).
        """
        await self.registry.remove(layer_id)

    async def get(self, layer_id: str) -> str:
        """
        Get: the layer's directory, mounted, with a reference taken.
        """
        path = await self.registry.get(layer_id)
        faults.point("get.committed")
        return path

    async def put(self, layer_id: str) -> None:
        """
        Put: drop a reference taken by Get.
        """
        await self.registry.put(layer_id)
        faults.point("put.committed")

    def exists(self, layer_id: str) -> bool:
        """
        Exists.
        """
        return layer_id in self.registry

    async def apply_diff(
        self, layer_id: str, parent: str | None, stream: BinaryIO
    ) -> int:
        """
        ApplyDiff: the layer's content becomes the tar; return its size.
        """
        layer = self.registry.lookup(layer_id)
        if parent != layer.row.parent:
            raise BadRequest(
                f"ApplyDiff parent {parent or '(none)'} is not the parent of layer "
                f"{layer_id} ({layer.row.parent or 'none'})"
            )
        return await self.registry.apply(layer_id, stream)

    async def check_read(self, layer_id: str, parent: str | None) -> None:
        """
        Raise now, before a Diff starts streaming, if it cannot be served.
        """
        for which in (layer_id, parent):
            if which is None:
                continue
            layer = self.registry.lookup(which)
            if layer.row.state == "faulty":
                raise InvalidLayerState(
                    f"layer {which} is faulty ({layer.row.error}); remove it, or run "
                    "txgraph-admin gc"
                )

    async def diff(self, layer_id: str, parent: str | None, out: BinaryIO) -> None:
        """
        Diff: write the layer tar to C{out} (from a backend thread).
        """
        backend = self.backend

        def read(layer: LayerInfo, chain: list[LayerInfo], p: str | None) -> Deferred[None]:
            return backend.diff(layer, chain, p, out, self.registry.id_map)

        await self.registry.read(layer_id, parent, read)

    async def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        """
        Changes.
        """
        return await self.registry.read(layer_id, parent, self.backend.changes)

    async def diff_size(self, layer_id: str, parent: str | None) -> int:
        """
        DiffSize.
        """
        return await self.registry.read(layer_id, parent, self.backend.diff_size)

    async def metadata(self, layer_id: str) -> dict[str, str]:
        """
        GetMetadata.
        """
        info = self.registry.info(layer_id)
        return await self.backend.metadata(info, self.registry.chain(layer_id))

    async def status(
        self, cluster_reads: dict[str, dict[str, Any]] | None = None
    ) -> list[tuple[str, str]]:
        """
        Status, for C{docker info}: with what each mounted layer read from
        a remote store (C{cluster_reads}, asked of the backend if not given).
        """
        rows = self.registry.rows()
        counts = states_in(rows)
        lines = [
            ("Backend", self.backend.name),
            ("State Dir", self.state_dir),
            ("Layers", str(len(rows))),
            (
                "Layers By State",
                " ".join(f"{s}={n}" for s, n in sorted(counts.items())) or "none",
            ),
            ("Mounts", str(counts.get("mounted", 0))),
            ("References", str(sum(r.refcount for r in rows))),
            ("Faulty Layers", str(counts.get("faulty", 0))),
        ]
        lines.extend(await self.backend.status())
        if cluster_reads is None:
            cluster_reads = await self.backend.cluster_reads()
        for layer_id, reads in cluster_reads.items():
            lines.append(
                (
                    f"Lazy Reads {layer_id[:12]}",
                    f"{reads['bytes_read']} bytes read from the cluster in {reads['reads']} "
                    f"reads (image of {reads['image_size']} bytes)",
                )
            )
        lines.append(("Reactor Max Lag", f"{self.max_lag * 1000:.1f} ms"))
        return lines

    async def cleanup(self) -> None:
        """
        Cleanup (dockerd is shutting down): unmap the devices kept after a
        last Put; every mount is reference-counted and persisted, so the
        held ones stay; say which.
        """
        await self.registry.release_all()
        held = [r.id for r in self.registry.rows() if r.refcount]
        if held:
            log.info(
                "dockerd shut down with {n} layer(s) still mounted: {ids}",
                n=len(held),
                ids=", ".join(i[:12] for i in held),
            )

    def capabilities(self) -> dict[str, bool]:
        """
        Capabilities: txgraph's diffs are not byte-for-byte reproducible,
        so dockerd rebuilds exported layers from its tar-split data.
        """
        return {"ReproducesExactDiffs": False}


def watch_reactor_lag(
    driver: Driver, clock: IReactorTime, interval: float = 0.1
) -> Callable[[], None]:
    """
    Measure how late the reactor runs a timer, and keep the worst in
    C{driver.max_lag}: the proof that nothing blocks the reactor thread.
    Returns a function that stops the watch.
    """

    class Watch:
        expected = clock.seconds() + interval
        running = True
        call: IDelayedCall | None = None

    def tick() -> None:
        now = clock.seconds()
        lag = now - Watch.expected
        if lag > driver.max_lag:
            driver.max_lag = lag
        if metrics.current is not None:
            metrics.current.reactor_lag.observe(max(lag, 0.0))
        if Watch.running:
            Watch.expected = now + interval
            Watch.call = clock.callLater(interval, tick)

    Watch.call = clock.callLater(interval, tick)

    def stop() -> None:
        Watch.running = False
        if Watch.call is not None and Watch.call.active():
            Watch.call.cancel()

    return stop

