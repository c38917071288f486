"""
Storage backends: where layers physically live.

A backend is a synchronous, snapshotter-shaped object (L{Backend}): prepare
a layer's storage, commit it so children can be made from it, map it to a
block device (block backends only), mount it, unmount, unmap, remove; and
apply or produce layer tars through the shared L{txgraph.archive} code.
Every method blocks, so nothing calls a backend directly: the layer
machines go through L{AsyncBackend}, which runs each call in a named thread
pool and returns a Deferred, keeping the reactor thread free
(L{txgraph.backends.threaded}).  Start-up finds a backend by its name in
L{txgraph.backends.catalog}; this module imports no implementation.

The contract every method follows (the conformance suite in
L{txgraph.testing.conformance} checks it on every backend):

 - Calls may be retried after a crash, so each recognises and finishes or
   replaces what a half-done earlier call left (C{prepare} over leftovers,
   C{remove}/C{unmount}/C{unmap} of what is already gone succeed).
 - A failed call cleans up what it made, or raises and leaves the layer in
   a state that C{remove} can clean up.
 - Errors are L{txgraph.errors.TxgraphError}s whose message says which
   operation failed on which layer, and why.

Three use cases, as the layer machines drive them::

  import an image layer:   prepare(L) -> apply(L, tar) -> commit(L)
  run a container:         prepare(C-init, parent=L) -> map/mount(C-init) ...
                           commit(C-init) -> prepare(C, parent=C-init)
                           -> map(C) -> mount(C) -> unmount(C) -> unmap(C)
  remove:                  remove(C) -> remove(C-init) -> remove(L)

containerd's snapshotter (L{txgraph.snapshotter}) drives the same calls,
and asks for C{mount_specs}: containerd mounts a snapshot itself, so the
backend describes the mounts instead of making them (unless it declares
C{holds_client_mounts}: then the specs are of its own mount of the layer,
which the snapshotter holds, with a Get, while the snapshot exists).
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, Protocol

from txgraph.errors import BadRequest, ConfigurationError
from txgraph.model import Change, IDMap


@dataclass(frozen=True)
class LayerInfo:
    """
    What a backend is told about a layer.

    @ivar mapping: what C{map} returned for it, while it is mapped.
    @ivar storage_opt: CreateReadWrite's StorageOpt (e.g. C{size}).
    @ivar root_ids: the host uid and gid of the container's root
        (userns-remap), to own the layer's root directory.
    @ivar committed: whether the layer is immutable (it has been through
        ApplyDiff, or a child was made from it).  C{mount} then mounts it
        read-only: an image layer is never written through a Get, and its
        directory is never an overlay upper directory.
    @ivar commit_expected: a hint from the front end that the layer will
        likely be committed (an image layer, a container's C{-init} layer,
        containerd's unpack snapshot), so a backend may prepare for the
        commit ahead of it (rbd opens the image: L{txgraph.backends.rbd.handles}).
        Not persisted: after a restart it is False.
    @ivar container: a hint from the front end that the layer is a
        container's (dockerd's C{CreateReadWrite}: a container's layer and
        its C{-init} layer; containerd's active snapshots but its
        unpacker's), which a backend may keep on local storage
        (rbd's C{container_layers=local}).  Only read when the layer is
        made; not persisted.
    """

    id: str
    parent: str | None
    readwrite: bool = False
    mapping: dict[str, Any] | None = None
    storage_opt: dict[str, str] = field(default_factory=dict)
    root_ids: tuple[int, int] = (0, 0)
    committed: bool = False
    commit_expected: bool = False
    container: bool = False


@dataclass(frozen=True)
class MountSpec:
    """
    A mount for a client to make (containerd's C{types.Mount}): C{mount -t
    <type> -o <options> <source> <target>}.
    """

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerView:
    """
    What gc tells a backend about a layer it has a row for.
    """

    id: str
    state: str
    mountpoint: str | None
    mapping: dict[str, Any] | None


@dataclass(frozen=True)
class Orphan:
    """
    Something a backend holds that no layer accounts for.

    @ivar kind: C{mount}, C{device}, C{object} or C{shared} (see L{txgraph.gc}).
    @ivar id: what identifies it: a mount point, a device, a layer ID.
    """

    kind: str
    id: str
    detail: str


@dataclass(frozen=True)
class BackendOption:
    """
    One option of a backend: C{--<backend>-<key>} on the command line and
    C{txgraph.<backend>.<key>=value} in dockerd's C{--storage-opt}.

    @ivar parse: turns the string into the value (raises ValueError with a
        message on bad input).
    """

    key: str
    help: str
    default: str | None = None
    parse: Callable[[str], Any] = str


#: Layer IDs that name their own storage as they are: every ID dockerd and
#: BuildKit make (64 hex digits, C{-init}, 25 characters of base 36).
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")

#: The start of a hashed storage key (see L{layer_key}).
HASHED_KEY = "x."

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def layer_key(layer_id: str, reserved: frozenset[str] = frozenset()) -> str:
    """
    The name a layer's storage goes by: its directory, RBD image name,
    mapping tag, mount point.  A plain ID (letters, digits, C{_} and C{-},
    at most 80, starting with a letter or digit) is its own key, unless
    the backend reserves that name; any other ID (one with C{.}, C{:},
    C{,}, spaces, non-ASCII letters, or long) is keyed C{x.} and the
    SHA-256 of its UTF-8 bytes.  A plain key never holds a C{.}, so the
    two kinds never meet, and every key is at most 80 characters of
    C{[A-Za-z0-9_.-]}: safe in a path, in overlayfs's C{lowerdir} (which
    splits on C{:} and C{,}), in an RBD image name and in the file name
    rbd-fuse gives an image, whatever the ID holds.
    """
    if _PLAIN_ID.fullmatch(layer_id) and layer_id not in reserved:
        return layer_id
    return HASHED_KEY + hashlib.sha256(layer_id.encode("utf-8")).hexdigest()


def is_plain_key(name: str) -> bool:
    """
    Whether C{name} is a plain layer ID used as its own key (so the name
    is the ID).
    """
    return _PLAIN_ID.fullmatch(name) is not None


def parse_size(value: str) -> int:
    """
    A size in bytes from C{"10G"}, C{"512M"}, C{"1.5GiB"} or plain bytes
    (binary units, as dockerd's C{size} storage option).
    """
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(
            "not a size (give bytes, or a number with K, M, G or T, e.g. 10G)"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("a size must be more than 0")
    return size


def storage_size(layer: LayerInfo, backend: str, supported: str) -> int | None:
    """
    The C{size} storage option of a Create in bytes, or None without one.
    Any other option, or a size that is not one, is a
    L{ConfigurationError} naming it (C{supported} says what is).
    """
    unknown = sorted(k for k in layer.storage_opt if k != "size")
    if unknown:
        raise ConfigurationError(
            f"storage option(s) {', '.join(unknown)} are not supported by the {backend} "
            f"backend (supported: {supported})"
        )
    raw = layer.storage_opt.get("size")
    if raw is None:
        return None
    try:
        return parse_size(raw)
    except ValueError as e:
        raise ConfigurationError(f"invalid storage option size={raw!r}: {e}") from None


def set_traverse(path: str, gid: int | None) -> None:
    """
    Make a directory on the way to layer roots searchable by the container's
    root under userns-remap (mode 0710, group C{gid}, as moby does for
    C{<data-root>/<uid>.<gid>}), or private to root again (0700, C{gid} None).
    """
    os.chown(path, 0, gid if gid is not None else 0)
    os.chmod(path, 0o710 if gid is not None else 0o700)


def parse_options(
    backend: type[Backend], values: dict[str, str]
) -> dict[str, Any]:
    """
    Validate and convert a backend's options (defaults filled in).  An
    unknown key or an invalid value is a L{ConfigurationError} naming it.
    """
    known = {o.key: o for o in backend.options}
    result: dict[str, Any] = {}
    for key in values:
        if key not in known:
            raise ConfigurationError(
                f"unknown option txgraph.{backend.name}.{key} for the "
                f"{backend.name} backend (known: "
                f"{', '.join(sorted(known)) or 'none'})"
            )
    for option in backend.options:
        raw = values.get(option.key, option.default)
        if raw is None:
            result[option.key] = None
            continue
        try:
            result[option.key] = option.parse(raw)
        except ValueError as e:
            raise ConfigurationError(
                f"invalid value {raw!r} for txgraph.{backend.name}.{option.key}: {e}"
            ) from None
    return result


class BackendContract(Protocol):
    """
    The backend contract as a type: what the layers above call on a
    backend, and what each backend declares.  A C{typing.Protocol} (not a
    C{zope.interface} Interface): mypy checks every backend against it
    statically (L{txgraph.backends.catalog}, L{txgraph.testing.fake}), and
    the conformance suite checks each backend object against it at run
    time, member by member and signature by signature
    (L{txgraph.testing.conformance.check_contract}), with no dependency
    beyond the standard library.  L{Backend} is the base class that gives
    the shared default behaviour; the meaning of each call is documented
    there.
    """

    @property
    def name(self) -> str:
        """The backend's name (C{--backend NAME})."""

    @property
    def maps(self) -> bool:
        """Whether layers are mapped to block devices before mounting."""

    @property
    def commits(self) -> bool:
        """Whether C{commit} does anything."""

    @property
    def prepare_is_atomic(self) -> bool:
        """Whether C{prepare} shows a layer whole or not at all (see L{Backend})."""

    @property
    def shares_layers(self) -> bool:
        """Whether the backend keeps shared layers and serves thin images."""

    @property
    def holds_client_mounts(self) -> bool:
        """Whether C{mount_specs} describes the backend's own mount of the layer."""

    unmap_delay: float
    state_dir: str
    config: dict[str, Any]

    def maps_layer(self, layer_id: str) -> bool:
        """Whether this layer is mapped before mounting (C{maps}, per layer)."""

    def commits_layer(self, layer_id: str) -> bool:
        """Whether C{commit} does anything for this layer (C{commits}, per layer)."""

    def prepares_atomically(self, layer: LayerInfo) -> bool:
        """Whether C{prepare} of this new layer is atomic (C{prepare_is_atomic}, per layer)."""

    def start(self) -> None:
        """Check the environment and connect."""

    def traverse_paths(self) -> list[str]:
        """The backend's directories on the way to layer roots."""

    def allow_traverse(self, gid: int | None) -> None:
        """Let the containers' root search the way to layer roots."""

    def stop(self) -> None:
        """Release connections."""

    def status(self) -> list[tuple[str, str]]:
        """Lines for C{docker info}."""

    def prepare(self, layer: LayerInfo) -> dict[str, Any] | None:
        """Make the storage of a new, empty layer."""

    def commit(self, layer: LayerInfo) -> None:
        """Make the layer a possible parent."""

    def remove(self, layer: LayerInfo) -> None:
        """Remove the layer's storage, whatever state it is in."""

    def reset(self, layer: LayerInfo) -> None:
        """Make the layer empty (equal to its parent) again."""

    def exists(self, layer: LayerInfo) -> bool:
        """Whether the layer's storage exists."""

    def map(self, layer: LayerInfo) -> dict[str, Any] | None:
        """Attach the layer's block device (mapping backends)."""

    def unmap(self, layer: LayerInfo) -> None:
        """Detach the layer's block device."""

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """Mount the layer; return its root."""

    def unmount(self, layer: LayerInfo) -> None:
        """Unmount the layer."""

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """Mount the layer again if its mount is gone; return its root."""

    def list_layers(self) -> list[str]:
        """The layers the backend holds."""

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """The backend's leftovers that no layer holds."""

    def shared_orphans(self, min_age: float) -> list[Orphan]:
        """Shared layers that nothing uses."""

    def cluster_reads(self, sizes: bool = True) -> dict[str, dict[str, Any]]:
        """Per mounted layer, what its storage read from a remote store."""

    def repair(self, orphan: Orphan) -> None:
        """Undo one leftover that C{orphans} found."""

    def apply(self, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> int:
        """Replace the layer's content with a layer tar; return its size."""

    def apply_thin(self, layer: LayerInfo, descriptor: bytes, id_map: IDMap) -> int:
        """Make the layer the thin image layer a descriptor names; return its size."""

    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: BinaryIO,
        id_map: IDMap,
    ) -> None:
        """Write the layer tar of the changes between C{parent} and the layer."""

    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> list[Change]:
        """The changes between C{parent} and the layer."""

    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> int:
        """The size of the changes between C{parent} and the layer."""

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """GetMetadata's answer."""

    def shared_info(self) -> dict[str, str]:
        """Where this node's shared layers live."""

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Store a layer tar file as the shared layer of its chain."""

    def shared_chain_parent(self, chain: str) -> str | None:
        """The chain the pool's shared layer of C{chain} was made on, if held."""

    def adopt_shared(self, layer: LayerInfo, chain: str) -> int:
        """Make a new layer a clone of the pool's shared layer of C{chain}."""

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        """Publish a layer a client filled as the shared layer of its chain."""

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """The mounts a client (containerd) makes to see the layer."""

    def cleanup(self) -> None:
        """Release what removals left for later."""

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """The layer's own bytes and inodes."""


class Backend(abc.ABC):
    """
    A synchronous layer store, and the default behaviour backends share
    (no-op start and stop, traversal grants, no orphans, no shared
    layers).  See the module docstring for the contract, and
    L{BackendContract} for it as a type.

    @cvar name: the backend's name (C{--backend NAME}).
    @cvar options: the options it accepts.
    @cvar maps: whether layers are mapped to block devices before mounting
        (the layer machine skips the map/unmap steps otherwise).
    @cvar commits: whether C{commit} does anything (the machine skips the
        write-ahead record otherwise).
    @cvar prepare_is_atomic: whether C{prepare} makes the layer out of
        sight and shows it whole in one step, leaving a half-made one only
        where L{start} deletes it, and whether L{orphans} lists storage that
        has no layer row.  Then a power cut that loses an unsynced
        C{creating} record leaves nothing that start and gc do not clean,
        and the layer machine commits C{creating} without an fsync (the
        durable commit of its outcome, before dockerd's answer, covers it).
    @cvar shares_layers: whether the backend keeps shared layers that
        several nodes use, and so serves thin images (L{shared_info},
        L{publish_layer}).
    @cvar holds_client_mounts: whether L{mount_specs} describes the
        backend's own mount of the layer (a bind of it), so that the layer
        must stay mounted while a client (containerd) may use the specs;
        otherwise the specs stand alone (overlay: directories).
    @ivar unmap_delay: seconds a mapping backend keeps a layer's device
        after its last Put, so that the next Get only mounts (0: it unmaps
        at once).  The layer registry times it and unmaps through the
        layer's machine.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[BackendOption, ...]] = ()
    maps: ClassVar[bool] = False
    commits: ClassVar[bool] = False
    prepare_is_atomic: ClassVar[bool] = False
    shares_layers: ClassVar[bool] = False
    holds_client_mounts: ClassVar[bool] = False
    unmap_delay: float = 0.0

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.config = options

    #: The host gid of the containers' root under userns-remap, or None.
    traverse_gid: int | None = None

    def start(self) -> None:
        """
        Check the environment and connect; raise a clear error if the
        backend cannot work here.
        """

    def traverse_paths(self) -> list[str]:
        """
        The backend's directories on the way from the state directory to
        layer roots (see L{allow_traverse}).
        """
        return []

    def allow_traverse(self, gid: int | None) -> None:
        """
        Under userns-remap, runc reaches a layer's root as the containers'
        root (host gid C{gid}): let it search the directories on the way.
        """
        self.traverse_gid = gid
        for path in self.traverse_paths():
            set_traverse(path, gid)

    def stop(self) -> None:
        """
        Release connections.
        """

    @abc.abstractmethod
    def status(self) -> list[tuple[str, str]]:
        """
        Lines for C{docker info}.
        """

    # -- what it declares of one layer ----------------------------------------
    # A backend that keeps some layers one way and some another (rbd's
    # local container layers) says so per layer; these run on the reactor,
    # so they look at memory only.

    def maps_layer(self, layer_id: str) -> bool:
        """
        Whether the layer is mapped before it is mounted (L{maps}).
        """
        return self.maps

    def commits_layer(self, layer_id: str) -> bool:
        """
        Whether C{commit} has work to do for the layer (L{commits}).
        """
        return self.commits

    def prepares_atomically(self, layer: LayerInfo) -> bool:
        """
        Whether C{prepare} of this new layer shows it whole or not at all,
        and gc finds its storage without a row (L{prepare_is_atomic}).
        """
        return self.prepare_is_atomic

    # -- life cycle ------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, layer: LayerInfo) -> dict[str, Any] | None:
        """
        Make the storage of a new, empty layer (a child of C{layer.parent},
        which is committed).  Leftovers of an earlier attempt are replaced.
        A backend that keeps devices (C{unmap_delay}) may map a read-write
        layer too, since dockerd gets it next: it returns the mapping,
        which the machine records (the layer rests mapped); else None.
        """

    @abc.abstractmethod
    def commit(self, layer: LayerInfo) -> None:
        """
        Make the layer immutable and ready to be a parent.  Idempotent.
        """

    @abc.abstractmethod
    def remove(self, layer: LayerInfo) -> None:
        """
        Delete everything of the layer: mounts, mappings, storage.
        Idempotent: removing what is gone succeeds.
        """

    @abc.abstractmethod
    def reset(self, layer: LayerInfo) -> None:
        """
        Empty the layer again (after an interrupted apply).
        """

    @abc.abstractmethod
    def exists(self, layer: LayerInfo) -> bool:
        """
        Whether the layer's storage exists.
        """

    def map(self, layer: LayerInfo) -> dict[str, Any] | None:
        """
        Attach the layer's block device; return what to persist about it.
        """
        return None

    def unmap(self, layer: LayerInfo) -> None:
        """
        Detach the layer's block device.  Idempotent.
        """

    @abc.abstractmethod
    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer (over its ancestors C{chain}, nearest first) and
        return the directory dockerd will use: read-write while the layer
        is not committed, read-only once it is (C{layer.committed}).
        """

    @abc.abstractmethod
    def unmount(self, layer: LayerInfo) -> None:
        """
        Unmount the layer.  Idempotent.
        """

    @abc.abstractmethod
    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        After a restart: the layer is recorded as mounted; mount it again
        if the mount is gone, and return its directory.
        """

    @abc.abstractmethod
    def list_layers(self) -> list[str]:
        """
        The IDs of every layer this backend holds storage for (for gc).
        """

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        Mounts, mapped devices and storage objects of this backend (this
        node's only) that none of C{layers} accounts for.  A backend that
        cannot tell finds none.
        """
        return []

    def shared_orphans(self, min_age: float) -> list[Orphan]:
        """
        Storage shared between nodes that no node uses any more and that is
        older than C{min_age} seconds (kind C{shared}).  Backends without
        shared storage find none.
        """
        return []

    def cluster_reads(self, sizes: bool = True) -> dict[str, dict[str, Any]]:
        """
        Per mounted layer, what its storage read from a remote store
        (lazily fetched data); backends that store locally report nothing.
        With C{sizes} false, without the image sizes (no call to the remote
        store: only local counters are read).
        """
        return {}

    def repair(self, orphan: Orphan) -> None:
        """
        Unmount, unmap or delete an orphan that L{orphans} found.
        """
        raise NotImplementedError(f"the {self.name} backend cannot repair {orphan.kind}s")

    # -- mounts for clients (containerd) ----------------------------------

    @abc.abstractmethod
    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """
        The mounts that give a client the layer's tree, as containerd's
        snapshotters return them: read-write over its ancestors C{chain}
        (nearest first) for an active snapshot, read-only for a C{view}
        (the layer is then the view's own, empty and committed, and only
        its ancestors are shown).  Nothing is mounted, except by a backend
        that L{holds_client_mounts} (whose layer is mounted already).
        """

    def cleanup(self) -> None:
        """
        Release what L{remove} left for later (containerd's Cleanup): the
        rbd backend's trash is purged before this returns.  Backends that
        remove everything at once have nothing to do.
        """

    @abc.abstractmethod
    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        (bytes, inodes) the layer's own storage uses, as containerd's
        snapshotters report a snapshot's Usage.
        """

    # -- content ---------------------------------------------------------

    @abc.abstractmethod
    def apply(self, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> int:
        """
        Replace the layer's content with the layer tar read from C{stream}
        and return its size as the backend's moby counterpart answers
        ApplyDiff: the size of the layer's own directory, equal to what
        L{diff_size} reports against its parent (overlay2), or the tar's
        content size, the sum of its entries' sizes (the naive-diff drivers:
        devicemapper, vfs, btrfs, zfs), as each backend documents.
        The tar is an ordinary one: whether it is a thin image's descriptor
        is decided once, above the backends (L{txgraph.backends.threaded}).
        """

    def apply_thin(self, layer: LayerInfo, descriptor: bytes, id_map: IDMap) -> int:
        """
        Make the layer the thin image layer that C{descriptor} (the bytes
        of a thin descriptor, L{txgraph.thin}) names; only backends that
        declare C{shares_layers} are given one.
        """
        raise BadRequest(self._no_shared_layers())

    @abc.abstractmethod
    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: BinaryIO,
        id_map: IDMap,
    ) -> None:
        """
        Write the layer tar of the changes between C{parent} and the layer.
        """

    @abc.abstractmethod
    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> list[Change]:
        """
        The changes between C{parent} and the layer, as moby computes them.
        """

    @abc.abstractmethod
    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> int:
        """
        The size of the changes between C{parent} and the layer.
        """

    @abc.abstractmethod
    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        GetMetadata's answer (shown by C{docker inspect}).
        """

    # -- shared layers (backends that declare C{shares_layers}) -----------

    def shared_info(self) -> dict[str, str]:
        """
        Where this node's shared layers live: what a thin descriptor
        records (C{fsid}, C{pool}, C{namespace}, C{filesystem}).
        """
        raise BadRequest(self._no_shared_layers())

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """
        Store a layer tar (a file) as the shared layer of its chain, on the
        chain C{parent_chain} ("" for the first layer), unless it is there
        already; with no C{path}, only say whether it is.  For
        C{txgraph-admin make-thin}.
        """
        raise BadRequest(self._no_shared_layers())

    # -- containerd's chains in the shared layers (the remote-snapshot shortcut)

    def shared_chain_parent(self, chain: str) -> str | None:
        """
        If the pool holds the shared layer of OCI chain ID C{chain}, the
        chain it was made on ("" for the first layer of an image); None
        when it does not (or when this backend shares nothing).
        """
        return None

    def adopt_shared(self, layer: LayerInfo, chain: str) -> int:
        """
        Make a new, uncommitted layer a clone of the pool's shared layer of
        C{chain}, instead of applying its tar; return its size.  On
        failure the layer is empty again (as after a failed L{apply}).
        """
        raise BadRequest(self._no_shared_layers())

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        """
        Make a committed layer that a client (containerd) filled itself
        findable by other nodes: the shared layer of OCI chain ID
        C{chain_id}, on the shared layer of C{parent_chain} ("" for none).
        Returns whether it was published now (False: the pool had it, or
        this backend shares nothing).
        """
        return False

    def _no_shared_layers(self) -> str:
        return f"thin images need the rbd backend; this txgraph runs the {self.name} backend"
