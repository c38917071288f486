"""
The rbd backend's options (C{--storage-opt txgraph.rbd.KEY=VALUE}): each
one's parser, the table of them (L{OPTIONS}), and the parsed values as one
L{Settings} that every part of the backend reads.
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass
from typing import Any

from txgraph.backends import BackendOption, parse_size
from txgraph.backends.rbd.mappers import AUTO_ORDER, MAPPERS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")

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


def _container_layers(value: str) -> str:
    if value not in ("pool", "local"):
        raise ValueError("container layers are kept in the pool or local")
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


OPTIONS = (
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
    BackendOption(
        "open_ahead",
        "open the image of a layer that will likely be committed (image and -init "
        "layers, containerd's unpacking) once it is mapped, so that its commit need "
        "not open it (yes/no)",
        "yes",
        _yes,
    ),
    BackendOption(
        "container_layers",
        "where containers' read-write layers are kept: pool (RBD clones, like "
        "image layers) or local (overlayfs directories under the state directory, "
        "over the image's device mapped read-only once per host and kept while "
        "containers use it)",
        "pool",
        _container_layers,
    ),
)


@dataclass(frozen=True)
class Settings:
    """
    The backend's options, parsed (see L{OPTIONS} for each one's meaning);
    C{node_id} is resolved (L{default_node_id} when not given).
    """

    conf: str
    client: str
    keyring: str | None
    pool: str
    data_pool: str | None
    namespace: str | None
    prefix: str
    base_size: int
    fs: str
    object_size: int
    mkfs_args: list[str]
    mount_options: str
    mapper_choice: str
    node_id: str
    timeout: float
    flatten_depth: int
    unmap_delay: float
    share: bool
    open_ahead: bool
    container_layers: str = "pool"

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Settings:
        """
        The settings of parsed options (L{txgraph.backends.parse_options}).
        """
        return cls(
            conf=opts["conf"],
            client=opts["client"],
            keyring=opts["keyring"],
            pool=opts["pool"],
            data_pool=opts["data_pool"],
            namespace=opts["namespace"] or None,
            prefix=opts["prefix"],
            base_size=opts["base_size"],
            fs=opts["fs"],
            object_size=opts["object_size"],
            mkfs_args=list(opts["mkfs_args"]),
            mount_options=opts["mount_options"],
            mapper_choice=opts["mapper"],
            node_id=opts["node_id"] or default_node_id(),
            timeout=opts["timeout"],
            flatten_depth=opts["flatten_depth"],
            unmap_delay=opts["unmap_delay"],
            share=opts["share"],
            open_ahead=opts["open_ahead"],
            container_layers=opts["container_layers"],
        )
