"""
The layer machine's transitions for dockerd's operations: create, apply
and commit, get (map, then mount), put (unmount, then unmap, or keep the
device), release, remove, and the requests that have a better answer than
Automat's C{NoTransition}.

Importing this module adds the transitions to L{txgraph.layers.states.builder}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from txgraph.errors import InvalidLayerState
from txgraph.layers.core import LayerCore, LayerInputs, describe_failure
from txgraph.layers.states import (
    applying,
    committing,
    created,
    creating,
    faulty,
    mapped,
    mapping,
    mounted,
    mounting,
    new,
    released,
    removing,
    unmapping,
    unmounting,
)

# -- create ----------------------------------------------------------------


@new.upon(LayerInputs.create).to(creating)
def _create(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    pending = core.begin()
    core.row.state = "creating"
    # Not fsynced where a power cut that loses it leaves only what start
    # and gc clean (prepare_is_atomic, per layer): "created", durable,
    # covers it before the answer.
    d = core.store.insert_layer(
        core.row, durable=not core.registry.backend.prepares_atomically(core.info())
    )
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
    d = core.persist("faulty", error=f"remove failed: {describe_failure(failure)}")
    d.addBoth(lambda _: core.finish())


# -- apply and commit -------------------------------------------------------


def _startApplying(
    inputs: LayerInputs, core: LayerCore, work: Callable[[], Deferred[int]]
) -> Deferred[int]:
    # Write-ahead "applying", uncommitted: a crash recovers by emptying the
    # layer again (a fresh clone of its parent).
    pending = core.begin()
    core.step(inputs, "applying", work, committed=False, size=None)
    return pending


@created.upon(LayerInputs.applyDiff).to(applying)
def _apply(inputs: LayerInputs, core: LayerCore, stream: BinaryIO) -> Deferred[int]:
    return _startApplying(
        inputs, core, lambda: core.backend.apply(core.info(), stream, core.registry.id_map)
    )


@created.upon(LayerInputs.adoptShared).to(applying)
def _adopt(inputs: LayerInputs, core: LayerCore, chain: str) -> Deferred[int]:
    # containerd's remote-snapshot shortcut, in the same state as an ApplyDiff.
    return _startApplying(inputs, core, lambda: core.backend.adopt_shared(core.info(), chain))


@applying.upon(LayerInputs._succeeded).to(committing)
def _applied(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    size: int = result
    core.result = size
    core.step(
        inputs,
        "committing" if core.registry.backend.commits_layer(core.row.id) else None,
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
            "committing" if core.registry.backend.commits_layer(core.row.id) else None,
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
    d = core.persist("faulty", error=f"commit failed: {describe_failure(failure)}")
    d.addBoth(lambda _: core.finish())


@mounted.upon(LayerInputs.commit).loop()
def _commitMounted(inputs: LayerInputs, core: LayerCore) -> Deferred[None]:
    if core.registry.backend.commits_layer(core.row.id):
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
    maps = core.registry.backend.maps_layer(core.row.id)
    core.step(
        inputs, "mapping" if maps else None, lambda: core.backend.map(core.info())
    )
    return pending


@mapping.upon(LayerInputs._succeeded).to(mapped)
def _mapped(inputs: LayerInputs, core: LayerCore, result: Any) -> None:
    device: dict[str, Any] | None = result
    core.row.mapping = device
    if core.registry.backend.maps_layer(core.row.id):
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
        "unmapping" if core.registry.backend.maps_layer(core.row.id) else None,
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
    keep = core.registry.backend.unmap_delay > 0 and core.registry.backend.maps_layer(core.row.id)
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
        "unmapping" if core.registry.backend.maps_layer(core.row.id) else None,
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
        d = core.persist("faulty", error=f"{what} failed: {describe_failure(failure)}")
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


@mounted.upon(LayerInputs.adoptShared).loop()
def _adoptMounted(inputs: LayerInputs, core: LayerCore, chain: str) -> Deferred[int]:
    return _invalid(core, "cannot make it a clone of a shared layer: it is mounted")


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
faulty.upon(LayerInputs.adoptShared).loop()(_faultyRefuses("adopt a shared layer"))
faulty.upon(LayerInputs.commit).loop()(_faultyRefuses("commit"))
