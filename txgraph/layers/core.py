"""
What a layer machine drives: L{LayerCore} (the persisted row, the store
and backend it works with, the caller waiting on the operation in flight,
and the write-ahead C{step}/C{settle} helpers every transition uses), the
inputs a machine accepts (L{LayerInputs}), and what the state names mean
(L{REST_STATES}, L{DURABLE_STATES}).

The core knows its registry only as a L{LayerOwner}, so that this module
sits below the registry that builds cores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgraph import faults
from txgraph.backends import LayerInfo
from txgraph.backends.threaded import AsyncBackend
from txgraph.errors import TxgraphError
from txgraph.model import IDMap
from txgraph.store import LAYER_STATES, LayerRow, Store

log = Logger()

#: States in which a layer is at rest: no backend operation is in flight.
REST_STATES = frozenset({"created", "mapped", "mounted", "faulty"})

#: Transitions into or out of these states change persistent storage (or
#: record a fault) and are committed durably, across a power cut.  The
#: others only concern mounts, mappings and references, which a power cut
#: destroys anyway: they are committed so as to survive a crash of txgraph,
#: which is cheaper (no fsync) and enough (see Store.update_layer_thd).
DURABLE_STATES = frozenset({"creating", "applying", "committing", "removing", "faulty"})


class LayerOwner(Protocol):
    """
    What a layer's core needs from the registry that owns it (see
    L{txgraph.layers.registry.LayerRegistry}).

    @ivar id_map: Init's UIDMaps/GIDMaps (userns-remap), or the identity.
    """

    backend: AsyncBackend
    store: Store
    id_map: IDMap

    def info(self, layer_id: str) -> LayerInfo:
        """
        The backend's view of a layer.
        """

    def chain(self, layer_id: str) -> list[LayerInfo]:
        """
        The layer's ancestors, nearest first.
        """

    def forget(self, layer_id: str) -> None:
        """
        Drop a released layer.
        """


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

    def adoptShared(self, chain: str) -> Deferred[int]:
        """
        Make the layer a clone of the shared layer of an OCI chain ID that
        the pool already holds (containerd's remote-snapshot shortcut),
        as an ApplyDiff of that layer would; fire with its size.
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

    def __init__(self, row: LayerRow, registry: LayerOwner) -> None:
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


def describe_failure(failure: Failure) -> str:
    """
    A failure as one line for a layer's recorded error or a log: a
    txgraph error's own message, else the exception's type and text.
    """
    value = failure.value
    if isinstance(value, TxgraphError):
        return value.message
    return f"{type(value).__name__}: {value}"
