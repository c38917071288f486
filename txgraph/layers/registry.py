"""
L{LayerRegistry}: owns every layer's machine, creates machines and
restores them from the store at start, runs each operation under the
layer's lock (one in flight per layer, the others queue on a
L{DeferredLock}), and times the release of devices a backend keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from automat import NoTransition
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgraph.backends import LayerInfo
from txgraph.backends.threaded import AsyncBackend
from txgraph.errors import BadRequest, InvalidLayerState, LayerExists, UnknownLayer
from txgraph.layers.core import REST_STATES, LayerCore, LayerInputs, describe_failure
from txgraph.layers.machine import LayerMachine
from txgraph.layers.states import STATES, new
from txgraph.model import IDMap
from txgraph.store import LayerRow, Store

log = Logger()
T = TypeVar("T")

#: The most lower layers under a layer: dockerd's deepest chain is 125
#: layers (moby's maxLayerDepth); accept a little more, as moby's overlay2
#: does (128 lowers, a chain of 129, what moby's graphtest builds, and what
#: containerd's snapshotter suite makes: 128 snapshots and a view of the top),
#: and refuse beyond.
MAX_DEPTH = 128

@dataclass
class Layer:
    """
    A layer known to the registry: its machine, core and lock.

    @ivar children: IDs of the layers whose parent this is.
    @ivar release_call: the timer that unmaps a device kept after the
        last Put.
    @ivar commit_expected: the front end's hint that this layer will likely
        be committed (L{LayerInfo.commit_expected}); not persisted.
    @ivar container: the front end's hint that this layer is a
        container's (L{LayerInfo.container}); not persisted.
    """

    core: LayerCore
    machine: LayerInputs
    lock: DeferredLock = field(default_factory=DeferredLock)
    children: set[str] = field(default_factory=set)
    release_call: IDelayedCall | None = None
    commit_expected: bool = False
    container: bool = False

    def cancel_release(self) -> None:
        """
        Stop the timer that would unmap the layer's kept device.
        """
        call, self.release_call = self.release_call, None
        if call is not None and call.active():
            call.cancel()

    @property
    def row(self) -> LayerRow:
        """
        The persisted row.
        """
        return self.core.row


class LayerRegistry:
    """
    Owns every layer's machine: creates them, restores them from the store
    at start, and runs each operation under the layer's lock.

    @ivar id_map: Init's UIDMaps/GIDMaps (userns-remap), or the identity.
    @ivar clock: times the release of kept devices (the reactor).
    """

    def __init__(self, store: Store, backend: AsyncBackend, clock: IReactorTime) -> None:
        self.store = store
        self.backend = backend
        self.clock = clock
        self.id_map = IDMap.from_docker(None, None)
        self._layers: dict[str, Layer] = {}

    # -- bookkeeping -----------------------------------------------------

    def __contains__(self, layer_id: str) -> bool:
        return layer_id in self._layers

    def rows(self) -> list[LayerRow]:
        """
        Every known layer's row.
        """
        return [layer.row for layer in self._layers.values()]

    def lookup(self, layer_id: str) -> Layer:
        """
        The layer with this ID, or L{UnknownLayer}.
        """
        try:
            return self._layers[layer_id]
        except KeyError:
            raise UnknownLayer(f"unknown layer {layer_id}") from None

    def chain(self, layer_id: str) -> list[LayerInfo]:
        """
        The layer's ancestors, nearest first.
        """
        result = []
        parent = self.lookup(layer_id).row.parent
        while parent is not None:
            layer = self.lookup(parent)
            result.append(self._info(layer.row))
            parent = layer.row.parent
        return result

    def info(self, layer_id: str) -> LayerInfo:
        """
        The backend's view of a layer.
        """
        return self._info(self.lookup(layer_id).row)

    def _info(self, row: LayerRow) -> LayerInfo:
        layer = self._layers.get(row.id)
        return LayerInfo(
            id=row.id,
            parent=row.parent,
            readwrite=row.readwrite,
            mapping=row.mapping,
            storage_opt=dict(row.storage_opt),
            root_ids=self.id_map.to_host(0, 0),
            committed=row.committed,
            commit_expected=layer is not None and layer.commit_expected,
            container=layer is not None and layer.container,
        )

    def forget(self, layer_id: str) -> None:
        """
        Drop a released layer.
        """
        layer = self._layers.pop(layer_id, None)
        if layer is not None:
            layer.cancel_release()
        if layer is not None and layer.row.parent in self._layers:
            self._layers[layer.row.parent].children.discard(layer_id)

    def _add(self, row: LayerRow, state: Any) -> Layer:
        core = LayerCore(row, self)
        layer = Layer(core=core, machine=LayerMachine(core, state))
        self._layers[row.id] = layer
        return layer

    def _run(
        self, layer: Layer, operation: Callable[[], Deferred[T]]
    ) -> Deferred[T]:
        def locked() -> Deferred[T]:
            try:
                return operation()
            except NoTransition:
                return fail(
                    Failure(
                        InvalidLayerState(
                            f"layer {layer.row.id} cannot do that while it is "
                            f"{layer.row.state}"
                        )
                    )
                )

        return layer.lock.run(locked)

    # -- start -------------------------------------------------------------

    async def restore(self, rows: list[LayerRow], rebooted: bool) -> dict[str, int]:
        """
        Rebuild every machine from its persisted row, then recover each
        layer: finish or roll back what was in flight, and check what is at
        rest.  Returns how many layers were recovered, by their old state.
        """
        for row in rows:
            self._add(row, STATES[row.state])
        for row in rows:
            if row.parent is not None and row.parent in self._layers:
                self._layers[row.parent].children.add(row.id)
        summary: dict[str, int] = {}
        # Children before parents, so that removals can proceed.
        for row in sorted(rows, key=self._depth, reverse=True):
            layer = self._layers.get(row.id)
            if layer is None:
                continue
            was = row.state
            summary[was] = summary.get(was, 0) + 1
            recover = layer.machine.recoverAfterReboot if rebooted else layer.machine.recover
            try:
                await self._run(layer, recover)
            except Exception as e:
                log.error(
                    "could not recover layer {id} from state {state}: {error}",
                    id=row.id,
                    state=was,
                    error=e,
                )
                continue
            if layer.row.state == "faulty" and was != "faulty":
                log.error(
                    "recovery found layer {id} ({state}) lost: {error}",
                    id=row.id,
                    state=was,
                    error=layer.row.error,
                )
        return summary

    def _depth(self, row: LayerRow) -> int:
        depth = 0
        parent = row.parent
        while parent is not None and parent in self._layers and depth <= MAX_DEPTH:
            depth += 1
            parent = self._layers[parent].row.parent
        return depth

    # -- operations ----------------------------------------------------------

    async def create(
        self,
        layer_id: str,
        parent: str | None,
        readwrite: bool,
        storage_opt: dict[str, str],
        commit_expected: bool = False,
        container: bool = False,
    ) -> None:
        """
        Create a layer (Create or CreateReadWrite).  Asking again for a layer
        that exists with the same parent and kind succeeds (dockerd retries).
        C{commit_expected}: the front end expects to commit it
        (L{LayerInfo.commit_expected}); C{container}: it is a container's
        (L{LayerInfo.container}).
        """
        existing = self._layers.get(layer_id)
        if existing is not None:
            row = existing.row
            if row.parent == parent and row.readwrite == readwrite:
                return
            raise LayerExists(
                f"layer {layer_id} already exists with parent "
                f"{row.parent or '(none)'} ({'read-write' if row.readwrite else 'image'} layer)"
            )
        parentLayer = None
        if parent is not None:
            parentLayer = self._layers.get(parent)
            if parentLayer is None:
                raise UnknownLayer(f"parent layer {parent} of {layer_id} does not exist")
            if parentLayer.row.state in ("faulty", "removing", "creating"):
                raise InvalidLayerState(
                    f"parent layer {parent} of {layer_id} is {parentLayer.row.state}"
                )
            if self._depth(parentLayer.row) + 1 > MAX_DEPTH:
                raise BadRequest(
                    f"layer {layer_id} would have more than {MAX_DEPTH} lower layers "
                    f"(its parent {parent} is the top of a chain of {MAX_DEPTH + 1})"
                )
        row = LayerRow(
            id=layer_id,
            parent=parent,
            kind="rw" if readwrite else "ro",
            state="creating",
            storage_opt=storage_opt,
        )
        layer = self._add(row, new)
        layer.commit_expected = commit_expected
        layer.container = container
        if parentLayer is not None:
            parentLayer.children.add(layer_id)
        try:
            if parentLayer is not None and not parentLayer.row.committed:
                # A read-write mapping is never snapshotted.
                await self._release(parentLayer)
                await self._run(parentLayer, parentLayer.machine.commit)
            await self._run(layer, layer.machine.create)
            self._keep(layer)
        except BaseException:
            # The machine rolled back (and forgot the layer), or never
            # started; a layer whose rollback failed stays, faulty, for
            # Remove or gc to finish.
            if self._layers.get(layer_id) is layer and layer.row.state != "faulty":
                self.forget(layer_id)
            raise

    async def commit(self, layer_id: str) -> None:
        """
        Make a layer immutable, as a child's Create does to its parent (a
        device kept mapped read-write is unmapped first); idempotent.
        """
        layer = self.lookup(layer_id)
        await self._release(layer)
        await self._run(layer, layer.machine.commit)

    async def remove(self, layer_id: str) -> None:
        """
        Remove a layer.  Removing a layer that does not exist succeeds, as
        with moby's own drivers: dockerd retries failed removals at every
        shutdown and must be able to finish them.
        """
        layer = self._layers.get(layer_id)
        if layer is None:
            return
        if layer.children:
            raise InvalidLayerState(
                f"cannot remove layer {layer_id}: it is the parent of "
                f"{len(layer.children)} layer(s): {', '.join(sorted(layer.children)[:3])}"
            )
        layer.cancel_release()
        await self._run(layer, layer.machine.remove)

    async def get(self, layer_id: str) -> str:
        """
        Take a reference; return the directory.
        """
        layer = self.lookup(layer_id)
        layer.cancel_release()
        return await self._run(layer, layer.machine.get)

    async def put(self, layer_id: str) -> None:
        """
        Drop a reference; after the last, time the release of the device
        if the backend keeps it.
        """
        layer = self.lookup(layer_id)
        await self._run(layer, layer.machine.put)
        self._keep(layer)

    def _keep(self, layer: Layer) -> None:
        """
        Time the release of the device a layer rests mapped with (after
        its last Put, or since its Create).
        """
        if layer.row.state == "mapped" and self._layers.get(layer.row.id) is layer:
            layer.cancel_release()
            layer.release_call = self.clock.callLater(
                self.backend.unmap_delay, self._release_later, layer
            )

    def _release_later(self, layer: Layer) -> None:
        layer.release_call = None
        Deferred.fromCoroutine(self._release_logged(layer))

    async def _release(self, layer: Layer) -> None:
        """
        Unmap the device the layer kept, if it still rests mapped (a Get
        may have mounted it again meanwhile).
        """
        layer.cancel_release()

        def locked() -> Deferred[None]:
            if layer.row.state == "mapped":
                return layer.machine.release()
            return succeed(None)

        await layer.lock.run(locked)

    async def _release_logged(self, layer: Layer) -> None:
        """
        L{_release} where no caller waits for the outcome (the delay
        passed, dockerd's Cleanup, the daemon's stop): a failed unmap is
        logged, and leaves the layer faulty.
        """
        try:
            await self._release(layer)
        except Exception:
            log.error(
                "could not unmap the kept device of layer {id}: {error}",
                id=layer.row.id,
                error=describe_failure(Failure()),
            )

    async def release_all(self) -> None:
        """
        Unmap every kept device (dockerd's Cleanup, and the daemon's
        stop), all at once: with the cluster down, each unmap may wait for
        the backend's timeout, and one after another they would add up.
        """
        kept = [layer for layer in self._layers.values() if layer.row.state == "mapped"]
        await gatherResults([ensureDeferred(self._release_logged(layer)) for layer in kept])

    async def apply(self, layer_id: str, stream: BinaryIO) -> int:
        """
        ApplyDiff: replace the layer's content with a tar; return its size.
        """
        layer = self.lookup(layer_id)
        if layer.children:
            raise InvalidLayerState(
                f"cannot ApplyDiff to layer {layer_id}: other layers are made from it"
            )
        await self._release(layer)
        return await self._run(layer, lambda: layer.machine.applyDiff(stream))

    async def adopt_shared(self, layer_id: str, chain: str) -> int:
        """
        Make a new layer the pool's shared layer of OCI chain ID C{chain}
        (a clone of it, committed), as an ApplyDiff of that layer would;
        return its size.  For containerd's remote-snapshot shortcut.
        """
        layer = self.lookup(layer_id)
        if layer.children:
            raise InvalidLayerState(
                f"cannot make layer {layer_id} a shared layer: other layers are made from it"
            )
        await self._release(layer)
        return await self._run(layer, lambda: layer.machine.adoptShared(chain))

    async def read(
        self,
        layer_id: str,
        parent: str | None,
        reader: Callable[[LayerInfo, list[LayerInfo], str | None], Deferred[T]],
    ) -> T:
        """
        Run a read-only backend call (Diff, Changes, DiffSize) on a layer
        at rest, under the layer's lock: a Put, Remove or ApplyDiff of the
        layer waits until the read is done (a block backend reads through a
        view that keeps the device busy).
        """
        layer = self.lookup(layer_id)
        if parent is not None:
            self.lookup(parent)

        def locked() -> Deferred[T]:
            if layer.row.state not in REST_STATES or layer.row.state == "faulty":
                return fail(
                    InvalidLayerState(
                        f"layer {layer_id} cannot be read while it is {layer.row.state}"
                    )
                )
            return reader(self._info(layer.row), self.chain(layer_id), parent)

        return await layer.lock.run(locked)
