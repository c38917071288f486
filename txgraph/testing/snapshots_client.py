"""A Python client of containerd's Snapshots gRPC service, and mount(2) of the
mounts a snapshotter returns exactly as containerd's ``mount.All`` does (the
option table, the read-only bind remount, relative ``lowerdir``s from a
chdir'd child when the options exceed a page).  Used by the snapshotter suite
(:mod:`txgraph.testing.snapshotter_suite`) and by tests that drive a
snapshotter directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from txgraph import mounts
from txgraph.api.containerd.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc

KIND_VIEW = snapshots_pb2.VIEW
KIND_ACTIVE = snapshots_pb2.ACTIVE
KIND_COMMITTED = snapshots_pb2.COMMITTED

#: The gRPC metadata key containerd reads the namespace from.
NAMESPACE_HEADER = "containerd-namespace"


# -- the client ------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """A snapshot's info (Go: snapshots.Info); times in nanoseconds since the epoch."""

    name: str
    parent: str
    kind: int
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, info: snapshots_pb2.Info) -> Info:
        """Convert the wire message."""
        return cls(
            name=info.name, parent=info.parent, kind=info.kind,
            created=info.created_at.ToNanoseconds(), updated=info.updated_at.ToNanoseconds(),
            labels=dict(info.labels),
        )

    def to_proto(self) -> snapshots_pb2.Info:
        """Convert to the wire message (all fields, as containerd's proxy client sends them)."""
        created, updated = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
        created.FromNanoseconds(self.created)
        updated.FromNanoseconds(self.updated)
        return snapshots_pb2.Info(
            name=self.name, parent=self.parent, kind=self.kind,  # type: ignore[arg-type]
            created_at=created, updated_at=updated, labels=self.labels,
        )


@dataclass(frozen=True)
class Target:
    """One snapshotter endpoint, as one test sees it.

    ``address`` is a gRPC target (``unix:///path/to/socket``); ``snapshotter``
    goes in every request's ``snapshotter`` field; ``namespace``, if any, in
    the ``containerd-namespace`` metadata (containerd's own socket needs it).
    """

    address: str
    snapshotter: str
    namespace: str | None = None


class Snapshotter:
    """The Go ``snapshots.Snapshotter`` interface over the gRPC service (like
    containerd's proxy client)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target.address)
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.metadata = (
            ((NAMESPACE_HEADER, target.namespace),) if target.namespace is not None else ()
        )

    def _call(self, method: str, request: Any, timeout: float = 120.0) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def prepare(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        """Prepare an active snapshot; its mounts."""
        reply = self._call("Prepare", snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.target.snapshotter, key=key, parent=parent, labels=labels or {},
        ))
        return list(reply.mounts)

    def view(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        """Create a read-only view; its mounts."""
        reply = self._call("View", snapshots_pb2.ViewSnapshotRequest(
            snapshotter=self.target.snapshotter, key=key, parent=parent, labels=labels or {},
        ))
        return list(reply.mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        """The mounts of an active snapshot or view."""
        reply = self._call("Mounts", snapshots_pb2.MountsRequest(
            snapshotter=self.target.snapshotter, key=key,
        ))
        return list(reply.mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        """Commit the active snapshot ``key`` as ``name``."""
        self._call("Commit", snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.target.snapshotter, name=name, key=key, labels=labels or {},
        ))

    def remove(self, key: str) -> None:
        """Remove a snapshot."""
        self._call("Remove", snapshots_pb2.RemoveSnapshotRequest(
            snapshotter=self.target.snapshotter, key=key,
        ))

    def stat(self, key: str) -> Info:
        """A snapshot's info."""
        reply = self._call("Stat", snapshots_pb2.StatSnapshotRequest(
            snapshotter=self.target.snapshotter, key=key,
        ))
        return Info.from_proto(reply.info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Update the mutable fields (``fieldpaths``, or all) of ``info``; the result."""
        reply = self._call("Update", snapshots_pb2.UpdateSnapshotRequest(
            snapshotter=self.target.snapshotter, info=info.to_proto(),
            update_mask=field_mask_pb2.FieldMask(paths=list(fieldpaths)),
        ))
        return Info.from_proto(reply.info)

    def walk(self, *filters: str) -> list[Info]:
        """Every snapshot matching any of ``filters`` (all without filters)."""
        replies = self.stub.List(
            snapshots_pb2.ListSnapshotsRequest(
                snapshotter=self.target.snapshotter, filters=list(filters),
            ),
            metadata=self.metadata, timeout=120.0,
        )
        return [Info.from_proto(info) for reply in replies for info in reply.info]

    def usage(self, key: str) -> tuple[int, int]:
        """(size, inodes) of a snapshot."""
        reply = self._call("Usage", snapshots_pb2.UsageRequest(
            snapshotter=self.target.snapshotter, key=key,
        ))
        return reply.size, reply.inodes

    def close(self) -> None:
        """Close the client's channel (idempotent, as grpc's close is)."""
        self.channel.close()


def grpc_code(call: Callable[[], object]) -> grpc.StatusCode | None:
    """Run ``call``; the gRPC status code it failed with, or None if it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return,attr-defined]
    return None


def grpc_error(call: Callable[[], object]) -> grpc.RpcError | None:
    """Run ``call``; the gRPC error it failed with, or None if it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return error
    return None


# -- mounting, as containerd's mount package does -----------------------------------

#: containerd's mount option table (mount/mount_linux.go): option -> (clear, flag).
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, 16),  # MS_SYNCHRONOUS
    "atime": (True, 1024),  # MS_NOATIME
    "bind": (False, 4096),
    "defaults": (False, 0),
    "dev": (True, 4),
    "diratime": (True, 2048),
    "dirsync": (False, 128),
    "exec": (True, 8),
    "mand": (False, 64),
    "noatime": (False, 1024),
    "nodev": (False, 4),
    "nodiratime": (False, 2048),
    "noexec": (False, 8),
    "nomand": (True, 64),
    "norelatime": (True, 1 << 21),
    "nostrictatime": (True, 1 << 24),
    "nosuid": (False, 2),
    "rbind": (False, 4096 | 16384),
    "relatime": (False, 1 << 21),
    "remount": (False, 32),
    "ro": (False, 1),
    "rw": (True, 1),
    "strictatime": (False, 1 << 24),
    "suid": (True, 2),
    "sync": (False, 16),
}
_PROPAGATION = {
    "private": 1 << 18, "rprivate": (1 << 18) | 16384,
    "shared": 1 << 20, "rshared": (1 << 20) | 16384,
    "slave": 1 << 19, "rslave": (1 << 19) | 16384,
    "unbindable": 1 << 17, "runbindable": (1 << 17) | 16384,
}
_PTYPES = (1 << 18) | (1 << 20) | (1 << 19) | (1 << 17)
_MS_REC, _MS_SILENT, _MS_REMOUNT = 16384, 32768, 32
_MS_BIND, _MS_RDONLY = 4096, 1


def parse_mount_options(options: Sequence[str]) -> tuple[int, str]:
    """(flags, data) from fstab-style options, as containerd's parseMountOptions."""
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            flags |= _PROPAGATION[option]
        elif option == "loop":
            raise NotImplementedError("loop mounts are not supported by the suite's mounter")
        else:
            data.append(option)
    return flags, ",".join(data)


def compact_lowerdir_option(options: Sequence[str]) -> tuple[str, list[str]]:
    """containerd's compactLowerdirOption: (directory to chdir into, options
    with ``lowerdir`` relative to it), or ("", options) if there is nothing to gain."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return "", list(options)
    dirs = options[index].removeprefix("lowerdir=").split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = os.path.commonprefix(dirs)
    if not common:
        return "", list(options)
    # containerd assumes ${root}/snapshots/<id>/fs: step back to the parent dir.
    common = os.path.dirname(common)
    if common in ("/", ""):
        return "", list(options)
    common += "/"
    new = [o for i, o in enumerate(options) if i != index]
    new.append("lowerdir=" + ":".join(d[len(common):] for d in dirs))
    return common, new


_MOUNT_IN_CWD = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
source, target, fstype, flags, data = sys.argv[1:]
if libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(int(flags)),
              data.encode()) != 0:
    err = ctypes.get_errno()
    sys.exit(f"mount {fstype} on {target}: {os.strerror(err)}")
"""


def mount_one(m: mount_pb2.Mount, target: str) -> None:
    """Mount ``m`` on ``target`` as containerd's (*Mount).Mount does on Linux.

    An option string too long for mount(2)'s one page has its lowerdirs made
    relative and is mounted from a child process that chdirs first (Go forks
    too: the working directory is the whole process's).
    """
    options = list(m.options)
    chdir = ""
    if sum(len(o) + 1 for o in options) >= mounts.PAGE_SIZE - 512:
        chdir, options = compact_lowerdir_option(options)
    flags, data = parse_mount_options(options)
    if len(data) > mounts.PAGE_SIZE:
        raise OSError(f"mount options too long for {target}: {len(data)} bytes")
    oflags = flags & ~_PTYPES
    if not flags & _MS_REMOUNT or data:
        if chdir:
            result = subprocess.run(
                [sys.executable, "-c", _MOUNT_IN_CWD, m.source, target, m.type, str(oflags), data],
                cwd=chdir, capture_output=True, text=True, timeout=60,
            )
            if result.returncode != 0:
                raise OSError(result.stderr.strip())
        else:
            mounts.mount(m.source, target, m.type, oflags, data)
    if flags & _PTYPES:
        mounts.mount("", target, "", flags & (_PTYPES | _MS_REC | _MS_SILENT))
    if oflags & (_MS_BIND | _MS_RDONLY) == _MS_BIND | _MS_RDONLY:
        mounts.mount("", target, "", oflags | _MS_REMOUNT)


def mount_all(ms: Sequence[mount_pb2.Mount], target: str | Path) -> None:
    """Mount every mount on ``target``, in order (mount.All)."""
    for m in ms:
        mount_one(m, os.fspath(target))


def unmount_all(target: str | Path) -> None:
    """Unmount ``target`` until nothing is mounted there (mount.UnmountAll)."""
    path = os.path.realpath(target)
    while mounts.is_mountpoint(path):
        mounts.unmount(path)


# -- comparing infos (helpers.go) -----------------------------------------------------


def check_info(si1: Info, si2: Info) -> None:
    """checkInfo: the two infos are the same (kind, name, parent, labels, times)."""
    assert si1.kind == si2.kind, f"expected kind {si1.kind}, got {si2.kind}"
    assert si1.name == si2.name, f"expected name {si1.name}, got {si2.name}"
    assert si1.parent == si2.parent, f"expected Parent {si1.parent}, got {si2.parent}"
    assert len(si1.labels) == len(si2.labels), (
        f"expected {len(si1.labels)} labels, got {len(si2.labels)}"
    )
    for key, value in si1.labels.items():
        assert si2.labels.get(key) == value, f"expected label {value}, got {si2.labels.get(key)}"
    assert si1.created == si2.created, f"expected Created {si1.created}, got {si2.created}"
    assert si1.updated == si2.updated, f"expected Updated {si1.updated}, got {si2.updated}"


def assert_labels(actual: dict[str, str], expected: dict[str, str]) -> None:
    """assertLabels: exactly the expected labels."""
    assert len(actual) == len(expected), f"Label size mismatch: {actual} vs {expected}"
    for key, value in expected.items():
        assert actual.get(key) == value, (
            f"Wrong label value for {key}, got {actual.get(key)!r}, expected {value!r}"
        )
