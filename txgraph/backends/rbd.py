"""
The Ceph RBD backend: every layer an RBD image in a Ceph pool, cloned from
its parent's snapshot, mapped to a local block device and mounted.

Storage model, per node (a Docker host, named by the C{node_id} option)::

  <prefix><node>.base          the node's base image: formatted once with
                               the chosen filesystem (an empty C{rootfs/}
                               0755 root:root), then snapshotted and
                               protected as C{@txgraph}
  <prefix><node>.<key>         a layer (its key: L{layer_key}): a clone of its parent's C{@txgraph}
                               snapshot (or the base's); committing it
                               snapshots and protects it in turn

Image metadata (C{rbd image-meta list}) records C{txgraph.owner} (the
node), C{txgraph.layer}, C{txgraph.parent} and C{txgraph.state} (C{clean}
while the layer still equals its parent, C{dirty} once it was mapped
read-write); the base also records C{txgraph.fs} and C{txgraph.formatted},
so an existing base is never formatted again.  A node only lists, changes
or removes images whose names carry its own prefix and node id I{and} whose
owner is that node: several Docker hosts share one pool safely.

Locally, under C{<state-dir>/rbd/}::

  mnt/<key>      where a layer is mounted; dockerd gets C{mnt/<key>/rootfs}
                 (devicemapper-style, so lost+found stays out of sight)
  fuse/<tag>     rbd-fuse mounts of the fuse mapper (see L{mappers})
  work/          temporary mounts: apply, views for diffs, set-up
  log/           rbd-fuse logs

Life cycle as the layer machine drives it: C{prepare} clones, C{map}
attaches a device (read-only once committed, so a committed layer never
changes under its children), C{mount} mounts it, C{unmount}/C{unmap} undo
that, C{commit} snapshots and protects (never a mounted or mapped layer),
C{remove} undoes everything (the image goes to the RBD trash, from where a
background purge deletes it).  C{apply}, C{diff}, C{changes} and
C{diff_size} work on temporary mappings of their own, so they need the
layer to be neither mapped nor mounted; the views they compare are
read-only (a layer that is mounted is seen through a read-only bind mount
of its mount).  Sizes follow the shared rule for full trees:
C{changes_size(root, changes_dirs(root, parent_root))}.

Depth: librbd opens a clone's whole ancestry (about 3.5 ms per level
here), so a layer committed C{flatten_depth} (32) clones below a flat image
is flattened first (its ancestors' data copied into it); chains stay
shallow at the price of a copy every 32 levels (dockerd allows 125).  This
node caches what it knows of its own images (which only it changes), so an
operation opens no image it does not have to.

Crashes: every call finishes or replaces what an interrupted one left
(temporary mappings are cleaned up at start; a layer's own mapping is found
again from the loop devices and processes that exist).  A librbd client
that died holding an image's exclusive lock (an rbd-fuse killed with -9)
would make the next writer wait about 30 s for its watch to time out; before
writing to one of its own images, the backend breaks such locks (which
blocklists the dead client) when no local mapping of that image is alive.

The Ceph bindings are imported in L{RBDBackend.start}, so that this module
(and the overlay backend) work on hosts without them.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shlex
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import IO, Any, BinaryIO, cast

from twisted.logger import Logger

from txgraph import archive, faults, mounts, thin
from txgraph.archive import ApplyMode
from txgraph.backends import (
    HASHED_KEY,
    Backend,
    BackendOption,
    LayerInfo,
    LayerView,
    MountSpec,
    Orphan,
    layer_key,
    parse_options,
    parse_size,
    storage_size,
)
from txgraph.backends.background import BackgroundPasses
from txgraph.backends.mappers import (
    AUTO_ORDER,
    MAPPERS,
    ClusterAccess,
    FuseMapper,
    Mapper,
    Mapping,
    run,
)
from txgraph.errors import BackendError, ConfigurationError, TxgraphError
from txgraph.model import Change, IDMap
from txgraph.thin import ThinDescriptorError

log = Logger()

#: The snapshot a committed layer (and the base) is cloned from.
SNAP = "txgraph"
#: The directory inside each filesystem that dockerd sees.
ROOTFS = "rootfs"
#: Image metadata keys.
K_OWNER = "txgraph.owner"
K_LAYER = "txgraph.layer"
K_PARENT = "txgraph.parent"
K_STATE = "txgraph.state"
K_FS = "txgraph.fs"
K_FORMATTED = "txgraph.formatted"
K_DEPTH = "txgraph.depth"
#: The OCI chain ID whose tree the image holds exactly (shared images, and
#: layers that are unchanged clones of one); NONE otherwise.
K_CHAIN = "txgraph.chain"
#: A metadata value meaning "none" (librbd's metadata listing misreads
#: empty values).
NONE = "-"
#: The owner of shared images: no node.
SHARED = "shared"

#: Crash point: a layer's own image was removed to be replaced by a clone
#: of a shared image (ApplyDiff of a shared or thin layer), and the clone
#: is not made yet.
CRASH_REPLACED = "rbd.replace.removed"
#: Crash point: a removed layer's image is in the RBD trash, not purged yet.
CRASH_TRASHED = "rbd.remove.trashed"
faults.declare(CRASH_REPLACED, CRASH_TRASHED)

#: gc's name for a trashed image of this node: this prefix and its trash id.
TRASH = "trash."

#: Seconds between purge passes while removed images wait in the trash
#: (for their clones to be purged first, or a dead client's watch to end).
PURGE_RETRY = 10.0

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: A layer's key (L{txgraph.backends.layer_key}), as its mapping tag.
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")
#: Layer IDs whose plain key would be a name of the backend's own.
_RESERVED = frozenset({"base"})

#: Below this a filesystem is not worth having (and XFS refuses < 300 MiB).
MIN_SIZE = {"ext4": 32 << 20, "xfs": 300 << 20}


# -- option parsing -------------------------------------------------------------


def _base_size(value: str) -> int:
    size = parse_size(value)
    if size < MIN_SIZE["ext4"]:
        raise ValueError(f"the base image needs at least {MIN_SIZE['ext4'] >> 20} MiB")
    return size


def _name(what: str) -> Any:
    def parse(value: str) -> str:
        if not _NAME.match(value) or len(value) > 128:
            raise ValueError(f"not a valid {what} name (use letters, digits, '.', '_', '-')")
        return value

    return parse


def _client(value: str) -> str:
    if value.startswith("client."):
        value = value[len("client.") :]
    return str(_name("client")(value))


def _prefix(value: str) -> str:
    if not _PREFIX.match(value):
        raise ValueError("an image prefix may hold only letters, digits, '.', '_' and '-'")
    return value


def _node_id(value: str) -> str:
    if not _NODE.match(value):
        raise ValueError("a node id is 1-64 letters, digits, '_' or '-' (no dots)")
    return value


def _fs(value: str) -> str:
    if value not in ("ext4", "xfs"):
        raise ValueError("the filesystem must be ext4 or xfs")
    return value


def _mkfs_args(value: str) -> list[str]:
    return shlex.split(value)


def _mount_options(value: str) -> str:
    for option in (o for o in value.split(",") if o):
        if not re.match(r"^[A-Za-z0-9_.=:/+-]+$", option):
            raise ValueError(f"bad mount option {option!r}")
        if option in ("ro", "rw"):
            raise ValueError("ro/rw is decided by txgraph (committed layers are read-only)")
    return value.strip(",")


def _mapper(value: str) -> str:
    if value != "auto" and value not in MAPPERS:
        raise ValueError(f"the mapper must be auto, {', '.join(AUTO_ORDER)}")
    return value


def _seconds(what: str, zero: bool) -> Any:
    """
    A parser of a number of seconds, at most an hour, and more than 0
    unless C{zero} allows 0.
    """
    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError("not a number of seconds") from None
        if not ((0 <= seconds) if zero else (0 < seconds)) or not seconds <= 3600:
            bounds = "from 0 to 3600" if zero else "more than 0 and at most 3600"
            raise ValueError(f"the {what} must be {bounds} seconds")
        return seconds

    return parse


def _depth(value: str) -> int:
    try:
        depth = int(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if depth < 0:
        raise ValueError("must be 0 (never flatten) or more")
    return depth


def _object_size(value: str) -> int:
    size = parse_size(value)
    if size < 4096 or size > 32 << 20 or size & (size - 1):
        raise ValueError(f"{value!r} is not a power of two from 4K to 32M")
    return size


def _yes(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{value!r} is not yes or no")


def _path(value: str) -> str:
    if not value:
        raise ValueError("empty path")
    return value


def default_node_id() -> str:
    """
    This host's node id: /etc/machine-id, else the host name (made safe).
    """
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
        if _NODE.match(machine):
            return machine
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64].strip("-")
    return host or "localhost"


# -- helpers ---------------------------------------------------------------------


@dataclass
class _ImageState:
    """
    What one read-only look at an image tells.

    @ivar snaps: snapshot name -> (protected, size).
    """

    name: str
    meta: dict[str, str]
    snaps: dict[str, tuple[bool, int]] = field(default_factory=dict)
    size: int = 0
    parent: str | None = None

    @property
    def committed(self) -> bool:
        """
        Whether the image has its C{@txgraph} snapshot.
        """
        return SNAP in self.snaps

    @property
    def depth(self) -> int:
        """
        How many clones deep the image is below a flat image (the base, or
        a layer flattened when committed); unknown counts as deep.
        """
        try:
            return int(self.meta.get(K_DEPTH, ""))
        except ValueError:
            return 1 << 16

    def copy(self) -> _ImageState:
        """
        An independent copy.
        """
        return _ImageState(self.name, dict(self.meta), dict(self.snaps), self.size, self.parent)


def _encode_bytes(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def encode_metadata(values: dict[str, str]) -> bytes:
    """
    C{values} as cls_rbd's C{metadata_set} takes them: Ceph's encoding of
    a C{map<string, bufferlist>} (a little-endian u32 count, then each key
    and value as a u32 length and its bytes).
    """
    out = [struct.pack("<I", len(values))]
    for key, value in values.items():
        out.append(_encode_bytes(key.encode()))
        out.append(_encode_bytes(value.encode()))
    return b"".join(out)


def decode_string(raw: bytes) -> str:
    """
    A string in Ceph's encoding (a little-endian u32 length, then the
    bytes), as C{rbd_id.<name>} objects hold an image's id.
    """
    if len(raw) < 4:
        raise BackendError(f"malformed image id object ({len(raw)} bytes)")
    (length,) = struct.unpack_from("<I", raw)
    if len(raw) < 4 + length:
        raise BackendError(f"malformed image id object (length {length}, {len(raw)} bytes)")
    return raw[4 : 4 + length].decode()


def _client_nonce(address: str) -> str:
    """
    The random nonce that tells librados clients apart, from an address
    however it is printed (C{127.0.0.1:0/2349162579}, C{[v2:...,v1:...]}).
    """
    return address.strip("[]").split(",")[0].rsplit("/", 1)[-1]


def _describe(error: BaseException) -> str:
    if isinstance(error, TxgraphError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _remove_snap(image: Any) -> None:
    # Unprotect (librbd refuses while clones exist) and remove @txgraph.
    if image.snap_exists(SNAP):
        if image.is_protected_snap(SNAP):
            image.unprotect_snap(SNAP)
        image.remove_snap(SNAP)


class _SharedGone(Exception):
    """
    A shared image vanished (or lost its protected snapshot) between a look
    and a clone: another node's gc removed it.  Callers look again.
    """

    def __init__(self, image: str) -> None:
        super().__init__(image)
        self.image = image


class RBDBackend(Backend):
    """
    Layers as RBD clones of protected snapshots, mapped and mounted.
    """

    name = "rbd"
    maps = True
    commits = True
    shares_layers = True
    holds_client_mounts = True
    options = (
        BackendOption("conf", "path of ceph.conf", "/etc/ceph/ceph.conf", _path),
        BackendOption("client", "Ceph client id (without 'client.')", "admin", _client),
        BackendOption("keyring", "keyring path (default: the one ceph.conf names)", None, _path),
        BackendOption("pool", "RBD pool holding the layers", "rbd", _name("pool")),
        BackendOption("data_pool", "data pool for the images (erasure-coded pools)", None, _name("pool")),
        BackendOption("namespace", "RBD namespace within the pool", None, _name("namespace")),
        BackendOption("prefix", "image name prefix", "txgraph.", _prefix),
        BackendOption("base_size", "size of the base image (e.g. 10G)", "10G", _base_size),
        BackendOption("fs", "filesystem: ext4 or xfs", "ext4", _fs),
        BackendOption(
            "object_size",
            "RADOS object size of the base images, and so of every clone (a power of two, "
            "4K to 32M); a clone's first write to an object copies the whole object from "
            "its parent",
            "256K",
            _object_size,
        ),
        BackendOption("mkfs_args", "extra mkfs arguments for the base image", "", _mkfs_args),
        BackendOption("mount_options", "extra mount options, comma-separated", "", _mount_options),
        BackendOption("mapper", "auto, krbd, nbd or fuse", "auto", _mapper),
        BackendOption("node_id", "this host's id in image names (default: /etc/machine-id)", None, _node_id),
        BackendOption(
            "timeout", "seconds allowed to each cluster call", "30", _seconds("timeout", zero=False)
        ),
        BackendOption(
            "flatten_depth",
            "flatten a layer when committed if it is this many clones deep (0: never); "
            "opening a clone opens all its ancestors",
            "32",
            _depth,
        ),
        BackendOption(
            "unmap_delay",
            "seconds a layer's device stays mapped after its last Put, so that the next "
            "Get only mounts (dockerd gets a container's layer when it creates the "
            "container and again when it starts it); read-write layers are also mapped "
            "as they are created; 0: map at every Get, unmap at every last Put",
            "5",
            _seconds("delay", zero=True),
        ),
        BackendOption(
            "share",
            "keep image layers once per pool, as snapshots named by their chain ID that "
            "every node clones (yes/no)",
            "yes",
            _yes,
        ),
    )

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        opts = {**parse_options(type(self), {}), **options}
        self.conf: str = opts["conf"]
        self.client: str = opts["client"]
        self.keyring: str | None = opts["keyring"]
        self.pool: str = opts["pool"]
        self.data_pool: str | None = opts["data_pool"]
        self.namespace: str | None = opts["namespace"] or None
        self.prefix: str = opts["prefix"]
        self.base_size: int = opts["base_size"]
        self.fs: str = opts["fs"]
        self.object_size: int = opts["object_size"]
        self.mkfs_args: list[str] = list(opts["mkfs_args"])
        self.mount_options: str = opts["mount_options"]
        self.mapper_choice: str = opts["mapper"]
        self.node_id: str = opts["node_id"] or default_node_id()
        self.timeout: float = opts["timeout"]
        self.flatten_depth: int = opts["flatten_depth"]
        self.unmap_delay = opts["unmap_delay"]
        self.share: bool = opts["share"]
        self.root = os.path.join(state_dir, "rbd")
        self._mnt = os.path.join(self.root, "mnt")
        self._work = os.path.join(self.root, "work")
        self._stem = f"{self.prefix}{self.node_id}."
        self.base_image = f"{self._stem}base"
        self._shared_stem = f"{self.prefix}{SHARED}.{self.fs}."
        self.shared_base = f"{self._shared_stem}base"
        self.access = ClusterAccess(
            self.conf, self.client, self.keyring, self.pool, self.namespace, self.timeout
        )
        self.mapper: Mapper | None = None
        self._mappers: dict[str, Mapper] = {}
        self._unavailable: dict[str, str | None] = {}
        self._rados: ModuleType | None = None
        self._rbd: ModuleType | None = None
        self._cluster: Any = None
        self._ioctx: Any = None
        self._fsid = ""
        self._lock = threading.Lock()
        # This node's own images, as it last saw or made them.
        self._known: dict[str, _ImageState] = {}
        # Images whose locks were checked for dead clients since start.
        self._checked: set[str] = set()
        # Removed layers' images are purged from the RBD trash in the
        # background (see remove).
        self._purger = BackgroundPasses("rbd trash purge", self._purge_trash, PURGE_RETRY)
        # Trash entries of this node the last pass could not purge:
        # image id -> (image name, why).
        self._trash_left: dict[str, tuple[str, str]] = {}
        # Trash entries named like ours that are not ours (ids).
        self._trash_foreign: set[str] = set()
        # Layer keys seen, and their layer IDs.
        self._ids: dict[str, str] = {}

    # -- names -------------------------------------------------------------------

    def _key(self, layer_id: str) -> str:
        """
        The layer's key (L{layer_key}): its image name after the node's
        stem, its mapping tag, its mount point's name.  Keys are
        remembered, so that a key found on this host names its layer.
        """
        if layer_id.startswith("publish-"):
            # Candidates of make-thin's publications are named so.
            key = layer_key(layer_id, _RESERVED | {layer_id})
        else:
            key = layer_key(layer_id, _RESERVED)
        self._ids[key] = layer_id
        return key

    def _layer_of(self, key: str) -> str:
        """
        The layer ID of a key found on this host (a hashed key this
        process has not seen stands for itself).
        """
        return self._ids.get(key, key)

    def image_name(self, layer_id: str) -> str:
        """
        The RBD image of a layer on this node.
        """
        return f"{self._stem}{self._key(layer_id)}"

    def shared_image(self, chain: str) -> str:
        """
        The shared image holding the tree of chain C{sha256:<hex>}.
        """
        return f"{self._shared_stem}{chain.split(':', 1)[-1]}"

    def _candidate(self, key: str) -> str:
        # Where this node builds a shared image before publishing it
        # (C{key}: a layer's key, or a name of the backend's own).
        return f"{self._stem}candidate.{key}"

    def spec(self, image: str) -> str:
        """
        C{pool/[namespace/]image}.
        """
        return self.access.image_spec(image)

    def _mountpoint(self, layer_id: str) -> str:
        return os.path.join(self._mnt, self._key(layer_id))

    @contextlib.contextmanager
    def _op(self, op: str, layer_id: str | None, image: str | None = None) -> Iterator[None]:
        """
        Name the operation, layer and image in any error raised inside.
        """
        try:
            yield
        except Exception as e:
            if image is not None:
                # What this node believed of the image may be wrong now.
                self._forget(image)
            target = f" (image {self.spec(image)})" if image else ""
            subject = f" of layer {layer_id}" if layer_id else ""
            prefix = f"rbd {op}{subject}{target}"
            if isinstance(e, TxgraphError):
                if e.message.startswith("rbd "):
                    raise
                raise type(e)(f"{prefix}: {e.message}") from e
            raise BackendError(f"{prefix}: {_describe(e)}") from e

    # -- start and stop -------------------------------------------------------------

    def start(self) -> None:
        """
        Import the bindings, check the tools, connect, pick the mapper,
        clean up temporary leftovers of a crash and make sure the base
        image exists, formatted.
        """
        try:
            import rados
            import rbd
        except ImportError as e:
            raise BackendError(
                f"the rbd backend needs Ceph's Python bindings, which cannot be imported "
                f"({e}): install Debian's python3-rados and python3-rbd and link them into "
                f"txgraph's virtualenv (.ci/link-ceph-bindings.sh VENV)"
            ) from None
        self._rados, self._rbd = rados, rbd
        self._check_host()
        for d in (self.root, self._mnt, self._work):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._connect()
        try:
            self._choose_mapper()
            self._cleanup_leftovers()
            with self._op("set-up of the base image", None, self.base_image):
                self._ensure_base()
            self._purger.start()
        except BaseException:
            self.stop()
            raise

    def _check_host(self) -> None:
        if not os.path.isfile(self.conf):
            raise BackendError(f"rbd backend: Ceph configuration {self.conf} does not exist")
        if self.keyring is not None and not os.access(self.keyring, os.R_OK):
            raise BackendError(f"rbd backend: keyring {self.keyring} is not readable")
        tools = {
            "ext4": ("mkfs.ext4", "e2fsck", "resize2fs"),
            "xfs": ("mkfs.xfs", "xfs_growfs"),
        }[self.fs]
        for tool in tools:
            if shutil.which(tool) is None:
                package = "e2fsprogs" if self.fs == "ext4" else "xfsprogs"
                raise BackendError(f"rbd backend: {tool} is missing (install {package})")
        if self.base_size < MIN_SIZE[self.fs]:
            raise ConfigurationError(
                f"txgraph.rbd.base_size must be at least {MIN_SIZE[self.fs] >> 20} MiB "
                f"for {self.fs}"
            )

    def _connect(self) -> None:
        assert self._rados is not None and self._rbd is not None
        rados, rbd = self._rados, self._rbd
        who = (
            f"Ceph cluster of {self.conf} as client.{self.client} "
            f"(keyring {self.keyring or 'named in ' + self.conf})"
        )
        try:
            cluster = rados.Rados(
                conffile=self.conf,
                rados_id=self.client,
                conf={"keyring": self.keyring} if self.keyring else {},
            )
        except rados.Error as e:
            raise BackendError(f"rbd backend: cannot read {self.conf}: {_describe(e)}") from None
        for key in ("rados_mon_op_timeout", "rados_osd_op_timeout", "client_mount_timeout"):
            cluster.conf_set(key, str(max(1, math.ceil(self.timeout))))
        try:
            cluster.connect(timeout=int(max(1, self.timeout)))
        except rados.PermissionDeniedError:
            cluster.shutdown()
            raise BackendError(
                f"rbd backend: the {who} refused the connection: permission denied "
                f"(wrong key for client.{self.client}?)"
            ) from None
        except rados.TimedOut:
            cluster.shutdown()
            raise BackendError(
                f"rbd backend: no answer from the {who} within {self.timeout:g} s "
                f"(are its monitors up?)"
            ) from None
        except rados.Error as e:
            cluster.shutdown()
            raise BackendError(f"rbd backend: cannot connect to the {who}: {_describe(e)}") from None
        self._cluster = cluster
        try:
            try:
                self._ioctx = cluster.open_ioctx(self.pool)
            except rados.ObjectNotFound:
                raise BackendError(
                    f"rbd backend: pool {self.pool} does not exist in the {who} (create it: "
                    f"ceph osd pool create {self.pool}; rbd pool init {self.pool})"
                ) from None
            if self.data_pool is not None and not cluster.pool_exists(self.data_pool):
                raise BackendError(
                    f"rbd backend: data pool {self.data_pool} does not exist in the {who}"
                )
            if self.namespace:
                if not rbd.RBD().namespace_exists(self._ioctx, self.namespace):
                    raise BackendError(
                        f"rbd backend: namespace {self.namespace} does not exist in pool "
                        f"{self.pool} (create it: rbd namespace create "
                        f"{self.pool}/{self.namespace})"
                    )
                self._ioctx.set_namespace(self.namespace)
            # A cheap call that needs the client's RBD capabilities.
            rbd.RBD().list(self._ioctx)
            self._fsid = cluster.get_fsid()
        except rados.PermissionError as e:
            self.stop()
            raise BackendError(
                f"rbd backend: client.{self.client} may not use pool {self.pool} of the "
                f"{who}: {_describe(e)} (give it: mon 'profile rbd' osd 'profile rbd "
                f"pool={self.pool}')"
            ) from None
        except rados.TimedOut:
            self.stop()
            raise BackendError(
                f"rbd backend: pool {self.pool} of the {who} does not answer within "
                f"{self.timeout:g} s (are its OSDs up?)"
            ) from None
        except TxgraphError:
            self.stop()
            raise
        except rados.Error as e:
            self.stop()
            raise BackendError(
                f"rbd backend: pool {self.pool} of the {who}: {_describe(e)}"
            ) from None

    def _choose_mapper(self) -> None:
        for name, cls in MAPPERS.items():
            mapper = cls(self.access, self.root)
            mapper.dead = self._suspect
            self._mappers[name] = mapper
            self._unavailable[name] = mapper.unavailable()
        if self.mapper_choice == "auto":
            for name in AUTO_ORDER:
                if self._unavailable[name] is None:
                    self.mapper = self._mappers[name]
                    return
            raise BackendError(
                "rbd backend: no way to map RBD images on this host: "
                + "; ".join(f"{n}: {self._unavailable[n]}" for n in AUTO_ORDER)
            )
        reason = self._unavailable[self.mapper_choice]
        if reason is not None:
            raise BackendError(
                f"rbd backend: mapper {self.mapper_choice} is not available here: {reason} "
                f"(use txgraph.rbd.mapper=auto to pick one that is)"
            )
        self.mapper = self._mappers[self.mapper_choice]

    def _usable_mappers(self) -> list[Mapper]:
        return [m for n, m in self._mappers.items() if self._unavailable.get(n) is None]

    def _cleanup_leftovers(self) -> None:
        """
        Temporary mounts and mappings a crash left (a layer's own mapping
        and mount are the layer machine's to recover).
        """
        for point in mounts.mounted_under(self._work):
            mounts.unmount(point)
        for mapper in self._usable_mappers():
            mapper.cleanup_tags(".")
        for name in os.listdir(self._work):
            shutil.rmtree(os.path.join(self._work, name), ignore_errors=True)

    def stop(self) -> None:
        """
        Close the cluster connection.  Mappings and mounts stay: running
        containers use them, and the layer machines own them.
        """
        for mapper in self._mappers.values():
            if isinstance(mapper, FuseMapper):
                mapper.reap()
        if not self._purger.stop(self.timeout + 5):
            log.warn("the rbd trash purge did not stop; leaving the cluster connection open")
            return
        if self._ioctx is not None:
            with contextlib.suppress(Exception):
                self._ioctx.close()
            self._ioctx = None
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.shutdown()
            self._cluster = None

    def status(self) -> list[tuple[str, str]]:
        """
        Where the layers are and how they are mapped.
        """
        unavailable = "; ".join(
            f"{n}: {r}" for n, r in self._unavailable.items() if r is not None
        )
        lines = [
            ("Pool", self.pool),
            ("Namespace", self.namespace or "(default)"),
            ("Data Pool", self.data_pool or "(same)"),
            ("Cluster FSID", self._fsid or "(not connected)"),
            ("Client", f"client.{self.client}"),
            ("Node ID", self.node_id),
            ("Image Prefix", self._stem),
            ("Base Image", f"{self.spec(self.base_image)}@{SNAP}"),
            ("Base Size", str(self.base_size)),
            ("Backing Filesystem", self.fs),
            ("Mapper", self.mapper.name if self.mapper else "(not started)"),
        ]
        if unavailable:
            lines.append(("Unavailable Mappers", unavailable))
        with self._lock:
            waiting = len(self._trash_left)
        lines.append(("Removed Images Not Purged", str(waiting)))
        lines.append(
            ("Shared Layers", f"{self.spec(self._shared_stem)}<chain>@{SNAP}" if self.share else "off")
        )
        return lines

    # -- images ------------------------------------------------------------------------

    def _inspect(self, name: str, fresh: bool = False) -> _ImageState | None:
        """
        What this node knows of an image: from its cache of its own images
        (which only it changes), else from a read-only look (no watch, no
        lock); None if the image does not exist.  Opening a clone opens
        its whole ancestry, so looks are kept few.
        """
        if not fresh:
            with self._lock:
                known = self._known.get(name)
            if known is not None:
                return known.copy()
        assert self._rbd is not None
        rbd = self._rbd
        try:
            image = rbd.Image(self._ioctx, name, read_only=True)
        except rbd.ImageNotFound:
            self._forget(name)
            return None
        try:
            state = self._read_state(image, name)
        finally:
            image.close()
        if self._ours(state):
            self._remember(state)
        return state

    def _read_state(self, image: Any, name: str) -> _ImageState:
        """
        An open image's metadata, snapshots, size and parent.
        """
        assert self._rbd is not None
        rbd = self._rbd
        state = _ImageState(name=name, meta=dict(image.metadata_list()))
        for snap in image.list_snaps():
            if snap.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) != (
                rbd.RBD_SNAP_NAMESPACE_TYPE_USER
            ):
                # A removed snapshot that clones still use (librbd keeps
                # it in the trash namespace, under a UUID): not ours.
                continue
            state.snaps[snap["name"]] = (
                bool(image.is_protected_snap(snap["name"])),
                int(snap["size"]),
            )
        state.size = int(image.size())
        try:
            state.parent = image.get_parent_image_spec()["image_name"]
        except rbd.ImageNotFound:
            state.parent = None
        return state

    def _remember(self, state: _ImageState) -> None:
        with self._lock:
            self._known[state.name] = state.copy()

    def _forget(self, name: str) -> None:
        with self._lock:
            self._known.pop(name, None)

    def _update(self, name: str, **changes: Any) -> None:
        """
        Record in the cache a change this node made to its image.
        """
        with self._lock:
            known = self._known.get(name)
            if known is None:
                return
            for key, value in changes.items():
                if key == "meta":
                    known.meta.update(value)
                elif key == "snap":
                    if value is None:
                        known.snaps.pop(SNAP, None)
                    else:
                        known.snaps[SNAP] = value
                else:
                    setattr(known, key, value)

    def _ours(self, state: _ImageState) -> bool:
        owner = state.meta.get(K_OWNER)
        if owner == SHARED and state.name.startswith(self._stem):
            # A clone of a shared image that crashed before its own
            # metadata was written (it starts with a copy of its parent's).
            return state.parent is not None and (
                state.parent.startswith(self._shared_stem)
                or state.parent.startswith(self._candidate(""))
            )
        if owner is not None:
            return owner == self.node_id
        # A clone that crashed before its metadata was written: ours if
        # its parent is.
        return state.parent is not None and state.parent.startswith(self._stem)

    def _require(self, name: str) -> _ImageState:
        state = self._inspect(name)
        if state is None:
            raise BackendError("its image does not exist")
        if not self._ours(state):
            raise BackendError(
                f"image {self.spec(name)} belongs to node "
                f"{state.meta.get(K_OWNER, '(none: not a txgraph image)')}, not {self.node_id}"
            )
        return state

    def _refuse_foreign(self, state: _ImageState) -> None:
        raise BackendError(
            f"image {self.spec(state.name)} already exists and is not a txgraph layer of "
            f"node {self.node_id} (owner: {state.meta.get(K_OWNER, 'none')}); "
            f"refusing to touch it"
        )

    def _image(self, name: str, image_id: str | None = None, read_only: bool = False) -> Any:
        """
        Open an image by name, or by id (an image in the trash has only
        its id).
        """
        assert self._rbd is not None
        if image_id:
            return self._rbd.Image(self._ioctx, image_id=image_id, read_only=read_only)
        return self._rbd.Image(self._ioctx, name, read_only=read_only)

    @contextlib.contextmanager
    def _open(self, name: str, image_id: str | None = None) -> Iterator[Any]:
        image = self._image(name, image_id)
        try:
            yield image
        finally:
            image.close()

    def _children(self, name: str) -> list[str]:
        assert self._rbd is not None
        try:
            image = self._rbd.Image(self._ioctx, name, snapshot=SNAP, read_only=True)
        except self._rbd.ImageNotFound:
            return []
        try:
            return [
                f"{c['pool']}/{c['pool_namespace'] + '/' if c['pool_namespace'] else ''}"
                f"{c['image']}{' (in the trash)' if c['trash'] else ''}"
                for c in image.list_children2()
            ]
        finally:
            image.close()

    def _mappings(self, name: str, tag: str | None = None) -> list[Mapping]:
        """
        Every mapping of an image on this host, by reality.
        """
        found: list[Mapping] = []
        for mapper in self._usable_mappers():
            found += mapper.find(name, tag)
        return found

    def _suspect(self, image: str) -> None:
        """
        A client of this image died (a mapper found dead): check its locks
        again before the next write.
        """
        with self._lock:
            self._checked.discard(image)

    def _clear_stale_clients(
        self, name: str, watchers: bool = False, image_id: str | None = None
    ) -> None:
        """
        Break the exclusive lock (and, with C{watchers}, drop the watches)
        of clients of this node's image that are dead: held while no local
        mapping of the image is alive, by another client than ours.  Their
        next writer would otherwise wait ~30 s for the watch to time out.

        Only dead clients leave locks behind, and this node sees its
        clients die (a mapping whose process is gone); so each image is
        checked once after start, and again only after such a death.
        """
        assert self._rbd is not None and self._cluster is not None
        if not watchers:
            with self._lock:
                if name in self._checked:
                    return
        rbd = self._rbd
        own = _client_nonce(self._cluster.get_addrs())
        try:
            image = self._image(name, image_id, read_only=True)
        except rbd.ImageNotFound:
            return
        try:
            lockers = image.list_lockers() or {}
            held = [
                entry for entry in lockers.get("lockers", []) if _client_nonce(entry[2]) != own
            ]
            watching = (
                [w["addr"] for w in image.watchers_list() if _client_nonce(w["addr"]) != own]
                if watchers
                else []
            )
        finally:
            image.close()
        if held or watching:
            if any(m["alive"] for m in self._mappings(name)):
                return
            if held:
                with self._open(name, image_id) as rw:
                    for client, cookie, address in held:
                        log.warn(
                            "breaking the lock of dead client {client} ({address}) "
                            "on {image}",
                            client=client,
                            address=address,
                            image=self.spec(name),
                        )
                        with contextlib.suppress(rbd.ImageNotFound, rbd.InvalidArgument):
                            rw.break_lock(client, cookie)
            for address in watching:
                log.warn(
                    "blocklisting dead client {address} still watching {image}",
                    address=address,
                    image=self.spec(name),
                )
                self._cluster.blocklist_add(address, 3600)
        with self._lock:
            self._checked.add(name)

    def _set_meta(self, name: str, values: dict[str, str]) -> None:
        """
        Set image metadata keys, all in one call of cls_rbd's
        C{metadata_set} on the image's header object: the call librbd
        makes for each key, without opening the image (an open, the
        exclusive lock and a close cost ~50 ms here; this is one round
        trip).  Only this node's own images that nothing has mapped
        read-write get metadata, and only txgraph reads these keys, so no
        open handle needs to hear of the change.
        """
        assert self._rbd is not None and self._rados is not None
        header = f"rbd_header.{self._image_id(name)}"
        try:
            self._ioctx.execute(header, "rbd", "metadata_set", encode_metadata(values))
        except self._rados.ObjectNotFound:
            raise self._rbd.ImageNotFound(f"image {name} has no header", errno=errno.ENOENT) from None
        self._update(name, meta=values)

    def _image_id(self, name: str) -> str:
        """
        The id of a (format 2) image, from its C{rbd_id.<name>} object.
        """
        assert self._rbd is not None and self._rados is not None
        try:
            raw = self._ioctx.read(f"rbd_id.{name}", 1024)
        except self._rados.ObjectNotFound:
            raise self._rbd.ImageNotFound(f"image {name} not found", errno=errno.ENOENT) from None
        return decode_string(raw)

    def _snapshot(self, name: str) -> None:
        """
        Snapshot and protect (idempotent).
        """
        state = self._inspect(name)
        if state is None:
            raise BackendError("its image does not exist")
        if state.committed and state.snaps[SNAP][0]:
            return
        self._clear_stale_clients(name)
        with self._open(name) as image:
            if not image.snap_exists(SNAP):
                image.create_snap(SNAP)
            if not image.is_protected_snap(SNAP):
                image.protect_snap(SNAP)
            size = int(image.size())
        self._update(name, snap=(True, size))

    def _drop_snapshot(self, name: str) -> None:
        """
        Undo a commit: unprotect and remove the snapshot, if nothing was
        cloned from it.
        """
        assert self._rbd is not None
        self._clear_stale_clients(name)
        with self._open(name) as image:
            if image.snap_exists(SNAP):
                if image.is_protected_snap(SNAP):
                    try:
                        image.unprotect_snap(SNAP)
                    except self._rbd.ImageBusy:
                        children = self._children(name)
                        raise BackendError(
                            f"layers were made from its snapshot @{SNAP}: "
                            f"{', '.join(children[:5]) or '(children in the trash)'}"
                        ) from None
                image.remove_snap(SNAP)
        self._update(name, snap=None)

    def _destroy(self, layer_id: str, name: str) -> None:
        """
        Unmount, unmap and delete one of our layer images (and its snapshot).
        """
        assert self._rbd is not None
        rbd = self._rbd
        self._release(layer_id, name, None)
        state = self._inspect(name)
        if state is None:
            return
        if not self._ours(state):
            self._refuse_foreign(state)
        for mapping in self._mappings(name):
            self._unmap(mapping)
        if state.committed:
            self._drop_snapshot(name)
        for attempt in range(3):
            try:
                rbd.RBD().remove(self._ioctx, name)
                break
            except rbd.ImageNotFound:
                break
            except rbd.ImageBusy:
                # Still watched: by a dead client of ours (blocklist it),
                # or by a live one somewhere.
                if attempt == 2:
                    raise BackendError(
                        "the image is still open elsewhere (it has watchers); "
                        "is it mapped on this or another host?"
                    ) from None
                self._clear_stale_clients(name, watchers=True)
                time.sleep(0.2)
        self._forget(name)
        with self._lock:
            self._checked.discard(name)

    def _clone(
        self,
        layer: LayerInfo,
        name: str,
        grow_to: int | None,
        shared: str | None = None,
        meta: dict[str, str] | None = None,
        source: _ImageState | None = None,
    ) -> None:
        """
        Make the layer's image: a clone of its parent's snapshot (or of the
        shared image C{shared}, as looked at now, or as C{source} says: this
        node's own finished candidate), with its metadata (C{meta} added),
        grown (and root-owned as asked) if need be.
        """
        assert self._rbd is not None
        rbd = self._rbd
        if shared is not None:
            parent = shared
            pstate = source if source is not None else self._shared_state(shared)
            if pstate is None:
                raise _SharedGone(shared)
        else:
            parent = self.image_name(layer.parent) if layer.parent else self.base_image
            pstate = self._inspect(parent)
            what = f"parent layer {layer.parent}" if layer.parent else "the base image"
            if pstate is None or not self._ours(pstate):
                raise BackendError(f"{what} has no image {self.spec(parent)} of this node")
            if SNAP not in pstate.snaps or not pstate.snaps[SNAP][0]:
                raise BackendError(
                    f"{what} is not committed ({self.spec(parent)} has no protected @{SNAP})"
                )
        parent_size = pstate.snaps[SNAP][1]
        if grow_to is not None and grow_to < parent_size:
            raise ConfigurationError(
                f"storage option size={grow_to} is smaller than the layer's parent "
                f"({parent_size} bytes); it can only grow"
            )
        if shared is None and layer.parent is None and grow_to is None and self.base_size > parent_size:
            grow_to = self.base_size
        if grow_to == parent_size:
            grow_to = None
        depth = min(pstate.depth, 1 << 16) + 1
        origin = self._shared_origin(pstate) if shared is None else None
        try:
            if origin is not None:
                # The parent is an unchanged clone of a shared image: clone
                # that image instead.  Same tree, one level less to open for
                # this image and everything made from it (a container's
                # layer opens 4 images instead of 5 on a one-layer image).
                try:
                    rbd.RBD().clone(
                        self._ioctx, origin, SNAP, self._ioctx, name, data_pool=self.data_pool
                    )
                    parent, depth = origin, depth - 1
                except (rbd.ImageNotFound, rbd.InvalidArgument):
                    origin = None
            if origin is None:
                rbd.RBD().clone(
                    self._ioctx, parent, SNAP, self._ioctx, name, data_pool=self.data_pool
                )
        except (rbd.ImageNotFound, rbd.InvalidArgument) as e:
            if shared is None:
                raise
            # Removed, or being removed, by another node's gc since it was looked at.
            raise _SharedGone(shared) from e
        # A new image has no clients yet, dead or alive; it starts with a
        # copy of its parent's metadata (librbd copies it), then gets its own.
        self._remember(
            _ImageState(name=name, meta=dict(pstate.meta), size=parent_size, parent=parent)
        )
        with self._lock:
            self._checked.add(name)
        try:
            self._set_meta(
                name,
                {
                    K_OWNER: self.node_id,
                    K_LAYER: layer.id,
                    K_PARENT: layer.parent or NONE,
                    K_STATE: "clean",
                    K_DEPTH: str(depth),
                    K_CHAIN: NONE,
                    **(meta or {}),
                },
            )
            chown = shared is None and layer.parent is None and tuple(layer.root_ids) != (0, 0)
            if grow_to is not None or chown:
                self._set_up(layer, name, grow_to, chown)
        except BaseException:
            try:
                self._destroy(layer.id, name)
            except Exception as e:
                log.error("cannot remove half-made image {image}: {error}", image=name, error=e)
            raise

    def _shared_origin(self, state: _ImageState) -> str | None:
        """
        The shared image a committed layer is an unchanged clone of (an
        image layer ApplyDiff settled on a shared image, never written
        since), or None.
        """
        chain = state.meta.get(K_CHAIN, NONE)
        if (
            state.meta.get(K_STATE) == "shared"
            and chain.startswith("sha256:")
            and state.parent == self.shared_image(chain)
            and state.committed
        ):
            return state.parent
        return None

    def _set_up(self, layer: LayerInfo, name: str, grow_to: int | None, chown: bool) -> None:
        """
        Grow a new clone and its filesystem, and give its root directory
        to the container's root user (userns-remap).  ext4 grows offline
        (online growth needs CAP_SYS_RESOURCE, which containers often lack).
        """
        if grow_to is not None:
            self._clear_stale_clients(name)
            with self._open(name) as image:
                image.resize(grow_to)
            self._update(name, size=grow_to)
        mapping = self._map_temporary(name, readonly=False)
        try:
            device = mapping["device"]
            if grow_to is not None and self.fs == "ext4":
                # resize2fs wants a freshly checked filesystem; -p repairs
                # nothing that needs a human (exit 1: fixed, still fine).
                run(["e2fsck", "-f", "-p", device], "check the filesystem before growing it",
                    self.timeout * 10, ok=(0, 1))
                run(["resize2fs", device], "grow the filesystem", self.timeout * 10)
            if chown or (grow_to is not None and self.fs == "xfs"):
                with self._device_mounted(device, readonly=False, prefix="setup-") as top:
                    if grow_to is not None and self.fs == "xfs":
                        run(["xfs_growfs", top], "grow the filesystem", self.timeout * 10)
                    if chown:
                        os.chown(os.path.join(top, ROOTFS), *layer.root_ids)
        finally:
            self._unmap(mapping)

    # -- the base image --------------------------------------------------------------

    def _ensure_base(self) -> None:
        assert self._rbd is not None
        name = self.base_image
        state = self._inspect(name)
        if state is None:
            self._rbd.RBD().create(
                self._ioctx, name, self.base_size, order=self.object_size.bit_length() - 1,
                old_format=False, data_pool=self.data_pool
            )
            self._set_meta(
                name, {K_OWNER: self.node_id, K_LAYER: "base", K_FS: self.fs, K_DEPTH: "0"}
            )
            state = self._inspect(name)
            assert state is not None
        elif not self._ours(state):
            self._refuse_foreign(state)
        if K_DEPTH not in state.meta:
            self._set_meta(name, {K_DEPTH: "0"})
        recorded = state.meta.get(K_FS)
        if recorded is not None and recorded != self.fs:
            raise ConfigurationError(
                f"the base image {self.spec(name)} holds {recorded}, but "
                f"txgraph.rbd.fs={self.fs}: a node keeps one filesystem (use another "
                f"txgraph.rbd.prefix or node_id, or remove this node's layers first)"
            )
        if state.meta.get(K_FORMATTED) != "1":
            if state.snaps:
                raise BackendError(
                    "the base image has snapshots but is not marked formatted; "
                    "refusing to format it over what may be data"
                )
            self._format_base(name)
        if not state.committed or not state.snaps[SNAP][0]:
            self._snapshot(name)

    def _format_base(self, name: str) -> None:
        if self.fs == "ext4":
            # The image reads back zeros where nothing was written, so the
            # inode tables and the journal need no zeroing (and must not be
            # zeroed lazily in every clone later: see noinit_itable).
            mkfs = [
                "mkfs.ext4", "-q", "-F", "-L", "txgraph",
                "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ]
        else:
            mkfs = ["mkfs.xfs", "-q", "-f", "-K", "-L", "txgraph"]
        mapping = self._map_temporary(name, readonly=False)
        try:
            device = mapping["device"]
            run([*mkfs, *self.mkfs_args, device], f"mkfs.{self.fs} on {device}", self.timeout * 10)
            with self._device_mounted(device, readonly=False, prefix="base-") as top:
                rootfs = os.path.join(top, ROOTFS)
                os.mkdir(rootfs, 0o755)
                os.chmod(rootfs, 0o755)
                os.chown(rootfs, 0, 0)
        finally:
            self._unmap(mapping)
        self._set_meta(name, {K_FORMATTED: "1"})

    # -- mapping and mounting --------------------------------------------------------

    def _mapper_for(self, mapping: Mapping) -> Mapper:
        mapper = self._mappers.get(mapping.get("mapper", ""))
        if mapper is None:
            raise BackendError(f"unknown mapper in mapping {mapping!r}")
        return mapper

    def _unmap(self, mapping: Mapping) -> None:
        self._mapper_for(mapping).unmap(mapping)

    def _map_temporary(self, name: str, readonly: bool, bulk_write: bool = False) -> Mapping:
        assert self.mapper is not None
        if not readonly:
            self._clear_stale_clients(name)
        tag = f".tmp-{os.urandom(6).hex()}"
        return self.mapper.map(name, readonly=readonly, tag=tag, bulk_write=bulk_write)

    def _mount_data(self, readonly: bool) -> str:
        options = []
        if self.fs == "xfs":
            # Clones share their parent's filesystem UUID.
            options.append("nouuid")
        elif not readonly:
            options.append("noinit_itable")
        if self.mount_options:
            options.append(self.mount_options)
        return ",".join(options)

    def _mount_device(self, device: str, target: str, readonly: bool) -> None:
        flags = MS_RDONLY if readonly else 0
        try:
            mounts.mount(device, target, self.fs, flags, self._mount_data(readonly))
        except OSError as e:
            raise BackendError(
                f"mount {self.fs} from {device} on {target}"
                f"{' read-only' if readonly else ''}: {e.strerror}"
            ) from None

    @contextlib.contextmanager
    def _work_mount(
        self, name: str, readonly: bool, bulk_write: bool = False
    ) -> Iterator[tuple[str, str]]:
        """
        A temporary mapping and mount of an image; yields the mount's top
        directory and the device.  Always cleaned up.  C{bulk_write}: for
        an extraction, which is written back to the cluster while it runs
        (L{mounts.written_back}).
        """
        mapping = self._map_temporary(name, readonly, bulk_write)
        try:
            with self._device_mounted(mapping["device"], readonly, prefix="work-") as top:
                with mounts.written_back(top) if bulk_write else contextlib.nullcontext():
                    yield top, mapping["device"]
        finally:
            self._unmap(mapping)

    @contextlib.contextmanager
    def _device_mounted(self, device: str, readonly: bool, prefix: str) -> Iterator[str]:
        """
        A device mounted on a new directory under C{work/}; yields the
        directory.  Always unmounted and removed.
        """
        top = tempfile.mkdtemp(prefix=prefix, dir=self._work)
        try:
            self._mount_device(device, top, readonly)
            try:
                yield top
            finally:
                mounts.unmount(top)
        finally:
            os.rmdir(top)

    @contextlib.contextmanager
    def _view(self, layer_id: str, mapping: Mapping | None = None) -> Iterator[str]:
        """
        The layer's tree, read-only: a bind of its mount if it is mounted,
        else a read-only mount of its device if it rests mapped (a device
        kept after its last Put or since its Create: C{mapping}, as
        recorded), else a temporary read-only mapping.
        """
        name = self.image_name(layer_id)
        mounted = self._mountpoint(layer_id)
        if mounts.is_mountpoint(mounted):
            target = tempfile.mkdtemp(prefix="view-", dir=self._work)
            try:
                mounts.mount(os.path.join(mounted, ROOTFS), target, "none", MS_BIND)
                try:
                    mounts.mount("none", target, "none", MS_BIND | MS_REMOUNT | MS_RDONLY)
                    yield target
                finally:
                    mounts.unmount(target)
            finally:
                os.rmdir(target)
            return
        if (
            mapping is not None
            and mapping.get("mapper") in self._mappers
            and self._mapper_for(mapping).alive(mapping)
        ):
            # The layer's own device, unmounted: its data went through its
            # own client, which another client may not see yet.
            with self._device_mounted(mapping["device"], readonly=True, prefix="view-") as top:
                yield os.path.join(top, ROOTFS)
            return
        if self._inspect(name) is None:
            raise BackendError(f"layer {layer_id} has no image {self.spec(name)}")
        with self._work_mount(name, readonly=True) as (top, _device):
            yield os.path.join(top, ROOTFS)

    @contextlib.contextmanager
    def _views(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> Iterator[tuple[str, str | None]]:
        if parent is not None and parent not in [a.id for a in chain]:
            raise BackendError(
                f"layer {parent} is not an ancestor of {layer.id}; diffs are only "
                "taken against ancestors"
            )
        with self._view(layer.id, layer.mapping) as new:
            if parent is None:
                yield new, None
            else:
                recorded = next(a.mapping for a in chain if a.id == parent)
                with self._view(parent, recorded) as old:
                    yield new, old

    # -- life cycle ---------------------------------------------------------------------

    def _requested_size(self, layer: LayerInfo) -> int | None:
        size = storage_size(layer, self.name, "size")
        if size is None:
            return None
        raw = layer.storage_opt["size"]
        if size < MIN_SIZE[self.fs]:
            raise ConfigurationError(
                f"invalid storage option size={raw!r}: at least {MIN_SIZE[self.fs] >> 20} MiB"
            )
        return size

    def prepare(self, layer: LayerInfo) -> Mapping | None:
        """
        Clone the parent's snapshot (the base's for a layer without a
        parent); leftovers of an earlier attempt are removed first.  An
        image of that name that is not this node's is left alone: an error.

        A read-write layer is also mapped when devices are kept after the
        last Put (C{unmap_delay}): dockerd gets it right after creating
        it.  The mapper starts (rbd-fuse: ~30 ms to start and connect)
        while the clone is made, and the mapping is returned for the
        layer's record.
        """
        name = self.image_name(layer.id)
        with self._op("prepare", layer.id, name):
            return self._fresh_clone(layer, name, premap=layer.readwrite and self.unmap_delay > 0)

    def _fresh_clone(self, layer: LayerInfo, name: str, premap: bool = False) -> Mapping | None:
        """
        Make the layer's image a fresh clone of its parent's snapshot,
        removing the image of that name first if it is this node's; with
        C{premap}, map it read-write too and return the mapping.
        """
        grow_to = self._requested_size(layer)
        state = self._inspect(name)
        if state is not None:
            if not self._ours(state):
                self._refuse_foreign(state)
            self._destroy(layer.id, name)
        if not premap:
            self._clone(layer, name, grow_to)
            return None
        assert self.mapper is not None
        started = self.mapper.start(name, tag=self._key(layer.id))
        try:
            self._clone(layer, name, grow_to, meta={K_STATE: "dirty"})
            return self.mapper.map(name, readonly=False, tag=self._key(layer.id), started=started)
        except BaseException:
            if started is not None:
                self._unmap(started)
            raise

    def commit(self, layer: LayerInfo) -> None:
        """
        Snapshot and protect the layer's image (idempotent); never while
        it is mounted or mapped read-write.
        """
        name = self.image_name(layer.id)
        with self._op("commit", layer.id, name):
            state = self._require(name)
            if mounts.is_mountpoint(self._mountpoint(layer.id)):
                raise BackendError(
                    f"it is mounted at {self._mountpoint(layer.id)}; a mounted "
                    "filesystem is never snapshotted"
                )
            for mapping in self._mappings(name):
                if mapping["alive"] and not mapping["readonly"]:
                    raise BackendError(
                        f"it is mapped read-write at {mapping['device']}; unmap it first"
                    )
                if not mapping["alive"]:
                    self._suspect(name)
                    self._unmap(mapping)
            if (
                self.flatten_depth
                and not state.committed
                and state.parent is not None
                and state.depth >= self.flatten_depth
            ):
                # Children of a deep layer would open ever longer chains:
                # this one becomes a flat image (its parents' data copied).
                self._clear_stale_clients(name)
                with self._open(name) as image:
                    image.flatten()
                self._update(name, parent=None)
                self._set_meta(name, {K_DEPTH: "0"})
            self._snapshot(name)

    def remove(self, layer: LayerInfo) -> None:
        """
        Unmount, unmap, and move the image to the RBD trash, from where the
        background purge deletes it (and its snapshot) once the clones made
        from it are gone.  What is gone is fine; an image that is not this
        node's is left alone.

        Deleting takes an unprotect, a snapshot removal and an image
        removal, ~80 ms for a container's C{-init} layer; the move takes
        ~13 ms.  The move frees the name at once (a layer of the same ID
        can be made again), keeps the image's data readable for clones
        not purged yet, and survives a crash: the purge resumes at start.
        """
        name = self.image_name(layer.id)
        with self._op("remove", layer.id, name):
            state = self._inspect(name)
            if state is not None and not self._ours(state):
                log.warn(
                    "not removing {image}: it is not a layer of node {node}",
                    image=self.spec(name),
                    node=self.node_id,
                )
                self._release(layer.id, name, layer.mapping)
                return
            self._release(layer.id, name, layer.mapping)
            if state is not None:
                self._trash(name)
            with contextlib.suppress(OSError):
                os.rmdir(self._mountpoint(layer.id))

    def _trash(self, name: str) -> None:
        """
        Move one of this node's images (unmapped everywhere on this host)
        to the RBD trash and wake the purge.
        """
        assert self._rbd is not None
        for mapping in self._mappings(name):
            self._unmap(mapping)
        with self._lock:
            suspect = name not in self._checked
        if suspect:
            # The move notifies the image's watchers and waits for each to
            # answer: a dead client's watch would hold it ~30 s.
            self._clear_stale_clients(name, watchers=True)
        try:
            self._rbd.RBD().trash_move(self._ioctx, name, 0)
        except self._rbd.ImageNotFound:
            pass
        self._forget(name)
        with self._lock:
            self._checked.discard(name)
        faults.point(CRASH_TRASHED)
        self._purger.wake()

    def _purge_trash(self) -> bool:
        """
        One purge pass: delete this node's images from the RBD trash,
        clones before the images they were made from.  True if some are
        left (see L{_trash_left}: their clones are not purged yet, or a
        dead client still watches them, or they cannot be deleted).
        """
        assert self._rbd is not None
        entries = [
            e for e in self._rbd.RBD().trash_list(self._ioctx)
            if e["name"].startswith(self._stem) and e["name"] != self.base_image
            and e["id"] not in self._trash_foreign
        ]
        left: dict[str, tuple[str, str]] = {}
        progress = True
        while entries and progress:
            progress = False
            for entry in list(entries):
                if self._purger.stopping:
                    return True
                why = self._purge_one(entry["id"], entry["name"])
                if why is None:
                    entries.remove(entry)
                    left.pop(entry["id"], None)
                    progress = True
                else:
                    left[entry["id"]] = (entry["name"], why)
        with self._lock:
            for image_id, (name, why) in left.items():
                if self._trash_left.get(image_id, ("", ""))[1] != why:
                    log.warn(
                        "removed image {image} (trash id {id}) cannot be purged yet: {why}",
                        image=self.spec(name), id=image_id, why=why,
                    )
            self._trash_left = left
        return bool(left)

    def _purge_one(self, image_id: str, name: str) -> str | None:
        """
        Delete one trashed image of this node; None when it is gone, else
        why it is not.
        """
        assert self._rbd is not None
        rbd = self._rbd
        try:
            image = self._image(name, image_id)
        except rbd.ImageNotFound:
            return None
        try:
            state = self._read_state(image, name)
            if not self._ours(state):
                self._trash_foreign.add(image_id)
                log.warn(
                    "leaving {image} (trash id {id}) alone: it is named like this node's "
                    "layers but is not one (owner: {owner})",
                    image=self.spec(name), id=image_id, owner=state.meta.get(K_OWNER, "none"),
                )
                return None
            try:
                _remove_snap(image)
            except rbd.ImageBusy:
                image.set_snap(SNAP)
                kids = [
                    f"{c['image']}{' (in the trash)' if c['trash'] else ''}"
                    for c in image.list_children2()
                ]
                return f"images made from its snapshot remain: {', '.join(kids[:5])}"
        finally:
            image.close()
        for attempt in range(2):
            try:
                rbd.RBD().trash_remove(self._ioctx, image_id)
                return None
            except rbd.ImageNotFound:
                return None
            except rbd.ImageBusy:
                # Watched: by a dead client of ours (blocklist it and try
                # again), or by a live one somewhere.
                if attempt == 0:
                    self._clear_stale_clients(name, watchers=True, image_id=image_id)
            except rbd.Error as e:
                return _describe(e)
        return "it is still open somewhere (it has watchers); is it mapped on another host?"

    def settle_trash(self) -> list[tuple[str, str, str]]:
        """
        Wait for the purge to try every image removed so far; return what
        is left in the trash: (trash id, image name, why).
        """
        self._purger.settle(max(10.0, 2 * self.timeout))
        with self._lock:
            return [(i, n, why) for i, (n, why) in sorted(self._trash_left.items())]

    def reset(self, layer: LayerInfo) -> None:
        """
        Make the layer equal to its parent again: a fresh clone.
        """
        name = self.image_name(layer.id)
        with self._op("reset", layer.id, name):
            self._discard_image(self._candidate(self._key(layer.id)))
            self._reclone(layer, name)

    def _reclone(self, layer: LayerInfo, name: str) -> None:
        """
        Make the layer equal to its parent again.  Its image may be gone:
        a crash while it was replaced by a clone of a shared image
        (L{_replace_by_clone}) leaves none.
        """
        self._release(layer.id, name, layer.mapping)
        self._fresh_clone(layer, name)

    def _replace_by_clone(
        self, layer: LayerInfo, name: str, shared: str, meta: dict[str, str],
        source: _ImageState | None = None,
    ) -> None:
        """
        Replace the layer's image (the clone Create made) by a clone of the
        shared image C{shared}, or of this node's finished candidate as
        C{source} says.  L{_SharedGone} if that image is gone.  The old
        image goes to the RBD trash, as at Remove, and the background purge
        deletes it (a move takes ~13 ms, a removal ~40 ms).
        """
        self._release(layer.id, name, None)
        self._trash(name)
        faults.point(CRASH_REPLACED)
        self._clone(layer, name, None, shared=shared, meta=meta, source=source)

    def exists(self, layer: LayerInfo) -> bool:
        """
        Whether this node has the layer's image.
        """
        name = self.image_name(layer.id)
        with self._op("look up", layer.id, name):
            state = self._inspect(name)
            return state is not None and self._ours(state)

    def list_layers(self) -> list[str]:
        """
        This node's layers: images named with its prefix and node id, and
        owned by it.
        """
        assert self._rbd is not None
        with self._op("list of the layers", None):
            result = []
            for name in self._rbd.RBD().list(self._ioctx):
                if not name.startswith(self._stem) or name == self.base_image:
                    continue
                if name.startswith(self._candidate("")):
                    continue
                state = self._inspect(name, fresh=True)
                if state is not None and self._ours(state):
                    key = name[len(self._stem) :]
                    if key.startswith(HASHED_KEY):
                        # The ID is in the image's metadata.
                        layer_id = state.meta.get(K_LAYER, key)
                        self._ids[key] = layer_id
                        key = layer_id
                    result.append(key)
            return sorted(result)

    def traverse_paths(self) -> list[str]:
        """
        C{rbd/} and C{rbd/mnt/} (each layer's mount point is covered by its
        filesystem's own root).
        """
        return [self.root, self._mnt]

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        This node's leftovers: mounts under C{mnt/} and C{work/} that no
        mounted layer holds; mappings of layers that are neither mapped nor
        mounted (or gone); images of this node with no layer row.
        """
        held = {self._mountpoint(i) for i, v in layers.items() if v.state == "mounted"}
        found = [
            Orphan("mount", point, "mounted, but no mounted layer holds it")
            for root in (self._mnt, self._work)
            for point in mounts.mounted_under(root)
            if point not in held
        ]
        attached = {self._key(i) for i, v in layers.items() if v.state in ("mapped", "mounted")}
        for mapper in self._usable_mappers():
            for tag, image in self._mapping_tags(mapper):
                if tag in attached:
                    continue
                found.append(
                    Orphan(
                        "device",
                        f"{mapper.name}:{tag}:{image}",
                        f"{image} is mapped ({mapper.name}) for {tag}, which holds no mapping",
                    )
                )
        for layer_id in self.list_layers():
            if layer_id not in layers:
                found.append(
                    Orphan(
                        "object",
                        layer_id,
                        f"image {self.spec(self.image_name(layer_id))} has no layer row",
                    )
                )
        for image_id, name, why in self.settle_trash():
            found.append(
                Orphan("object", f"{TRASH}{image_id}",
                       f"removed layer image {self.spec(name)} is still in the RBD trash: {why}")
            )
        assert self._rbd is not None
        applying = {self._key(i) for i, v in layers.items() if v.state == "applying"}
        stem = self._candidate("")
        for name in self._rbd.RBD().list(self._ioctx):
            key = name[len(stem):]
            if name.startswith(stem) and key not in applying:
                found.append(
                    Orphan("object", name[len(self._stem):],
                           f"candidate shared image {self.spec(name)} of an interrupted apply")
                )
        return found

    def _mapping_tags(self, mapper: Mapper) -> list[tuple[str, str]]:
        # (tag, image) of every mapping this node's fuse mapper holds;
        # kernel and nbd mappings carry no tag, so gc cannot attribute them.
        if not isinstance(mapper, FuseMapper):
            return []
        try:
            tags = sorted(os.listdir(mapper.fuse_root))
        except FileNotFoundError:
            return []
        result = []
        for tag in tags:
            if tag.startswith("."):
                continue
            image = f"{self._stem}{tag}" if _TAG.match(tag) else ""
            if image and mapper.find(image, tag):
                result.append((tag, image))
        return result

    def repair(self, orphan: Orphan) -> None:
        """
        Unmount a stray mount, detach a stray mapping, delete a stray image
        (this node's only).
        """
        if orphan.kind == "mount":
            mounts.unmount(orphan.id)
        elif orphan.kind == "device":
            mapper_name, tag, image = orphan.id.split(":", 2)
            mapper = self._mappers[mapper_name]
            for mapping in mapper.find(image, tag):
                mapper.unmap(mapping)
        elif orphan.kind == "object" and orphan.id.startswith(TRASH):
            # Only the purge deletes from the trash: let it try again.
            image_id = orphan.id[len(TRASH):]
            left = {i: (name, why) for i, name, why in self.settle_trash()}
            if image_id in left:
                name, why = left[image_id]
                raise BackendError(f"rbd purge of {self.spec(name)} (trash id {image_id}): {why}")
        elif orphan.kind == "object" and orphan.id.startswith("candidate."):
            name = f"{self._stem}{orphan.id}"
            with self._op("removal of a stray candidate", None, name):
                self._discard_image(name)
        elif orphan.kind == "object":
            name = self.image_name(orphan.id)
            with self._op("removal of a stray image", orphan.id, name):
                self._destroy(orphan.id, name)
        elif orphan.kind == "shared":
            with self._op("removal of an unused shared image", None, orphan.id):
                self._remove_shared(orphan.id)
        else:
            super().repair(orphan)

    def map(self, layer: LayerInfo) -> Mapping:
        """
        Attach the layer's image: read-write, or read-only once committed.
        """
        assert self.mapper is not None
        name = self.image_name(layer.id)
        with self._op("map", layer.id, name):
            return self._map_layer(layer, name)

    def _map_layer(self, layer: LayerInfo, name: str) -> Mapping:
        assert self.mapper is not None
        state = self._require(name)
        readonly = state.committed
        if not readonly:
            self._clear_stale_clients(name)
            if state.meta.get(K_STATE) != "dirty":
                self._set_meta(name, {K_STATE: "dirty"})
        return self.mapper.map(name, readonly=readonly, tag=self._key(layer.id))

    def unmap(self, layer: LayerInfo) -> None:
        """
        Detach the layer's device: the recorded mapping if it still is one,
        and whatever mapping of the layer exists (after a crash).
        """
        name = self.image_name(layer.id)
        with self._op("unmap", layer.id, name):
            self._release(layer.id, name, layer.mapping)

    def _release(self, layer_id: str, name: str, recorded: Mapping | None) -> None:
        """
        Unmount the layer's mount and detach its own mappings.
        """
        self._unmount(layer_id)
        found = self._mappings(name, self._key(layer_id))
        targets = list(found)
        if recorded is not None and recorded.get("mapper") in self._mappers:
            if not any(m["alive"] and m["device"] == recorded.get("device") for m in found):
                # Its process or device is gone: a client may have died
                # holding the image's lock.
                self._suspect(name)
            if not any(m["device"] == recorded.get("device") for m in found):
                targets.insert(0, recorded)
        if any(not m["alive"] for m in found):
            self._suspect(name)
        for mapping in targets:
            self._unmap(mapping)

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the mapped device at C{mnt/<id>}; return its C{rootfs}.
        """
        name = self.image_name(layer.id)
        with self._op("mount", layer.id, name):
            mapping = self._live_mapping(layer, name)
            if mapping is None:
                raise BackendError("it is not mapped")
            return self._mount_layer(layer, mapping)

    def _live_mapping(self, layer: LayerInfo, name: str) -> Mapping | None:
        recorded = layer.mapping
        if recorded is not None and recorded.get("mapper") in self._mappers:
            if self._mapper_for(recorded).alive(recorded):
                return recorded
            self._suspect(name)
        for mapping in self._mappings(name, self._key(layer.id)):
            if mapping["alive"]:
                return mapping
        return None

    def _mount_layer(self, layer: LayerInfo, mapping: Mapping) -> str:
        target = self._mountpoint(layer.id)
        device = mapping["device"]
        current = [e for e in mounts.mount_table() if e.mountpoint == target]
        if current:
            if current[-1].source == device:
                return os.path.join(target, ROOTFS)
            self._unmount(layer.id)
        os.makedirs(target, mode=0o700, exist_ok=True)
        self._mount_device(device, target, bool(mapping.get("readonly")))
        rootfs = os.path.join(target, ROOTFS)
        if not os.path.isdir(rootfs):
            mounts.unmount(target)
            raise BackendError(f"the filesystem on {device} has no {ROOTFS}/ directory")
        return rootfs

    def unmount(self, layer: LayerInfo) -> None:
        """
        Unmount the layer (and anything mounted below it).
        """
        with self._op("unmount", layer.id):
            self._unmount(layer.id)

    def _unmount(self, layer_id: str) -> None:
        for point in mounts.mounted_under(self._mountpoint(layer_id)):
            mounts.unmount(point)

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer again if its mount is gone, mapping it again first
        if its device is gone too.
        """
        name = self.image_name(layer.id)
        with self._op("remount", layer.id, name):
            mapping = self._live_mapping(layer, name)
            if mapping is None:
                self._release(layer.id, name, layer.mapping)
                mapping = self._map_layer(layer, name)
            return self._mount_layer(layer, mapping)

    # -- mounts for containerd ------------------------------------------------------------

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """
        A bind mount of the layer's mounted C{rootfs} (read-only for a
        view): the filesystem on a layer's device keeps the layer's tree in
        its C{rootfs/} directory (beside C{lost+found}), which a mount of
        the device itself would not show, so the layer stays mapped and
        mounted here while the snapshot exists (L{holds_client_mounts}).
        """
        rootfs = os.path.join(self._mountpoint(layer.id), ROOTFS)
        if not os.path.isdir(rootfs):
            raise BackendError(f"rbd mounts of layer {layer.id}: it is not mounted at {rootfs}")
        return [MountSpec("bind", rootfs, ("ro" if view else "rw", "rbind"))]

    def cleanup(self) -> None:
        """
        Purge the images that removals moved to the RBD trash (a pass of
        the purge, waited for); what cannot be purged yet stays for later.
        """
        left = self.settle_trash()
        if left:
            log.info("rbd cleanup: {n} removed image(s) still in the trash", n=len(left))

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        The bytes the layer's image holds of its own (the extents written
        since it was cloned from its parent), as containerd's devmapper
        snapshotter reports a thin device's; inodes are not counted (0).
        """
        name = self.image_name(layer.id)
        with self._op("usage", layer.id, name), self._open(name) as image:
            total = 0

            def count(offset: int, length: int, exists: bool) -> None:
                nonlocal total
                if exists:
                    total += length

            image.diff_iterate(0, image.size(), None, count, include_parent=False)
            return total, 0

    # -- content --------------------------------------------------------------------------

    def apply(self, layer: LayerInfo, stream: IO[bytes], id_map: IDMap) -> int:
        """
        Apply a layer tar to a fresh clone (a retried ApplyDiff starts from
        the parent's content again) and return the size of the changes.
        On failure the layer is a fresh clone again.

        A tar that holds only a thin descriptor makes the layer a clone of
        the snapshot it names (L{_apply_thin}).  With C{share}, the layer is
        extracted into a candidate shared image instead, which is published
        under its chain ID, or discarded if the pool already has that chain
        (L{_apply_shared}).
        """
        name = self.image_name(layer.id)
        with self._op("apply", layer.id, name):
            self._release(layer.id, name, layer.mapping)
            state = self._require(name)
            if state.committed:
                self._drop_snapshot(name)
            if state.meta.get(K_STATE) != "clean":
                self._reclone(layer, name)
            reader = thin.HashingReader(cast(BinaryIO, stream))
            try:
                descriptor, body = thin.sniff(reader)
                if descriptor is not None:
                    return self._apply_thin(layer, name, descriptor, id_map)
                parent_chain = self._parent_chain(layer, id_map)
                if parent_chain is not None:
                    return self._apply_shared(layer, name, body, reader, parent_chain, id_map)
                self._set_meta(name, {K_STATE: "dirty"})
                with self._work_mount(name, readonly=False, bulk_write=True) as (top, _device):
                    root = os.path.join(top, ROOTFS)
                    stats = archive.apply_layer(
                        body, root, ApplyMode.INPLACE, id_map, track_changes=True
                    )
                    return self._size_against_parent(layer, root, stats)
            except BaseException:
                try:
                    self._discard_image(self._candidate(self._key(layer.id)))
                    self._reclone(layer, name)
                except Exception as e:
                    log.error(
                        "cannot empty layer {id} again after a failed apply: {error}",
                        id=layer.id,
                        error=e,
                    )
                raise

    def _size_against_parent(
        self, layer: LayerInfo, root: str, stats: archive.ApplyStats
    ) -> int:
        """
        The size of the layer's changes: as the extraction tracked them
        (the clone held its parent's tree), or, where it could not tell,
        by comparing the tree with its parent's (a read-only mapping of
        the parent, and a walk of both trees).
        """
        if stats.changes_size is not None:
            return stats.changes_size
        log.info("layer {id}: sizing its changes against its parent's tree", id=layer.id)
        if layer.parent is None:
            return archive.changes_size(root, archive.changes_dirs(root, None))
        with self._view(layer.parent) as old:
            return archive.changes_size(root, archive.changes_dirs(root, old))

    # -- shared images and thin layers ------------------------------------------------

    def _shared_state(self, name: str) -> _ImageState | None:
        """
        A shared image as it is now in the pool, if it is a published one
        (owned by no node, with its protected snapshot); None otherwise.
        Never cached: any node's gc may remove it.
        """
        state = self._inspect(name, fresh=True)
        if state is None or state.meta.get(K_OWNER) != SHARED:
            return None
        if SNAP not in state.snaps or not state.snaps[SNAP][0]:
            return None
        return state

    def _discard_image(self, name: str) -> None:
        """
        Remove one of this node's unpublished candidates (and its snapshot),
        if it exists, whatever its owner says.
        """
        assert self._rbd is not None
        rbd = self._rbd
        for mapping in self._mappings(name):
            self._unmap(mapping)
        try:
            with self._open(name) as image:
                _remove_snap(image)
        except rbd.ImageNotFound:
            self._forget(name)
            return
        with contextlib.suppress(rbd.ImageNotFound):
            rbd.RBD().remove(self._ioctx, name)
        self._forget(name)
        with self._lock:
            self._checked.discard(name)

    def _ensure_shared_base(self) -> _ImageState:
        """
        The pool's shared base image (an empty formatted filesystem, as a
        node's own base), made and published by the first node that needs
        it; returns its state.
        """
        assert self._rbd is not None
        for _attempt in range(8):
            state = self._shared_state(self.shared_base)
            if state is not None:
                return state
            candidate = self._candidate("base")
            self._discard_image(candidate)
            self._rbd.RBD().create(
                self._ioctx, candidate, self.base_size, order=self.object_size.bit_length() - 1,
                old_format=False, data_pool=self.data_pool
            )
            with self._lock:
                self._checked.add(candidate)
            self._set_meta(
                candidate,
                {K_OWNER: self.node_id, K_LAYER: "candidate", K_FS: self.fs, K_DEPTH: "0",
                 K_CHAIN: NONE},
            )
            self._format_base(candidate)
            self._snapshot(candidate)
            if not self._publish(candidate, self.shared_base):
                # Another node published it first: use that one.
                self._discard_image(candidate)
        state = self._shared_state(self.shared_base)
        if state is not None:
            return state
        raise BackendError(f"cannot publish the shared base image {self.spec(self.shared_base)}")

    def _publish(self, candidate: str, target: str) -> bool:
        """
        Give a finished candidate (snapshot protected) its shared name, as
        an image of no node.  Renaming is atomic in the pool: False if
        another node published that name first.
        """
        assert self._rbd is not None
        self._set_meta(candidate, {K_OWNER: SHARED, K_LAYER: "shared", K_PARENT: NONE})
        self._forget(candidate)
        try:
            self._rbd.RBD().rename(self._ioctx, candidate, target)
        except self._rbd.ImageExists:
            return False
        return True

    def _parent_chain(self, layer: LayerInfo, id_map: IDMap) -> str | None:
        """
        The chain ID of the tree the layer is applied on ("" for none), if
        the layer can be shared: sharing is on, ids are not remapped, and
        its parent is an unchanged clone of a shared image.
        """
        if not self.share or not id_map.identity or tuple(layer.root_ids) != (0, 0):
            return None
        if layer.parent is None:
            return ""
        parent = self._inspect(self.image_name(layer.parent))
        if parent is None:
            return None
        chain = parent.meta.get(K_CHAIN, NONE)
        return chain if chain.startswith("sha256:") else None

    def _build_candidate(
        self, key: str, parent_chain: str, body: Any, reader: thin.HashingReader,
        id_map: IDMap, measure: LayerInfo | None, chain: str | None = None,
    ) -> tuple[str, str, int]:
        """
        Extract a layer tar into a new candidate cloned from the shared
        image of C{parent_chain}, snapshot it, and return (candidate, chain
        ID, size of the changes against C{measure}'s parent, or 0).  The
        chain ID follows from the tar's digest, unless C{chain} gives it (a
        tar txgraph wrote itself from a layer containerd filled).
        """
        assert self._rbd is not None
        if parent_chain:
            source = self.shared_image(parent_chain)
            pstate = self._shared_state(source)
        else:
            # Looked at as it is now, like any shared image.
            source, pstate = self.shared_base, self._ensure_shared_base()
        if pstate is None or (parent_chain and pstate.meta.get(K_CHAIN) != parent_chain):
            raise BackendError(
                f"the shared image {self.spec(source)} of chain {parent_chain or '(base)'} "
                "is missing; load the image's lower layers again"
            )
        candidate = self._candidate(key)
        self._discard_image(candidate)
        self._rbd.RBD().clone(
            self._ioctx, source, SNAP, self._ioctx, candidate, data_pool=self.data_pool
        )
        self._remember(
            _ImageState(name=candidate, meta=dict(pstate.meta), size=pstate.snaps[SNAP][1],
                        parent=source)
        )
        with self._lock:
            self._checked.add(candidate)
        depth = min(pstate.depth, 1 << 16) + 1
        self._set_meta(
            candidate,
            {K_OWNER: self.node_id, K_LAYER: "candidate", K_PARENT: parent_chain or NONE,
             K_STATE: "dirty", K_DEPTH: str(depth), K_CHAIN: NONE},
        )
        size = 0
        with self._work_mount(candidate, readonly=False, bulk_write=True) as (top, _device):
            root = os.path.join(top, ROOTFS)
            stats = archive.apply_layer(
                body, root, ApplyMode.INPLACE, id_map, track_changes=measure is not None
            )
            if measure is not None:
                size = self._size_against_parent(measure, root, stats)
        reader.drain()
        if chain is None:
            chain = thin.chain_id(parent_chain or None, reader.digest())
        if self.flatten_depth and depth >= self.flatten_depth:
            with self._open(candidate) as image:
                image.flatten()
            depth = 0
        self._set_meta(candidate, {K_CHAIN: chain, K_DEPTH: str(depth)})
        self._snapshot(candidate)
        return candidate, chain, size

    def _settle(self, candidate: str, chain: str, layer: LayerInfo | None, name: str) -> bool:
        """
        Make the candidate of C{chain} the pool's shared image of that chain,
        or discard it if the pool has one already; the layer (if any)
        becomes a clone of the shared image.  Returns whether the pool
        already had it.  Races with other nodes publishing the same chain,
        or removing it, end in one shared image that the layer clones.
        """
        target = self.shared_image(chain)
        meta = {K_CHAIN: chain, K_STATE: "shared"}
        for _attempt in range(10):
            existing = self._shared_state(target)
            if existing is not None:
                if existing.meta.get(K_CHAIN) != chain:
                    raise BackendError(
                        f"image {self.spec(target)} does not hold chain {chain} "
                        f"(its {K_CHAIN} is {existing.meta.get(K_CHAIN)!r}); refusing to use it"
                    )
                try:
                    if layer is not None:
                        self._replace_by_clone(layer, name, target, meta)
                except _SharedGone:
                    time.sleep(0.1)
                    continue
                self._discard_image(candidate)
                return True
            # The layer is cloned from the candidate before the rename, so
            # a gc elsewhere cannot take the published image from under it.
            if layer is not None:
                built = self._inspect(candidate, fresh=True)
                if built is None:
                    raise BackendError(f"the candidate {self.spec(candidate)} is gone")
                self._replace_by_clone(layer, name, candidate, meta, built)
            if self._publish(candidate, target):
                if layer is not None:
                    # Renamed: the layer's parent is the shared image now.
                    self._update(name, parent=target)
                return False
            # Another node was first: use its image instead of ours.
            time.sleep(0.05)
        raise BackendError(f"cannot settle the shared image {self.spec(target)} (it keeps changing)")

    def _apply_shared(
        self, layer: LayerInfo, name: str, body: Any, reader: thin.HashingReader,
        parent_chain: str, id_map: IDMap,
    ) -> int:
        candidate, chain, size = self._build_candidate(
            self._key(layer.id), parent_chain, body, reader, id_map, layer
        )
        existed = self._settle(candidate, chain, layer, name)
        log.info(
            "layer {id}: chain {chain} {how} {image}",
            id=layer.id,
            chain=chain,
            how="is already in the pool as" if existed else "published as",
            image=self.spec(self.shared_image(chain)),
        )
        return size

    def _apply_thin(self, layer: LayerInfo, name: str, raw: bytes, id_map: IDMap) -> int:
        """
        Make the layer a clone of the snapshot a thin descriptor names (no
        extraction), with the descriptor written at its path so that the
        layer reads back as the tar it was loaded from.
        """
        descriptor = thin.parse(raw)
        if layer.parent is not None:
            raise ThinDescriptorError(
                f"a thin descriptor must be its image's only layer; this one is on top of "
                f"layer {layer.parent}"
            )
        if not id_map.identity or tuple(layer.root_ids) != (0, 0):
            raise ThinDescriptorError(
                "thin images cannot be used with dockerd's userns-remap (their layers "
                "hold the image's own ids)"
            )
        if descriptor.fsid != self._fsid:
            raise ThinDescriptorError(
                f"thin descriptor points to Ceph cluster {descriptor.fsid}, but this node "
                f"uses cluster {self._fsid}"
            )
        ours = (self.pool, self.namespace or "")
        if (descriptor.pool, descriptor.namespace) != ours:
            where = "/".join(p for p in (descriptor.pool, descriptor.namespace) if p)
            raise ThinDescriptorError(
                f"thin descriptor points to pool {where}, but this node keeps its layers in "
                f"{'/'.join(p for p in ours if p)}"
            )
        if descriptor.filesystem != self.fs:
            raise ThinDescriptorError(
                f"thin descriptor holds {descriptor.filesystem} snapshots, but this node "
                f"uses {self.fs}"
            )
        top = descriptor.top
        state = self._shared_state(top.image)
        if state is None:
            raise ThinDescriptorError(
                f"thin descriptor names snapshot {self.spec(top.image)}@{SNAP}, which does "
                "not exist in the pool (or is not a protected txgraph shared snapshot)"
            )
        if state.meta.get(K_CHAIN) != top.chain_id:
            raise ThinDescriptorError(
                f"thin descriptor: snapshot {self.spec(top.image)}@{SNAP} holds chain "
                f"{state.meta.get(K_CHAIN) or '(none)'}, not {top.chain_id}"
            )
        try:
            self._replace_by_clone(layer, name, top.image, {K_STATE: "thin"})
        except _SharedGone:
            raise ThinDescriptorError(
                f"thin descriptor names snapshot {self.spec(top.image)}@{SNAP}, which was "
                "removed while this layer was made"
            ) from None
        with self._work_mount(name, readonly=False) as (top_dir, _device):
            path = os.path.join(top_dir, ROOTFS, thin.DESCRIPTOR_PATH)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, raw)
                os.fchmod(fd, 0o644)
                os.fchown(fd, 0, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(path, (0, 0), follow_symlinks=False)
        return len(raw)

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """
        Store a layer tar (a file: C{docker save}'s C{layer.tar}) as the
        shared image of its chain, on the chain C{parent_chain} ("" for the
        first layer), unless the pool has it already.  Checks that the
        file's digest is C{diff_id}.  With no C{path}, only says whether the
        pool has the chain.  For C{txgraph-admin make-thin}.
        """
        chain = thin.chain_id(parent_chain or None, diff_id)
        target = self.shared_image(chain)
        with self._op("publication of a shared layer", None, target):
            if self._shared_state(target) is not None:
                return {"chain_id": chain, "image": target, "existed": True}
            if path is None:
                return {"chain_id": chain, "image": target, "existed": False}
            key = "publish-" + chain.split(":", 1)[1][:32]
            with open(path, "rb") as f:
                reader = thin.HashingReader(cast(BinaryIO, f), progress)
                try:
                    candidate, built, _size = self._build_candidate(
                        key, parent_chain, reader, reader, IDMap(), None
                    )
                    if built != chain:
                        raise BackendError(
                            f"{path} has digest {reader.digest()}, not the diff ID {diff_id} "
                            "the image's config gives"
                        )
                    existed = self._settle(candidate, chain, None, "")
                except BaseException:
                    self._discard_image(self._candidate(key))
                    raise
            return {"chain_id": chain, "image": target, "existed": existed}

    # -- containerd's chains: the remote-snapshot shortcut ---------------------------

    def shared_chain_parent(self, chain: str) -> str | None:
        """
        The chain the pool's shared image of C{chain} was made on ("" for
        the shared base), read from its RBD parent; None if the pool has no
        such image, or if its parent is no shared image (flattened at
        C{flatten_depth}: then it is not offered to containerd).
        """
        if not self.share:
            return None
        target = self.shared_image(chain)
        with self._op("look up of a shared layer", None, target):
            state = self._shared_state(target)
            if state is None or state.meta.get(K_CHAIN) != chain or state.parent is None:
                return None
            if state.parent == self.shared_base:
                return ""
            parent = self._shared_state(state.parent)
            if parent is None or not state.parent.startswith(self._shared_stem):
                return None
            parent_chain = parent.meta.get(K_CHAIN, NONE)
            if not parent_chain.startswith("sha256:"):
                return None
            return parent_chain

    def adopt_shared(self, layer: LayerInfo, chain: str) -> int:
        """
        Make the layer (new, uncommitted) a clone of the pool's shared image
        of C{chain}, as an ApplyDiff whose chain the pool has already ends
        (L{_settle}): nothing is extracted, nothing written.  Returns 0,
        the bytes the layer holds of its own (measuring the shared image
        would take a diff_iterate over it, ~0.4 s).  On failure the layer
        is a fresh clone of its parent again.
        """
        name = self.image_name(layer.id)
        target = self.shared_image(chain)
        with self._op("adoption of a shared layer", layer.id, name):
            self._release(layer.id, name, layer.mapping)
            state = self._require(name)
            if state.committed:
                self._drop_snapshot(name)
            try:
                shared = self._shared_state(target)
                if shared is None or shared.meta.get(K_CHAIN) != chain:
                    raise BackendError(
                        f"the pool has no shared image {self.spec(target)} of chain {chain}"
                    )
                try:
                    self._replace_by_clone(
                        layer, name, target, {K_CHAIN: chain, K_STATE: "shared"}
                    )
                except _SharedGone:
                    raise BackendError(
                        f"the shared image {self.spec(target)} of chain {chain} was removed "
                        "while the layer was made from it"
                    ) from None
            except BaseException:
                try:
                    self._reclone(layer, name)
                except Exception as e:
                    log.error(
                        "cannot empty layer {id} again after a failed adoption: {error}",
                        id=layer.id,
                        error=e,
                    )
                raise
            log.info(
                "layer {id}: chain {chain} taken from the pool's {image}",
                id=layer.id, chain=chain, image=self.spec(target),
            )
            return 0

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        """
        Publish a committed layer that containerd filled through its mount
        as the shared image of C{chain_id}: its changes against its parent
        (a tar txgraph writes, streamed through a pipe) are extracted into
        a candidate cloned from the shared image of C{parent_chain}, which
        is then settled like an ApplyDiff's (L{_settle}).  The layer itself
        stays as it is.  Returns whether it was published now.
        """
        if not self.share or tuple(layer.root_ids) != (0, 0):
            return False
        target = self.shared_image(chain_id)
        key = self._key(layer.id)
        with self._op("publication of a containerd layer", layer.id, target):
            if self._shared_state(target) is not None:
                return False
            try:
                with self._views(layer, chain, layer.parent) as (new, old):
                    candidate = self._candidate_from_tree(key, parent_chain, chain_id, new, old)
                existed = self._settle(candidate, chain_id, None, "")
            except BaseException:
                self._discard_image(self._candidate(key))
                raise
            log.info(
                "layer {id}: chain {chain} {how} {image}",
                id=layer.id,
                chain=chain_id,
                how="was published meanwhile as" if existed else "published as",
                image=self.spec(target),
            )
            return not existed

    def _candidate_from_tree(
        self, key: str, parent_chain: str, chain_id: str, new: str, old: str | None
    ) -> str:
        """
        A candidate of C{chain_id} holding the changes from tree C{old} to
        tree C{new}: a thread writes their tar into a pipe that
        L{_build_candidate} extracts.
        """
        changes = archive.changes_dirs(new, old)
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(write_fd, "wb") as out:
                    archive.export_changes(new, changes, cast(BinaryIO, out), IDMap())
            except BaseException as e:  # handed to the reading thread
                failure.append(e)

        writer = threading.Thread(target=produce, name=f"txgraph-publish-{key[:12]}")
        writer.start()
        try:
            with os.fdopen(read_fd, "rb") as inp:
                reader = thin.HashingReader(cast(BinaryIO, inp))
                candidate, _chain, _size = self._build_candidate(
                    key, parent_chain, reader, reader, IDMap(), None, chain=chain_id
                )
        finally:
            writer.join()
        if failure:
            raise BackendError(f"cannot write the changes of {new}: {_describe(failure[0])}")
        return candidate

    def shared_info(self) -> dict[str, str]:
        """
        Where this node's shared images are: what a thin descriptor records.
        """
        return {
            "fsid": self._fsid,
            "pool": self.pool,
            "namespace": self.namespace or "",
            "filesystem": self.fs,
            "stem": self._shared_stem,
        }

    def shared_orphans(self, min_age: float) -> list[Orphan]:
        """
        Shared images that nothing uses: no image in the pool (any node's
        layer or candidate) is cloned from them, except other unused shared
        images; and older than C{min_age} seconds.  Leaves come first, so
        removing them in order frees whole chains.  Removal is checked by
        RBD itself (unprotecting a snapshot with clones fails), so two nodes'
        gc never remove what a third one starts to use meanwhile.
        """
        assert self._rbd is not None
        rbd = self._rbd
        # Clones in the trash still count as users: purge them first.
        self.settle_trash()
        with self._op("list of the shared images", None):
            now = time.time()
            children: dict[str, list[str]] = {}
            for name in self._rbd.RBD().list(self._ioctx):
                if not name.startswith(self._shared_stem):
                    continue
                try:
                    image = rbd.Image(self._ioctx, name, read_only=True)
                except rbd.ImageNotFound:
                    continue
                try:
                    if dict(image.metadata_list()).get(K_OWNER) != SHARED:
                        continue
                    if now - image.create_timestamp().timestamp() < min_age:
                        continue
                    kids: list[str] = []
                    if any(s["name"] == SNAP for s in image.list_snaps()):
                        image.set_snap(SNAP)
                        kids = [
                            c["image"] if c["pool"] == self.pool and not c["trash"]
                            and (c["pool_namespace"] or None) == self.namespace else "\0"
                            for c in image.list_children2()
                        ]
                    children[name] = kids
                except rbd.ImageNotFound:
                    continue
                finally:
                    image.close()
        unused: list[str] = []
        changed = True
        while changed:
            changed = False
            for name, kids in children.items():
                if name not in unused and all(k in unused for k in kids):
                    unused.append(name)
                    changed = True
        return [
            Orphan("shared", name, f"shared image of chain {name[len(self._shared_stem):][:12]} "
                   "that no image is cloned from")
            for name in unused
        ]

    def _remove_shared(self, name: str) -> None:
        """
        Remove an unused shared image.  RBD decides: unprotecting fails
        while the snapshot has clones.  Clones that are unused shared images
        themselves (another node's gc may be removing them at this moment)
        are waited for; any other clone means the image is in use again, and
        it stays.  Another node removing this very image is fine.
        """
        assert self._rbd is not None
        rbd = self._rbd
        deadline = time.monotonic() + max(5.0, self.timeout)
        while True:
            try:
                state = self._inspect(name, fresh=True)
                break
            except rbd.Error:
                # Being changed by another node's gc right now.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if state is None:
            return
        if not name.startswith(self._shared_stem) or state.meta.get(K_OWNER) != SHARED:
            raise BackendError(f"{self.spec(name)} is not a shared txgraph image")
        while True:
            try:
                with self._open(name) as image:
                    _remove_snap(image)
                rbd.RBD().remove(self._ioctx, name)
                return
            except rbd.ImageBusy:
                try:
                    users = [c for c in self._children(name) if self._shared_stem not in c]
                except rbd.Error:
                    # Changed under us (another node's gc): look again.
                    users = []
                if users:
                    raise BackendError(
                        f"{self.spec(name)} is in use again ({', '.join(users[:3])} was "
                        "cloned from it since gc looked); it stays"
                    ) from None
            except rbd.ImageNotFound:
                return
            except rbd.Error:
                # Another node's gc is unprotecting or removing it right now.
                with contextlib.suppress(rbd.Error):
                    if self._inspect(name, fresh=True) is None:
                        return
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{self.spec(name)} is still being changed by another node; it is left to it"
                )
            time.sleep(0.2)
            with contextlib.suppress(rbd.Error):
                if self._inspect(name, fresh=True) is None:
                    return

    def cluster_reads(self) -> dict[str, dict[str, Any]]:
        """
        Per mounted layer: the bytes its mapping read from the cluster
        through librbd (lazily: a clone reads its parents' blocks only when
        they are read), as the mapping's performance counters give them.
        """
        result: dict[str, dict[str, Any]] = {}
        if not os.path.isdir(self._mnt):
            return result
        for key in sorted(os.listdir(self._mnt)):
            if not _TAG.match(key) or not mounts.is_mountpoint(os.path.join(self._mnt, key)):
                continue
            name = f"{self._stem}{key}"
            # A layer's own mapping is tagged with its key; asking its admin
            # socket directly spares a scan of every process per layer.
            for mapper in self._usable_mappers():
                counters = mapper.read_counters({"tag": key, "image": name})
                if counters is not None:
                    state = self._inspect(name)
                    result[self._layer_of(key)] = {
                        "image": self.spec(name),
                        "bytes_read": counters["rd_bytes"],
                        "reads": counters["rd"],
                        "image_size": state.size if state else None,
                    }
                    break
        return result

    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: IO[bytes],
        id_map: IDMap,
    ) -> None:
        """
        The layer tar of the changes between C{parent} and the layer.
        """
        name = self.image_name(layer.id)
        with self._op("diff", layer.id, name):
            with self._views(layer, chain, parent) as (new, old):
                archive.export_changes(
                    new, archive.changes_dirs(new, old), cast(BinaryIO, out), id_map
                )

    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> list[Change]:
        """
        The changes between C{parent} and the layer (moby's naive diff).
        """
        name = self.image_name(layer.id)
        with self._op("changes", layer.id, name):
            with self._views(layer, chain, parent) as (new, old):
                return archive.changes_dirs(new, old)

    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> int:
        """
        The size of the changed files, as ApplyDiff reported it.
        """
        name = self.image_name(layer.id)
        with self._op("diff size", layer.id, name):
            with self._views(layer, chain, parent) as (new, old):
                return archive.changes_size(new, archive.changes_dirs(new, old))

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        Where the layer lives (no cluster call).
        """
        name = self.image_name(layer.id)
        parent = self.image_name(layer.parent) if layer.parent else self.base_image
        mapping = layer.mapping or {}
        return {
            "Pool": self.pool,
            "Namespace": self.namespace or "",
            "Image": self.spec(name),
            "Parent": f"{self.spec(parent)}@{SNAP}",
            "Mapper": str(mapping.get("mapper") or (self.mapper.name if self.mapper else "")),
            "Device": str(mapping.get("device") or ""),
            "MountPoint": os.path.join(self._mountpoint(layer.id), ROOTFS),
            "Filesystem": self.fs,
        }
