"""
The layer state machine, and the registry that owns one machine per layer.

Every layer is an Automat L{TypeMachineBuilder} machine.  Its rest states
are C{created} (storage exists, nothing attached), C{mapped} (a block device
is attached), C{mounted} (mounted, with a persisted reference count) and the
terminal C{released} (storage and row gone); C{faulty} holds a layer whose
backend failed in a way that left reality unknown.  Every external side
effect happens in a "trying" state (creating, applying, committing, mapping,
mounting, unmounting, unmapping, removing) that is committed to the store
I{before} the backend is called, and the outcome is committed after it:
write-ahead transitions, so that recovery at start knows exactly what was
in flight and can finish or roll it back.

A backend that maps may keep a layer's device for a while after its last
Put (C{unmap_delay}): the layer rests in C{mapped}, and the registry feeds
C{release} once the delay has passed with no Get, or at once when the
layer is committed, gets an ApplyDiff, or the daemon stops.  dockerd gets
and puts a container's layer when it creates the container and gets it
again when it starts it: the second Get then only mounts.

Behaviours never raise.  They persist, start backend work in the thread
pool, and feed the outcome back as the private inputs C{_succeeded} or
C{_failed}; a failure thus becomes an explicit transition to an explicit
state.  Public inputs (C{get}, C{put}, ...) return a Deferred that fires
once the whole operation, every commit included, is done.  An input that
makes no sense in a state (Put on a layer nobody holds) raises Automat's
C{NoTransition}, which L{LayerRegistry} turns into L{InvalidLayerState}.

The registry serialises operations per layer (one in flight; the others
queue on a L{DeferredLock}), so trying states only ever see completions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, TypeVar

from automat import NoTransition, TypeMachineBuilder
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

from txgraph import faults
from txgraph.archive import IDMap
from txgraph.backends import AsyncBackend, LayerInfo
from txgraph.errors import (
    BadRequest,
    InvalidLayerState,
    LayerExists,
    TxgraphError,
    UnknownLayer,
)
from txgraph.store import LAYER_STATES, LayerRow, Store

log = Logger()
T = TypeVar("T")

#: States in which a layer is at rest: no backend operation is in flight.
REST_STATES = frozenset({"created", "mapped", "mounted", "faulty"})

#: Transitions into or out of these states change persistent storage (or
#: record a fault) and are committed durably, across a power cut.  The
#: others only concern mounts, mappings and references, which a power cut
#: destroys anyway: they are committed so as to survive a crash of txgraph,
#: which is cheaper (no fsync) and enough (see Store.update_layer_thd).
DURABLE_STATES = frozenset({"creating", "applying", "committing", "removing", "faulty"})

#: The most lower layers under a layer: dockerd's deepest chain is 125
#: layers (moby's maxLayerDepth); accept a little more, as moby's overlay2
#: does (128 lowers, a chain of 129, what moby's graphtest builds), and
#: refuse beyond.
MAX_DEPTH = 128


class LayerInputs(Protocol):
    """
    What can happen to a layer.
    """

    def create(self) -> Deferred[None]:
        """
        Make the layer's storage (an empty directory or a clone of the
        parent).
        """

    def applyDiff(self, stream: BinaryIO) -> Deferred[int]:
        """
        Replace the layer's content with a layer tar; fire with its size.
        """

    def commit(self) -> Deferred[None]:
        """
        Make the layer immutable so that children can be made from it.
        """

    def get(self) -> Deferred[str]:
        """
        Take a reference, mounting on the first; fire with the directory.
        """

    def put(self) -> Deferred[None]:
        """
        Drop a reference, unmounting on the last, and unmapping too unless
        the backend keeps the device for a while (C{unmap_delay}).
        """

    def release(self) -> Deferred[None]:
        """
        Unmap the device a layer kept (after its last Put, or since its
        Create).
        """

    def remove(self) -> Deferred[None]:
        """
        Delete the layer's storage and forget it.
        """

    def recover(self) -> Deferred[None]:
        """
        At start, on the same boot: finish or roll back whatever was in
        flight, and check that what is at rest is still real.
        """

    def recoverAfterReboot(self) -> Deferred[None]:
        """
        At start after the host rebooted: every mount and mapping is gone
        and every holder with it; return to C{created}.
        """

    def _succeeded(self, result: Any) -> None:
        """
        The backend operation in flight succeeded with C{result}.
        """

    def _kept(self, result: Any) -> None:
        """
        The device stays mapped: a last Put's unmount succeeded, or a
        Create made the layer and mapped it (C{result}: the mapping).
        """

    def _failed(self, failure: Failure) -> None:
        """
        The backend operation in flight failed.
        """

    def _proceed(self) -> None:
        """
        Go on to the next step of a multi-step operation.
        """

    def _lost(self, why: str) -> None:
        """
        Recovery found that reality contradicts the record (storage gone,
        a mount that cannot be restored): the layer is faulty.
        """


class LayerCore:
    """
    What a layer machine's behaviours work with: the persisted row, the
    store, the backend, and the caller waiting on the operation in flight.

    @ivar row: the layer as persisted; behaviours change it and persist it.
    @ivar pending: the Deferred handed to the caller of the public input in
        flight, fired by the behaviour that completes the operation.
    @ivar failure: a failure to report once a rollback has finished.
    @ivar result: the value to fire C{pending} with on success.
    """

    def __init__(self, row: LayerRow, registry: LayerRegistry) -> None:
        self.row = row
        self.registry = registry
        self.pending: Deferred[Any] | None = None
        self.failure: Failure | None = None
        self.result: Any = None

    @property
    def backend(self) -> AsyncBackend:
        """
        The backend, through its thread-pool adapter.
        """
        return self.registry.backend

    @property
    def store(self) -> Store:
        """
        The state database.
        """
        return self.registry.store

    def info(self) -> LayerInfo:
        """
        What the backend needs to know about this layer.
        """
        return self.registry.info(self.row.id)

    def begin(self) -> Deferred[Any]:
        """
        Start a public operation: return the Deferred its caller gets.
        """
        self.pending = Deferred()
        self.failure = None
        self.result = None
        return self.pending

    def finish(self) -> None:
        """
        The operation is over: fire the caller's Deferred, with the
        remembered failure if a rollback ran, else with C{self.result}.
        """
        pending, self.pending = self.pending, None
        failure, self.failure = self.failure, None
        if pending is None:
            return
        if failure is not None:
            pending.errback(failure)
        else:
            pending.callback(self.result)

    def fail(self, failure: Failure) -> None:
        """
        The operation is over and failed.
        """
        self.failure = failure
        self.finish()

    def persist(self, state: str, **fields: Any) -> Deferred[None]:
        """
        Set the row's state (and fields) and commit it.
        """
        assert state in LAYER_STATES, state
        durable = state in DURABLE_STATES or self.row.state in DURABLE_STATES
        self.row.state = state
        for name, value in fields.items():
            setattr(self.row, name, value)
        return self.store.update_layer(self.row, durable)

    def step(
        self,
        inputs: LayerInputs,
        trying: str | None,
        work: Callable[[], Deferred[Any]],
        succeeded: Callable[[Any], None] | None = None,
        **fields: Any,
    ) -> None:
        """
        Run one backend operation with a write-ahead transition: commit the
        C{trying} state, then run C{work}, then feed its outcome back as
        C{_succeeded} (or the input C{succeeded}) or C{_failed}.
        C{trying=None} says this backend has nothing to do for the step
        (overlay never maps): it succeeds at once, with nothing recorded
        and no thread hop.
        """
        if succeeded is None:
            succeeded = inputs._succeeded
        if trying is None:
            for name, value in fields.items():
                setattr(self.row, name, value)
            succeeded(None)
            return
        d = self.persist(trying, **fields)
        d.addCallback(lambda _: self._work(trying, work))
        d.addCallbacks(succeeded, inputs._failed)
        d.addErrback(self._bug)

    def _work(self, trying: str, work: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        # The crash points around every side effect (txgraph.faults).
        faults.point(f"{trying}.before")

        def after(result: Any) -> Any:
            faults.point(f"{trying}.after")
            return result

        return work().addBoth(after)

    def settle(self, state: str, **fields: Any) -> None:
        """
        Commit a rest state, then fire the caller's Deferred.
        """
        d = self.persist(state, **fields)
        d.addCallbacks(lambda _: self.finish(), self._persistFailed)

    def _persistFailed(self, failure: Failure) -> None:
        log.failure(
            "could not persist layer {id} in state {state}",
            failure,
            id=self.row.id,
            state=self.row.state,
        )
        self.fail(failure)

    def _bug(self, failure: Failure) -> None:
        log.failure("internal error in layer {id}", failure, id=self.row.id)
        if self.pending is not None:
            self.fail(failure)


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, TxgraphError):
        return value.message
    return f"{type(value).__name__}: {value}"


builder = TypeMachineBuilder(LayerInputs, LayerCore)

new = builder.state("new")
creating = builder.state("creating")
created = builder.state("created")
applying = builder.state("applying")
committing = builder.state("committing")
mapping = builder.state("mapping")
mapped = builder.state("mapped")
mounting = builder.state("mounting")
mounted = builder.state("mounted")
unmounting = builder.state("unmounting")
unmapping = builder.state("unmapping")
removing = builder.state("removing")
released = builder.state("released")
faulty = builder.state("faulty")

#: The persisted states, by name, for restoring machines from the store.
STATES = {
    s.name: s
    for s in (
        creating,
        created,
        applying,
        committing,
        mapping,
        mapped,
        mounting,
        mounted,
        unmounting,
        unmapping,
        removing,
        faulty,
    )
}
assert set(STATES) == set(LAYER_STATES)


# -- create ----------------------------------------------------------------


@new.upon(LayerInputs.create).to(creating)
def _create(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    core.row.state = "creating"
    d = core.store.insert_layer(core.row)
    d.addCallback(lambda _: core._work("creating", lambda: core.backend.prepare(core.info())))
    d.addCallbacks(
        # A mapping: the backend mapped the new layer too (it keeps devices).
        lambda mapping: (inputs._succeeded if mapping is None else inputs._kept)(mapping),
        inputs._failed,
    )
    d.addErrback(core._bug)
    return pending


@creating.upon(LayerInputs._succeeded).to(created)
def _created(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.settle("created")


@creating.upon(LayerInputs._kept).to(mapped)
def _createdMapped(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.settle("mapped", mapping=result)


@creating.upon(LayerInputs._failed).to(removing)
def _createFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    # Roll back whatever part of the storage was made; the caller gets the
    # original failure once the layer is gone.
    core.failure = failure
    core.step(inputs, "removing", lambda: core.backend.remove(core.info()))


# -- remove ----------------------------------------------------------------


def _startRemove(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    core.step(inputs, "removing", lambda: core.backend.remove(core.info()))
    return pending


created.upon(LayerInputs.remove).to(removing)(_startRemove)
mapped.upon(LayerInputs.remove).to(removing)(_startRemove)
faulty.upon(LayerInputs.remove).to(removing)(_startRemove)


@removing.upon(LayerInputs._succeeded).to(released)
def _removed(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    d = core.store.delete_layer(core.row.id)
    d.addCallback(lambda _: core.registry.forget(core.row.id))
    d.addCallbacks(lambda _: core.finish(), core._persistFailed)


@removing.upon(LayerInputs._failed).to(faulty)
def _removeFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    if core.failure is None:
        core.failure = failure
    d = core.persist("faulty", error=f"remove failed: {_describe(failure)}")
    d.addBoth(lambda _: core.finish())


# -- apply and commit -------------------------------------------------------


@created.upon(LayerInputs.applyDiff).to(applying)
def _apply(inputs: LayerInputs, core: LayerCore, stream: BinaryIO) -> Deferred[int]:
    pending = core.begin()
    core.step(
        inputs,
        "applying",
        lambda: core.backend.apply(core.info(), stream, core.registry.id_map),
        committed=False,
        size=None,
    )
    return pending


@applying.upon(LayerInputs._succeeded).to(committing)
def _applied(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    size: int = result
    core.result = size
    core.step(
        inputs,
        "committing" if core.registry.backend.commits else None,
        lambda: core.backend.commit(core.info()),
        size=size,
    )


@applying.upon(LayerInputs._failed).to(created)
def _applyFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    # The backend left the layer empty again (apply starts by emptying it,
    # and cleans up after itself when it fails), so it is back at rest.
    core.failure = failure
    core.settle("created", committed=False, size=None)


def _startCommit(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    if core.row.committed:
        inputs._succeeded(None)
    else:
        core.step(
            inputs,
            "committing" if core.registry.backend.commits else None,
            lambda: core.backend.commit(core.info()),
        )
    return pending


created.upon(LayerInputs.commit).to(committing)(_startCommit)


@committing.upon(LayerInputs._succeeded).to(created)
def _committed(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.settle("created", committed=True)


@committing.upon(LayerInputs._failed).to(faulty)
def _commitFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    core.failure = failure
    d = core.persist("faulty", error=f"commit failed: {_describe(failure)}")
    d.addBoth(lambda _: core.finish())


@mounted.upon(LayerInputs.commit).loop()
def _commitMounted(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    if core.registry.backend.commits:
        return _invalid(
            core, "it is mounted; a layer is committed only when nothing holds it"
        )
    pending = core.begin()
    core.settle("mounted", committed=True)
    return pending


# -- get: map, then mount ----------------------------------------------------


@created.upon(LayerInputs.get).to(mapping)
def _startGet(inputs: LayerInputs, core: LayerCore) -> Deferred[str]:
    pending = core.begin()
    maps = core.registry.backend.maps
    core.step(
        inputs, "mapping" if maps else None, lambda: core.backend.map(core.info())
    )
    return pending


@mapping.upon(LayerInputs._succeeded).to(mapped)
def _mapped(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    device: dict[str, Any] | None = result
    core.row.mapping = device
    if core.registry.backend.maps:
        d = core.persist("mapped")
        d.addCallbacks(lambda _: inputs._proceed(), core._persistFailed)
    else:
        core.row.state = "mapped"
        inputs._proceed()


@mapping.upon(LayerInputs._failed).to(created)
def _mapFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    core.failure = failure
    core.settle("created", mapping=None)


def _startMount(inputs: LayerInputs, core: LayerCore) -> None:
    core.step(
        inputs, "mounting", lambda: core.backend.mount(core.info(), core.registry.chain(core.row.id))
    )


mapped.upon(LayerInputs._proceed).to(mounting)(_startMount)


@mapped.upon(LayerInputs.get).to(mounting)
def _getMapped(inputs: LayerInputs, core: LayerCore) -> Deferred[str]:
    pending = core.begin()
    _startMount(inputs, core)
    return pending


@mounting.upon(LayerInputs._succeeded).to(mounted)
def _mounted(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    directory: str = result
    core.result = directory
    core.settle("mounted", refcount=1, mountpoint=directory, error=None)


@mounting.upon(LayerInputs._failed).to(unmapping)
def _mountFailed(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
    # Roll back the mapping, then report the mount's failure.
    core.failure = failure
    core.step(
        inputs,
        "unmapping" if core.registry.backend.maps else None,
        lambda: core.backend.unmap(core.info()),
    )


@mounted.upon(LayerInputs.get).loop()
def _getMounted(inputs: LayerInputs, core: LayerCore) -> Deferred[str]:
    pending = core.begin()
    core.result = core.row.mountpoint
    core.settle("mounted", refcount=core.row.refcount + 1)
    return pending


# -- put: unmount, then unmap -------------------------------------------------


@mounted.upon(LayerInputs.put).loop()
def _put(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    if core.row.refcount > 1:
        core.settle("mounted", refcount=core.row.refcount - 1)
    else:
        inputs._proceed()
    return pending


@mounted.upon(LayerInputs._proceed).to(unmounting)
def _lastPut(inputs: LayerInputs, core: LayerCore) -> None:
    # A backend that keeps the device (unmap_delay) goes back to mapped,
    # and the registry unmaps it later unless a Get comes first.
    keep = core.registry.backend.unmap_delay > 0
    core.step(
        inputs,
        "unmounting",
        lambda: core.backend.unmount(core.info()),
        succeeded=inputs._kept if keep else None,
        refcount=0,
    )


@unmounting.upon(LayerInputs._kept).to(mapped)
def _unmountedKept(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.settle("mapped", mountpoint=None, refcount=0)


@unmounting.upon(LayerInputs._succeeded).to(unmapping)
def _unmounted(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.row.mountpoint = None
    core.step(
        inputs,
        "unmapping" if core.registry.backend.maps else None,
        lambda: core.backend.unmap(core.info()),
    )


@mapped.upon(LayerInputs.release).to(unmapping)
def _release(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    core.step(inputs, "unmapping", lambda: core.backend.unmap(core.info()))
    return pending


@unmapping.upon(LayerInputs._succeeded).to(created)
def _unmapped(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    core.settle("created", mapping=None, mountpoint=None, refcount=0)


def _toFaulty(what: str) -> Any:
    def behaviour(inputs: LayerInputs, core: LayerCore, failure: Failure) -> None:
        if core.failure is None:
            core.failure = failure
        d = core.persist("faulty", error=f"{what} failed: {_describe(failure)}")
        d.addBoth(lambda _: core.finish())

    behaviour.__name__ = f"_{what}Failed"
    return behaviour


unmounting.upon(LayerInputs._failed).to(faulty)(_toFaulty("unmount"))
unmapping.upon(LayerInputs._failed).to(faulty)(_toFaulty("unmap"))


# -- invalid requests that have a better answer than NoTransition -----------


def _invalid(core: LayerCore, why: str) -> Deferred[Any]:
    return fail(
        Failure(InvalidLayerState(f"layer {core.row.id}: {why}"))
    )


@mounted.upon(LayerInputs.remove).loop()
def _removeMounted(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    return _invalid(
        core,
        f"cannot remove: it is mounted ({core.row.refcount} "
        f"reference{'s' if core.row.refcount != 1 else ''} from Get)",
    )


@mounted.upon(LayerInputs.applyDiff).loop()
def _applyMounted(inputs: LayerInputs, core: LayerCore, stream: BinaryIO) -> Deferred[int]:
    return _invalid(core, "cannot ApplyDiff: it is mounted")


def _putUnheld(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    return _invalid(core, "Put without Get: nothing holds this layer")


created.upon(LayerInputs.put).loop()(_putUnheld)
mapped.upon(LayerInputs.put).loop()(_putUnheld)


def _faultyRefuses(what: str) -> Callable[..., Deferred[Any]]:
    def behaviour(inputs: LayerInputs, core: LayerCore, *args: Any) -> Deferred[Any]:
        return _invalid(
            core,
            f"cannot {what}: the layer is faulty ({core.row.error}); "
            "remove it, or run txgraph-admin gc",
        )

    return behaviour


faulty.upon(LayerInputs.get).loop()(_faultyRefuses("Get"))
faulty.upon(LayerInputs.put).loop()(_faultyRefuses("Put"))
faulty.upon(LayerInputs.applyDiff).loop()(_faultyRefuses("ApplyDiff"))
faulty.upon(LayerInputs.commit).loop()(_faultyRefuses("commit"))


# -- recovery at start -------------------------------------------------------


def _recoverBy(
    trying: str, work: Callable[[LayerCore], Deferred[Any]], **fields: Any
) -> Callable[[LayerInputs, LayerCore], Deferred[None]]:
    def behaviour(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
        pending = core.begin()
        core.step(inputs, trying, lambda: work(core), **fields)
        return pending

    return behaviour


def _remove(core: LayerCore) -> Deferred[Any]:
    return core.backend.remove(core.info())


def _commit(core: LayerCore) -> Deferred[Any]:
    return core.backend.commit(core.info())


def _unmount(core: LayerCore) -> Deferred[Any]:
    return core.backend.unmount(core.info())


def _unmap(core: LayerCore) -> Deferred[Any]:
    return core.backend.unmap(core.info())


def _reset(core: LayerCore) -> Deferred[Any]:
    return core.backend.reset(core.info())


def _stayFaulty(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    # A faulty layer waits for Remove or txgraph-admin gc.
    return succeed(None)


for recoverInput in (LayerInputs.recover, LayerInputs.recoverAfterReboot):
    # Whatever was being created is rolled back: dockerd never got an answer.
    creating.upon(recoverInput).to(removing)(_recoverBy("removing", _remove))
    removing.upon(recoverInput).loop()(_recoverBy("removing", _remove))
    # A commit is finished (commits are idempotent).
    committing.upon(recoverInput).loop()(_recoverBy("committing", _commit))
    # Half-made mappings and mounts are undone; nobody got their directory.
    mapping.upon(recoverInput).to(unmapping)(_recoverBy("unmapping", _unmap))
    mapped.upon(recoverInput).to(unmapping)(_recoverBy("unmapping", _unmap))
    mounting.upon(recoverInput).to(unmounting)(
        _recoverBy("unmounting", _unmount, refcount=0)
    )
    unmounting.upon(recoverInput).loop()(_recoverBy("unmounting", _unmount))
    unmapping.upon(recoverInput).loop()(_recoverBy("unmapping", _unmap))
    faulty.upon(recoverInput).loop()(_stayFaulty)


@applying.upon(LayerInputs.recover).to(created)
def _recoverApplying(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    # dockerd may still retry the ApplyDiff (or Remove the layer): empty it
    # and put it back at rest, uncommitted.  The record keeps saying
    # "applying" until the reset is done, so a crash now recovers again.
    pending = core.begin()
    d = core.backend.reset(core.info())
    d.addCallbacks(
        lambda _: core.settle("created", committed=False, size=None),
        lambda f: inputs._lost(f"could not empty it after an interrupted ApplyDiff: {_describe(f)}"),
    )
    d.addErrback(core._bug)
    return pending


applying.upon(LayerInputs.recoverAfterReboot).to(created)(_recoverApplying)


def _checkExists(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    # A layer at rest must still have its storage; if it is gone the layer
    # is lost, and saying so (faulty) beats serving an empty directory.
    pending = core.begin()
    d = core.backend.exists(core.info())

    def checked(exists: bool) -> None:
        if exists:
            core.finish()
        else:
            inputs._lost("its storage is missing from the backend")

    d.addCallbacks(checked, core.fail)
    d.addErrback(core._bug)
    return pending


created.upon(LayerInputs.recover).loop()(_checkExists)
created.upon(LayerInputs.recoverAfterReboot).loop()(_checkExists)


@mounted.upon(LayerInputs.recover).loop()
def _recoverMounted(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    # Same boot: the holders (running containers) are still there; make
    # sure the mount is too, and keep the reference count.
    pending = core.begin()
    d = core.backend.ensure_mounted(core.info(), core.registry.chain(core.row.id))

    def remounted(directory: str) -> None:
        if directory != core.row.mountpoint:
            core.settle("mounted", mountpoint=directory)
        else:
            core.finish()

    d.addCallbacks(
        remounted,
        lambda f: inputs._lost(f"its mount could not be restored: {_describe(f)}"),
    )
    d.addErrback(core._bug)
    return pending


def _markLost(inputs: LayerInputs, core: LayerCore, why: str) -> None:
    # Recovery itself succeeded: it found out what is wrong, and says so.
    d = core.persist("faulty", error=why)
    d.addCallbacks(lambda _: core.finish(), core._persistFailed)


created.upon(LayerInputs._lost).to(faulty)(_markLost)
mounted.upon(LayerInputs._lost).to(faulty)(_markLost)


@mounted.upon(LayerInputs.recoverAfterReboot).to(unmounting)
def _recoverMountedAfterReboot(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    # The host rebooted: nobody holds the layer any more.
    pending = core.begin()
    core.step(
        inputs, "unmounting", lambda: core.backend.unmount(core.info()), refcount=0
    )
    return pending


LayerMachine = builder.build()


def transitions() -> Iterator[tuple[str, str, str]]:
    """
    Every transition of the layer machine as (from state, input, to state),
    read from the built machine itself (for the docs' diagram).
    """
    automaton = LayerMachine.__automat_automaton__
    for start, inp, end, _outputs in sorted(
        automaton.allTransitions(), key=lambda t: (t[0].name, t[1], t[2].name)
    ):
        yield start.name, inp, end.name


@dataclass
class Layer:
    """
    A layer known to the registry: its machine, core and lock.

    @ivar children: IDs of the layers whose parent this is.
    @ivar release_call: the timer that unmaps a device kept after the
        last Put.
    """

    core: LayerCore
    machine: LayerInputs
    lock: DeferredLock = field(default_factory=DeferredLock)
    children: set[str] = field(default_factory=set)
    release_call: IDelayedCall | None = None

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
        return LayerInfo(
            id=row.id,
            parent=row.parent,
            readwrite=row.readwrite,
            mapping=row.mapping,
            storage_opt=dict(row.storage_opt),
            root_ids=self.id_map.to_host(0, 0),
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
    ) -> None:
        """
        Create a layer (Create or CreateReadWrite).  Asking again for a layer
        that exists with the same parent and kind succeeds (dockerd retries).
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
                error=_describe(Failure()),
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


__all__ = [
    "LayerInputs",
    "LayerCore",
    "LayerMachine",
    "LayerRegistry",
    "Layer",
    "STATES",
    "REST_STATES",
    "DURABLE_STATES",
    "transitions",
    "mermaid",
]


def mermaid() -> str:
    """
    The layer machine as a Mermaid state diagram, drawn from the built
    machine's transition table (C{python -m txgraph.layers}).
    """
    edges: dict[tuple[str, str], list[str]] = {}
    for start, inp, end in transitions():
        edges.setdefault((start, end), []).append(inp)
    lines = ["stateDiagram-v2", "    [*] --> new"]
    for (start, end), inputs in sorted(edges.items()):
        label = ", ".join(sorted(set(inputs)))
        lines.append(f"    {start} --> {end}: {label}")
    lines.append("    released --> [*]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(mermaid(), end="")
