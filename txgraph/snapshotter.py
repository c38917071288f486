"""
The containerd snapshotter: containerd's C{snapshots.Snapshotter} contract
(its overlayfs snapshotter and C{snapshots/storage} as the reference) on
the same layers, machines, store and backends as the graph driver.

A snapshot is a layer with containerd's metadata (L{SnapshotRow}): an
I{active} snapshot is a read-write layer on a committed parent, a I{view}
a layer of its own on the parent, committed at once (read-only), and a
I{committed} snapshot is an active one whose layer was committed and whose
record was renamed.  Layer IDs are internal: 64 random hex digits, checked
against every layer the registry holds (dockerd's included), so that
neither front end ever meets the other's layers; the key containerd knows
changes at Commit, the layer ID never.

containerd mounts what C{Mounts} returns itself: the backend describes the
mounts (L{Backend.mount_specs}).  A backend whose mounts are of its own
mount of the layer (C{holds_client_mounts}: rbd) has the layer mounted,
with one Get, from Prepare or View until Commit or Remove, and again at
C{Mounts} after a reboot.

Order of writes, so that a crash anywhere leaves nothing leaked or lost
(recovery at start, L{Snapshotter.start}, runs after the layers'):

 - Prepare/View: the snapshot row first (durable), then the layer through
   its machine (write-ahead as always).  A crash before the layer is
   complete leaves a row whose layer the layers' recovery removed (or
   never made): the row is dropped.  A layer never exists without its row.
 - Commit: the layer's commit first (idempotent), then the row's rename in
   one statement.  A crash between leaves the active snapshot, whose
   Commit containerd retries.
 - Remove: the layer first, then the row.  A crash between leaves a row
   without layer: dropped at start.

The remote-snapshot shortcut (backends with shared layers: rbd).  A
Commit labelled C{containerd.io/snapshot.ref=<chain ID>} (containerd's
unpacker) publishes the layer as the pool's shared layer of that chain,
after the layer's commit and before the row's rename; a failure to publish
is logged and the commit stands.  A Prepare with that label, on a parent
whose chain is the one the pool's layer was made on, takes the layer from
the pool instead: the row (active) first, then the layer made a clone of
the shared one through its machine (the C{applying} write-ahead state),
committed, then the row committed under the Prepare's key, and the answer
is AlreadyExists; containerd finds the snapshot by List (label and parent)
and skips the layer.  A crash before the row is committed leaves an active
snapshot containerd never learnt of, which its garbage collection removes.

Crash points (L{txgraph.faults}): C{snapshot.inserted} (row written, no
layer yet), C{snapshot.layer-committed} (layer committed, row not renamed),
C{snapshot.layer-removed} (layer gone, row still there),
C{snapshot.published} (layer published, row not renamed) and
C{snapshot.adopted} (layer taken from the pool and committed, row still
active).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from txgraph import faults, filters
from txgraph.backends import LayerInfo, MountSpec
from txgraph.backends.threaded import AsyncBackend
from txgraph.errors import (
    BackendError,
    BadRequest,
    InvalidLayerState,
    SnapshotExists,
    UnknownSnapshot,
)
from txgraph.layers.registry import LayerRegistry
from txgraph.snapshotstore import SnapshotRow, SnapshotStore

log = Logger()

VIEW, ACTIVE, COMMITTED = "view", "active", "committed"

#: The label containerd's unpacker prepares a layer with: its chain ID.
TARGET_REF = "containerd.io/snapshot.ref"

#: How containerd's unpacker names the active snapshot it fills and commits
#: (C{snapshots.UnpackKeyFormat}: "extract-<unique> <chain ID>", under the
#: namespace's prefix).
UNPACK_KEY = "extract-"


def unpacking(key: str, labels: dict[str, str]) -> bool:
    """
    Whether an active snapshot is containerd's unpacker's (so it will be
    committed): its key, or the chain ID label it prepares with.
    """
    return key.rsplit("/", 1)[-1].startswith(UNPACK_KEY) or TARGET_REF in labels


#: An OCI chain ID, as the label carries it.
CHAIN_ID = re.compile(r"sha256:[0-9a-f]{64}")

#: The crash points of the snapshot transitions (see the module docstring).
CRASH_POINTS = (
    "snapshot.inserted",
    "snapshot.layer-committed",
    "snapshot.layer-removed",
    "snapshot.published",
    "snapshot.adopted",
)
faults.declare(*CRASH_POINTS)


@dataclass(frozen=True)
class Info:
    """
    A snapshot's info as containerd's Stat and List give it.
    """

    name: str
    kind: str
    parent: str
    labels: dict[str, str]
    created_ns: int
    updated_ns: int


@dataclass
class Snapshot:
    """
    A snapshot known to the snapshotter.

    @ivar ready: its Prepare or View has finished (it is shown and usable).
    @ivar removing: a Remove is under way (no new child may use it).
    """

    row: SnapshotRow
    lock: DeferredLock = field(default_factory=DeferredLock)
    ready: bool = False
    removing: bool = False

    def info(self) -> Info:
        """
        containerd's view of it.
        """
        r = self.row
        return Info(r.key, r.kind, r.parent or "", dict(r.labels), r.created_ns, r.updated_ns)


def _adaptor(info: Info) -> filters.Adaptor:
    """
    containerd's snapshot adaptor (C{adaptSnapshot}): C{kind} (by name),
    C{name}, C{parent}, C{labels.<key>} (absent when there are no labels).
    """

    def field_of(path: Any) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return info.kind, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            return info.labels.get(key, ""), key in info.labels
        return "", False

    return field_of


class Snapshotter:
    """
    containerd's snapshotter semantics over the layer registry.

    @ivar ready: fires once the snapshots are restored and checked against
        the layers (after the layers' own recovery); calls wait on it.
    """

    def __init__(
        self,
        registry: LayerRegistry,
        store: SnapshotStore,
        backend: AsyncBackend,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.registry = registry
        self.store = store
        self.backend = backend
        self._now_ns = now_ns
        self._by_key: dict[str, Snapshot] = {}
        self._by_layer: dict[str, Snapshot] = {}
        self.ready: Deferred[None] = Deferred()
        #: Layers taken from the pool (the shortcut) and published to it
        #: since start, for logs and tests.
        self.adopted = 0
        self.published = 0

    # -- start -------------------------------------------------------------

    async def start(self) -> dict[str, int]:
        """
        Load the snapshots, after the layers' recovery: a row whose layer
        is gone (its Prepare never completed, or its Remove did not finish)
        is dropped.  Returns what was found: C{snapshots}, C{dropped}.
        """
        rows = await self.store.load_snapshots()
        dropped = 0
        for row in rows:
            if row.layer_id not in self.registry:
                log.info(
                    "dropping snapshot {key}: its layer {layer} was never completed "
                    "or was removed",
                    key=row.key,
                    layer=row.layer_id,
                )
                await self.store.delete_snapshot(row.layer_id)
                dropped += 1
                continue
            self._add(Snapshot(row, ready=True))
        found = {"snapshots": len(self._by_layer), "dropped": dropped}
        log.info(
            "containerd snapshots ready: {snapshots} snapshots, {dropped} dropped",
            **found,
        )
        self.ready.callback(None)
        return found

    def _add(self, snapshot: Snapshot) -> None:
        self._by_key[snapshot.row.key] = snapshot
        self._by_layer[snapshot.row.layer_id] = snapshot

    def _forget(self, snapshot: Snapshot) -> None:
        if self._by_key.get(snapshot.row.key) is snapshot:
            del self._by_key[snapshot.row.key]
        self._by_layer.pop(snapshot.row.layer_id, None)

    # -- lookups ------------------------------------------------------------

    def rows(self) -> list[SnapshotRow]:
        """
        Every snapshot's row (ready or not).
        """
        return [s.row for s in self._by_layer.values()]

    async def forget_layer(self, layer_id: str) -> None:
        """
        Forget the snapshot of a layer that is gone (gc removed it): its
        record goes.  Nothing happens if the layer is no snapshot's or is
        still there.
        """
        snapshot = self._by_layer.get(layer_id)
        if snapshot is None or layer_id in self.registry:
            return
        await self.store.delete_snapshot(layer_id)
        self._forget(snapshot)

    def owns_layer(self, layer_id: str) -> bool:
        """
        Whether a layer is a snapshot's.
        """
        return layer_id in self._by_layer

    def _lookup(self, key: str) -> Snapshot:
        if not isinstance(key, str) or not key:
            raise BadRequest("missing snapshot key: a key is required")
        snapshot = self._by_key.get(key)
        if snapshot is None or not snapshot.ready:
            raise UnknownSnapshot(f"snapshot {key} does not exist")
        return snapshot

    def _children(self, snapshot: Snapshot) -> list[str]:
        name = snapshot.row.key
        return sorted(s.row.key for s in self._by_layer.values() if s.row.parent == name)

    def _chain(self, snapshot: Snapshot) -> list[LayerInfo]:
        return self.registry.chain(snapshot.row.layer_id)

    def _new_layer_id(self) -> str:
        while True:
            layer_id = secrets.token_hex(32)
            if layer_id not in self.registry and layer_id not in self._by_layer:
                return layer_id

    # -- Prepare and View ------------------------------------------------------

    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        """
        An active snapshot on C{parent} (a committed snapshot, or none);
        its mounts.
        """
        return await self._create(ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        """
        A read-only view of C{parent}; its mounts.
        """
        return await self._create(VIEW, key, parent, labels)

    async def _create(
        self, kind: str, key: str, parent: str, labels: dict[str, str]
    ) -> list[MountSpec]:
        if not isinstance(key, str) or not key:
            raise BadRequest(f"missing snapshot key: {kind} snapshots need a key")
        if key in self._by_key:
            raise SnapshotExists(f"snapshot {key}: already exists")
        parent_layer: str | None = None
        if parent:
            found = self._by_key.get(parent)
            if found is None or not found.ready or found.removing:
                raise UnknownSnapshot(f"parent snapshot {parent} of {key} does not exist")
            if found.row.kind != COMMITTED:
                raise BadRequest(f"parent {parent} of {key} is not a committed snapshot")
            parent_layer = found.row.layer_id
        if kind == ACTIVE and await self._shortcut(key, parent, parent_layer, labels):
            raise SnapshotExists(
                f"snapshot {key}: chain {labels[TARGET_REF]} is already in the pool; "
                f"committed as {key}"
            )
        snapshot = self._new_snapshot(kind, key, parent, labels)
        try:
            return await snapshot.lock.run(self._make, snapshot, parent_layer)
        except BaseException:
            self._forget(snapshot)
            raise

    def _new_snapshot(self, kind: str, key: str, parent: str, labels: dict[str, str]) -> Snapshot:
        now = self._now_ns()
        row = SnapshotRow(
            layer_id=self._new_layer_id(),
            key=key,
            kind=kind,
            parent=parent or None,
            labels=dict(labels),
            created_ns=now,
            updated_ns=now,
        )
        snapshot = Snapshot(row)
        self._add(snapshot)
        return snapshot

    async def _make(self, snapshot: Snapshot, parent_layer: str | None) -> list[MountSpec]:
        row = snapshot.row
        await self.store.insert_snapshot(row)
        faults.point("snapshot.inserted")
        try:
            unpack = row.kind == ACTIVE and unpacking(row.key, row.labels)
            await self.registry.create(
                row.layer_id, parent_layer, row.kind == ACTIVE, {},
                commit_expected=unpack,
                # A container's (or a build step's) active snapshot: a
                # backend may keep it locally (rbd's container_layers).
                container=row.kind == ACTIVE and not unpack,
            )
            if row.kind == VIEW:
                await self.registry.commit(row.layer_id)
            specs = await self._mounts(snapshot)
        except BaseException:
            await self._undo(row)
            raise
        snapshot.ready = True
        return specs

    async def _undo(self, row: SnapshotRow) -> None:
        """
        Roll back a Prepare or View that failed after its row was written:
        remove the layer (if it was made), then the row.  A rollback that
        fails leaves the row for a later Remove (or gc's report).
        """
        try:
            if row.layer_id in self.registry:
                await self._unhold(row.layer_id)
                await self.registry.remove(row.layer_id)
            await self.store.delete_snapshot(row.layer_id)
        except Exception as e:
            log.error(
                "could not roll back snapshot {key} (layer {layer}): {error}",
                key=row.key,
                layer=row.layer_id,
                error=e,
            )

    # -- the remote-snapshot shortcut ---------------------------------------------

    def _parent_chain(self, parent: str) -> str | None:
        """
        The chain ID of a committed parent snapshot's tree, as containerd's
        unpacker labelled it ("" for no parent), or None if unknown.
        """
        if not parent:
            return ""
        found = self._by_key.get(parent)
        if found is None:
            return None
        chain = found.row.labels.get(TARGET_REF, "")
        return chain if CHAIN_ID.fullmatch(chain) else None

    async def _shortcut(
        self, key: str, parent: str, parent_layer: str | None, labels: dict[str, str]
    ) -> bool:
        """
        containerd's remote-snapshot shortcut: a Prepare labelled with the
        chain ID of a layer the pool already holds (published by any node)
        on a parent of the chain that layer was made on becomes a committed
        snapshot named C{key}, whose layer is a clone of the shared one;
        containerd then finds it by List (label and parent) and skips the
        layer.  Whether it was taken.
        """
        chain = labels.get(TARGET_REF, "")
        if not self.backend.shares_layers or not CHAIN_ID.fullmatch(chain):
            return False
        parent_chain = self._parent_chain(parent)
        if parent_chain is None:
            return False
        if await self.backend.shared_chain_parent(chain) != parent_chain:
            return False
        if key in self._by_key:
            raise SnapshotExists(f"snapshot {key}: already exists")
        snapshot = self._new_snapshot(ACTIVE, key, parent, labels)
        try:
            taken: bool = await snapshot.lock.run(self._adopt, snapshot, parent_layer, chain)
        except BaseException:
            self._forget(snapshot)
            raise
        if not taken:
            self._forget(snapshot)
        return taken

    async def _adopt(self, snapshot: Snapshot, parent_layer: str | None, chain: str) -> bool:
        """
        The row (active) first, then the layer made a clone of the shared
        one and committed, then the row committed.  A crash before the end
        leaves an active snapshot that containerd never learnt of: its
        garbage collection removes it.  If the shared layer went away
        meanwhile, everything is undone and the layer is unpacked as usual.
        """
        row = snapshot.row
        await self.store.insert_snapshot(row)
        faults.point("snapshot.inserted")
        try:
            await self.registry.create(row.layer_id, parent_layer, False, {})
            await self.registry.adopt_shared(row.layer_id, chain)
            await self.registry.commit(row.layer_id)
        except BackendError as e:
            log.warn(
                "snapshot {key}: cannot take chain {chain} from the pool ({error}); "
                "unpacking it",
                key=row.key,
                chain=chain,
                error=e,
            )
            await self._undo(row)
            return False
        except BaseException:
            await self._undo(row)
            raise
        faults.point("snapshot.adopted")
        # A clone that was never written holds nothing of its own: no need
        # to measure it (a diff_iterate over the image takes ~0.4 s).
        await self._settle_committed(snapshot, row.key, row.labels, usage=(0, 0))
        snapshot.ready = True
        self.adopted += 1
        log.info("snapshot {key}: chain {chain} taken from the pool", key=row.key, chain=chain)
        return True

    async def _publish(self, snapshot: Snapshot, labels: dict[str, str]) -> None:
        """
        Make a layer containerd unpacked (its Commit carries the chain ID
        label) findable by other nodes: the backend publishes it as the
        shared layer of that chain.  A failure is logged, never fatal: the
        commit stands, and other nodes unpack the layer themselves.
        """
        chain = labels.get(TARGET_REF, "")
        if not self.backend.shares_layers or not CHAIN_ID.fullmatch(chain):
            return
        parent_chain = self._parent_chain(snapshot.row.parent or "")
        if parent_chain is None:
            return
        layer_id = snapshot.row.layer_id
        try:
            if await self.backend.publish_chain(
                self.registry.info(layer_id), self._chain(snapshot), chain, parent_chain
            ):
                self.published += 1
        except Exception as e:
            log.warn(
                "snapshot {key}: cannot publish chain {chain} to the pool: {error}",
                key=snapshot.row.key,
                chain=chain,
                error=e,
            )

    # -- holding the layers of backends whose mounts are their own -----------

    async def _hold(self, layer_id: str) -> None:
        """
        Have the layer mounted (one Get) if the backend's client mounts
        are binds of its own mount.
        """
        if not self.backend.holds_client_mounts:
            return
        row = self.registry.lookup(layer_id).row
        if row.state != "mounted":
            await self.registry.get(layer_id)

    async def _unhold(self, layer_id: str) -> None:
        """
        Drop the Get of L{_hold}, if it was taken.
        """
        if not self.backend.holds_client_mounts:
            return
        row = self.registry.lookup(layer_id).row
        if row.state == "mounted" and row.refcount > 0:
            await self.registry.put(layer_id)

    async def _mounts(self, snapshot: Snapshot) -> list[MountSpec]:
        layer_id = snapshot.row.layer_id
        await self._hold(layer_id)
        return await self.backend.mount_specs(
            self.registry.info(layer_id), self._chain(snapshot), snapshot.row.kind == VIEW
        )

    # -- Mounts, Commit, Remove -------------------------------------------------

    async def mounts(self, key: str) -> list[MountSpec]:
        """
        The mounts of an active snapshot or a view.
        """
        snapshot = self._lookup(key)
        if snapshot.row.kind == COMMITTED:
            raise InvalidLayerState(f"snapshot {key} is committed: only active snapshots and views have mounts")
        return await snapshot.lock.run(self._mounts, snapshot)

    async def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        """
        Commit the active snapshot C{key} as C{name}: its layer is
        committed, and its record renamed, with the given labels (they
        replace the active snapshot's) and new times.
        """
        if not isinstance(name, str) or not name:
            raise BadRequest(f"missing name to commit snapshot {key} as")
        if name in self._by_key:
            raise SnapshotExists(f"committed snapshot {name}: already exists")
        snapshot = self._lookup(key)
        if snapshot.row.kind != ACTIVE:
            raise InvalidLayerState(f"snapshot {key} is not active: only active snapshots are committed")
        if snapshot.removing:
            raise InvalidLayerState(f"snapshot {key} is being removed")
        # The name is taken now; the key stays usable until the rename.
        self._by_key[name] = snapshot
        try:
            await snapshot.lock.run(self._commit, snapshot, name, key, labels)
        except BaseException:
            if self._by_key.get(name) is snapshot and snapshot.row.key != name:
                del self._by_key[name]
            raise

    async def _commit(self, snapshot: Snapshot, name: str, key: str, labels: dict[str, str]) -> None:
        row = snapshot.row
        await self._unhold(row.layer_id)
        await self.registry.commit(row.layer_id)
        faults.point("snapshot.layer-committed")
        await self._publish(snapshot, labels)
        faults.point("snapshot.published")
        await self._settle_committed(snapshot, name, labels)
        if self._by_key.get(key) is snapshot:
            del self._by_key[key]

    async def _settle_committed(
        self, snapshot: Snapshot, name: str, labels: dict[str, str],
        usage: tuple[int, int] | None = None,
    ) -> None:
        """
        Record a snapshot whose layer is committed as committed snapshot
        C{name}: labels, usage (measured now unless given), new times, in
        one statement.
        """
        row = snapshot.row
        if usage is None:
            usage = await self.backend.usage(self.registry.info(row.layer_id))
        size, inodes = usage
        renamed = row.copy()
        now = self._now_ns()
        renamed.key, renamed.kind, renamed.labels = name, COMMITTED, dict(labels)
        renamed.size, renamed.inodes = size, inodes
        renamed.created_ns = renamed.updated_ns = now
        await self.store.update_snapshot(renamed)
        snapshot.row = renamed

    async def remove(self, key: str) -> None:
        """
        Remove a snapshot that has no children: its layer, then its record.
        """
        snapshot = self._lookup(key)
        children = self._children(snapshot)
        if children:
            shown = ", ".join(children[:3]) + (", ..." if len(children) > 3 else "")
            raise InvalidLayerState(
                f"cannot remove snapshot {key}: it has {len(children)} child snapshot(s): {shown}"
            )
        if snapshot.removing:
            raise InvalidLayerState(f"snapshot {key} is already being removed")
        snapshot.removing = True
        try:
            await snapshot.lock.run(self._remove, snapshot)
        finally:
            snapshot.removing = False

    async def _remove(self, snapshot: Snapshot) -> None:
        row = snapshot.row
        if row.layer_id in self.registry:
            await self._unhold(row.layer_id)
            await self.registry.remove(row.layer_id)
        faults.point("snapshot.layer-removed")
        await self.store.delete_snapshot(row.layer_id)
        self._forget(snapshot)

    # -- Stat, Update, List, Usage, Cleanup ---------------------------------------

    def stat(self, key: str) -> Info:
        """
        A snapshot's info.
        """
        return self._lookup(key).info()

    async def update(self, info: Info, fieldpaths: Iterable[str]) -> Info:
        """
        Change a snapshot's labels as containerd's C{storage.UpdateInfo}
        does: C{labels} replaces them all (as no field path does),
        C{labels.<key>} sets or, empty, deletes one; any other path is
        refused (InvalidArgument).
        """
        snapshot = self._lookup(info.name)
        paths = list(fieldpaths)
        labels = dict(snapshot.row.labels)
        for path in paths:
            if path.startswith("labels."):
                label = path[len("labels.") :]
                value = info.labels.get(label, "")
                if value:
                    labels[label] = value
                else:
                    labels.pop(label, None)
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise BadRequest(f"cannot update {path!r} field on snapshot {info.name!r}")
        if not paths:
            labels = dict(info.labels)
        return await snapshot.lock.run(self._update, snapshot, labels)

    async def _update(self, snapshot: Snapshot, labels: dict[str, str]) -> Info:
        updated = snapshot.row.copy()
        updated.labels = labels
        updated.updated_ns = self._now_ns()
        await self.store.update_snapshot(updated)
        snapshot.row = updated
        return snapshot.info()

    def list(self, filter_texts: Iterable[str]) -> list[Info]:
        """
        Every snapshot matching any of containerd's filters (all without).
        """
        matches = filters.parse_all(list(filter_texts))
        infos = [s.info() for s in self._by_layer.values() if s.ready]
        return [info for info in infos if matches(_adaptor(info))]

    async def usage(self, key: str) -> tuple[int, int]:
        """
        (size, inodes): measured now for an active snapshot, as measured at
        its Commit for a committed one, nothing for a view.
        """
        snapshot = self._lookup(key)
        row = snapshot.row
        if row.kind == ACTIVE:
            result: tuple[int, int] = await snapshot.lock.run(
                self.backend.usage, self.registry.info(row.layer_id)
            )
            return result
        return row.size or 0, row.inodes or 0

    async def cleanup(self) -> None:
        """
        Release what removals left for later (the rbd trash).
        """
        await self.backend.cleanup()

