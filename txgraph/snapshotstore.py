"""
containerd's snapshots in the state database: L{SnapshotRow} (a row of
the C{snapshots} table, declared with the others in L{txgraph.store}) and
L{SnapshotStore}, its reads and writes.

Each write is one durable transaction on the store's one database thread,
committed before the snapshotter answers; it joins no group of layer
writes, and the database thread's FIFO order keeps it in order with them
(see L{txgraph.snapshotter} for the order of a snapshot's and its layer's
writes, which recovery relies on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred

from txgraph.store import Store, snapshots


@dataclass
class SnapshotRow:
    """
    One containerd snapshot as persisted: containerd's metadata of a layer.

    @ivar layer_id: the layer that holds the snapshot's storage (the key
        is containerd's and changes at Commit; the layer ID never does).
    @ivar key: the snapshot's key (active, view) or name (committed).
    @ivar parent: the parent snapshot's name, or None.
    @ivar size: what Usage reports of a committed snapshot (measured at
        Commit, as containerd's snapshotters do), or None.
    @ivar created_ns: creation time, nanoseconds since the epoch.
    """

    layer_id: str
    key: str
    kind: str
    parent: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    inodes: int | None = None
    created_ns: int = 0
    updated_ns: int = 0

    def to_db(self) -> dict[str, Any]:
        """
        The column values for this row.
        """
        return {
            "layer_id": self.layer_id,
            "key": self.key,
            "kind": self.kind,
            "parent": self.parent,
            "labels": json.dumps(self.labels) if self.labels else None,
            "size": self.size,
            "inodes": self.inodes,
            "created_ns": self.created_ns,
            "updated_ns": self.updated_ns,
        }

    @classmethod
    def from_db(cls, row: sa.Row[Any]) -> SnapshotRow:
        """
        Build a L{SnapshotRow} from a C{snapshots} result row.
        """
        m = row._mapping
        return cls(
            layer_id=m["layer_id"],
            key=m["key"],
            kind=m["kind"],
            parent=m["parent"],
            labels=json.loads(m["labels"]) if m["labels"] else {},
            size=m["size"],
            inodes=m["inodes"],
            created_ns=m["created_ns"],
            updated_ns=m["updated_ns"],
        )

    def copy(self) -> SnapshotRow:
        """
        A copy, for the database thread (the reactor keeps changing its own).
        """
        return SnapshotRow(**{**self.__dict__, "labels": dict(self.labels)})


class SnapshotStore:
    """
    The C{snapshots} table of a L{Store}.  Methods ending in C{_thd} block
    and run in the database thread (or in C{txgraph-admin} on a stopped
    daemon's state); the others return Deferreds.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def load_snapshots_thd(self) -> list[SnapshotRow]:
        """
        Every persisted containerd snapshot.
        """
        with self.store.engine.connect() as conn:
            return [
                SnapshotRow.from_db(r)
                for r in conn.execute(sa.select(snapshots).order_by(snapshots.c.created_ns))
            ]

    def insert_snapshot_thd(self, row: SnapshotRow) -> None:
        """
        Persist a new snapshot, durably (before its layer is made).
        """
        self.store._synchronous_thd(self.store._connection_thd(), True)
        with self.store.engine.begin() as conn:
            conn.execute(snapshots.insert().values(**row.to_db()))

    def update_snapshot_thd(self, row: SnapshotRow) -> None:
        """
        Persist a snapshot's new key, kind, labels, usage and times (by its
        layer ID), durably: a Commit's rename is one statement.
        """
        self.store._synchronous_thd(self.store._connection_thd(), True)
        with self.store.engine.begin() as conn:
            values = row.to_db()
            del values["layer_id"]
            done = conn.execute(
                snapshots.update().where(snapshots.c.layer_id == row.layer_id).values(**values)
            )
            if done.rowcount != 1:
                raise LookupError(f"snapshot {row.key} is not in the database")

    def delete_snapshot_thd(self, layer_id: str) -> None:
        """
        Forget a snapshot (its layer is gone), durably.
        """
        self.store._synchronous_thd(self.store._connection_thd(), True)
        with self.store.engine.begin() as conn:
            conn.execute(snapshots.delete().where(snapshots.c.layer_id == layer_id))

    def load_snapshots(self) -> Deferred[list[SnapshotRow]]:
        """
        Every persisted containerd snapshot.
        """
        return self.store._run(self.load_snapshots_thd)

    def insert_snapshot(self, row: SnapshotRow) -> Deferred[None]:
        """
        Persist a new snapshot (a copy of C{row} as it is now).
        """
        return self.store._run(self.insert_snapshot_thd, row.copy())

    def update_snapshot(self, row: SnapshotRow) -> Deferred[None]:
        """
        Persist a snapshot's fields (a copy of C{row} as it is now).
        """
        return self.store._run(self.update_snapshot_thd, row.copy())

    def delete_snapshot(self, layer_id: str) -> Deferred[None]:
        """
        Forget a snapshot.
        """
        return self.store._run(self.delete_snapshot_thd, layer_id)
