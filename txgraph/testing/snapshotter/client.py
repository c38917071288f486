"""The client side of containerd's Snapshots gRPC service, as the suite uses it:
the Go ``snapshots.Snapshotter`` interface over the generated stubs (like
containerd's proxy client), the ``Info`` it returns, the ``Target`` one test
talks to, and helpers that turn a failed call into its status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

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


