"""
The layer machine's transitions for recovery at start: each persisted
trying state is finished or rolled back, and each layer at rest is checked
against the backend (C{recover} on the same boot, C{recoverAfterReboot}
after the host rebooted, when every mount and mapping is gone).

Importing this module adds the transitions to L{txgraph.layers.states.builder}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

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
    removing,
    unmapping,
    unmounting,
)

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
        lambda f: inputs._lost(f"could not empty it after an interrupted ApplyDiff: {describe_failure(f)}"),
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
        lambda f: inputs._lost(f"its mount could not be restored: {describe_failure(f)}"),
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
