"""
Tests for the layer state machine and registry: every persisted state
against every input (invalid ones included), failure of every backend step,
and the write-ahead rule (the trying state is committed before the backend
is called).  No reactor, no threads: the store and backend run inline.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txgraph.backends import Backend
from txgraph.backends.threaded import AsyncBackend
from txgraph.errors import BackendError, BadRequest, InvalidLayerState, LayerExists, UnknownLayer
from txgraph.layers.machine import transitions
from txgraph.layers.registry import LayerRegistry
from txgraph.layers.states import STATES
from txgraph.store import LAYER_STATES, LayerRow, Store
from txgraph.testing.fake import FakeBackend

A = "a" * 64
B = "b" * 64
C = "c" * 64


class InlineThread:
    """
    Runs "threaded" calls at once, in the caller's thread.
    """

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        try:
            return succeed(fn(*args))
        except Exception:
            return fail(Failure())


class InlineBackend(AsyncBackend):
    """
    The thread-pool adapter, minus the threads.
    """

    def __init__(self, backend: Backend) -> None:
        self.sync = backend
        self._inline = InlineThread()

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._inline.run(fn, *args)


class Harness:
    """
    A registry over a fake backend and a real (inline) SQLite store.
    """

    def __init__(
        self, tmp_path: Any, maps: bool = True, commits: bool = True, unmap_delay: float = 0.0,
        fake_class: type[FakeBackend] = FakeBackend,
    ) -> None:
        self.store = Store(str(tmp_path / "state.db"), InlineThread())  # type: ignore[arg-type]
        self.store.open_thd()
        self.fake = fake_class(self.store, maps=maps, commits=commits)
        self.fake.unmap_delay = unmap_delay
        self.clock = Clock()
        self.registry = LayerRegistry(self.store, InlineBackend(self.fake), self.clock)

    def run(self, coro: Any) -> Any:
        d = ensureDeferred(coro)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "operation did not complete synchronously"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def row(self, layer_id: str) -> LayerRow | None:
        for row in self.store.load_layers_thd():
            if row.id == layer_id:
                return row
        return None

    def at(self, state: str, refcount: int = 0, parent: str | None = None) -> str:
        """
        Restore a layer A persisted in C{state}, without recovering it.
        """
        row = LayerRow(
            id=A,
            parent=parent,
            kind="rw",
            state=state,
            refcount=refcount,
            mountpoint=f"/mnt/{A}" if state == "mounted" else None,
            error="boom" if state == "faulty" else None,
        )
        self.store.insert_layer_thd(row)
        self.fake.existing.add(A)
        self.registry._add(row, STATES[state])
        return A


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(tmp_path)


PUBLIC_INPUTS = (
    "get", "put", "release", "applyDiff", "commit", "remove", "recover", "recoverAfterReboot"
)

#: (state, input) -> (final persisted state or None when the row is gone,
#: whether the call succeeds).  Anything not listed is refused with
#: InvalidLayerState and leaves the state unchanged.
EXPECTED: dict[tuple[str, str], tuple[str | None, bool]] = {
    ("creating", "recover"): (None, True),
    ("creating", "recoverAfterReboot"): (None, True),
    ("created", "get"): ("mounted", True),
    ("created", "applyDiff"): ("created", True),
    ("created", "commit"): ("created", True),
    ("created", "remove"): (None, True),
    ("created", "recover"): ("created", True),
    ("created", "recoverAfterReboot"): ("created", True),
    ("applying", "recover"): ("created", True),
    ("applying", "recoverAfterReboot"): ("created", True),
    ("committing", "recover"): ("created", True),
    ("committing", "recoverAfterReboot"): ("created", True),
    ("mapping", "recover"): ("created", True),
    ("mapping", "recoverAfterReboot"): ("created", True),
    ("mapped", "get"): ("mounted", True),
    ("mapped", "remove"): (None, True),
    ("mapped", "release"): ("created", True),
    ("mapped", "recover"): ("created", True),
    ("mapped", "recoverAfterReboot"): ("created", True),
    ("mounting", "recover"): ("created", True),
    ("mounting", "recoverAfterReboot"): ("created", True),
    ("mounted", "get"): ("mounted", True),
    ("mounted", "put"): ("created", True),
    ("mounted", "recover"): ("mounted", True),
    ("mounted", "recoverAfterReboot"): ("created", True),
    ("unmounting", "recover"): ("created", True),
    ("unmounting", "recoverAfterReboot"): ("created", True),
    ("unmapping", "recover"): ("created", True),
    ("unmapping", "recoverAfterReboot"): ("created", True),
    ("removing", "recover"): (None, True),
    ("removing", "recoverAfterReboot"): (None, True),
    ("faulty", "remove"): (None, True),
    ("faulty", "recover"): ("faulty", True),
    ("faulty", "recoverAfterReboot"): ("faulty", True),
}


def _call(h: Harness, layer_id: str, name: str) -> Any:
    layer = h.registry.lookup(layer_id)
    machine = layer.machine
    if name == "applyDiff":
        def op() -> Deferred[Any]:
            return machine.applyDiff(io.BytesIO(b"tar"))
    else:
        op = getattr(machine, name)

    async def run() -> Any:
        return await h.registry._run(layer, op)

    return h.run(run())


@pytest.mark.parametrize("state", LAYER_STATES)
@pytest.mark.parametrize("inp", PUBLIC_INPUTS)
def test_state_by_input(h: Harness, state: str, inp: str) -> None:
    """
    Every persisted state answers every public input as the table says,
    and a refused input changes nothing.
    """
    layer_id = h.at(state, refcount=1 if state == "mounted" else 0)
    expected = EXPECTED.get((state, inp))
    if expected is None:
        before = h.row(layer_id)
        with pytest.raises(InvalidLayerState):
            _call(h, layer_id, inp)
        assert h.row(layer_id) == before
        assert h.fake.calls == []
        return
    final, _ = expected
    _call(h, layer_id, inp)
    row = h.row(layer_id)
    if final is None:
        assert row is None
        assert layer_id not in h.registry
    else:
        assert row is not None and row.state == final
        assert h.registry.lookup(layer_id).row.state == final


def test_write_ahead(h: Harness) -> None:
    """
    Every backend side effect happens while its trying state is committed.
    """
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.apply(A, io.BytesIO(b"x" * 10)))
    h.run(h.registry.create(B, A, True, {}))
    h.run(h.registry.get(B))
    h.run(h.registry.put(B))
    h.run(h.registry.remove(B))
    assert [(name, state) for name, _, state in h.fake.calls] == [
        ("prepare", "creating"),
        ("apply", "applying"),
        ("commit", "committing"),
        ("prepare", "creating"),
        ("map", "mapping"),
        ("mount", "mounting"),
        ("unmount", "unmounting"),
        ("unmap", "unmapping"),
        ("remove", "removing"),
    ]


def test_no_write_ahead_for_noop_steps(tmp_path: Any) -> None:
    """
    A backend that neither maps nor commits is not asked to, and no trying
    state is recorded for those steps.
    """
    h = Harness(tmp_path, maps=False, commits=False)
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.create(B, A, True, {}))
    assert h.run(h.registry.get(B)) == f"/mnt/{B}"
    h.run(h.registry.put(B))
    names = [name for name, _, _ in h.fake.calls]
    assert "map" not in names and "commit" not in names


def test_refcount_nests(h: Harness) -> None:
    """
    Get nests; the mount goes away only at the last Put; a further Put is
    refused as Put without Get.
    """
    h.run(h.registry.create(A, None, True, {}))
    for _ in range(3):
        assert h.run(h.registry.get(A)) == f"/mnt/{A}"
    row = h.row(A)
    assert row is not None and row.refcount == 3
    h.run(h.registry.put(A))
    h.run(h.registry.put(A))
    assert [n for n, _, _ in h.fake.calls].count("unmount") == 0
    h.run(h.registry.put(A))
    row = h.row(A)
    assert row is not None and (row.state, row.refcount) == ("created", 0)
    with pytest.raises(InvalidLayerState, match="Put without Get"):
        h.run(h.registry.put(A))


@pytest.mark.parametrize(
    "failing, operation, final",
    [
        ("prepare", "create", None),
        ("map", "get", "created"),
        ("mount", "get", "created"),
        ("unmount", "put", "faulty"),
        ("unmap", "put", "faulty"),
        ("apply", "apply", "created"),
        ("commit", "apply", "faulty"),
        ("remove", "remove", "faulty"),
    ],
)
def test_step_failure(h: Harness, failing: str, operation: str, final: str | None) -> None:
    """
    A failing backend step fails the call with its error and leaves the
    layer in an explicit state: rolled back, or faulty.
    """
    if operation != "create":
        h.run(h.registry.create(A, None, True, {}))
    if operation == "put":
        h.run(h.registry.get(A))
    h.fake.failing.add(failing)
    ops: dict[str, Callable[[], Any]] = {
        "create": lambda: h.registry.create(A, None, True, {}),
        "get": lambda: h.registry.get(A),
        "put": lambda: h.registry.put(A),
        "apply": lambda: h.registry.apply(A, io.BytesIO(b"tar")),
        "remove": lambda: h.registry.remove(A),
    }
    with pytest.raises(BackendError, match="injected"):
        h.run(ops[operation]())
    row = h.row(A)
    if final is None:
        assert row is None and A not in h.registry
    else:
        assert row is not None and row.state == final
        if final == "faulty":
            assert row.error and "injected" in row.error


def test_mount_failure_unmaps(h: Harness) -> None:
    """
    When the mount fails after the map succeeded, the map is undone.
    """
    h.run(h.registry.create(A, None, True, {}))
    h.fake.failing.add("mount")
    with pytest.raises(BackendError):
        h.run(h.registry.get(A))
    assert [n for n, _, _ in h.fake.calls][-3:] == ["map", "mount", "unmap"]


def test_create_rollback_failure_is_faulty(h: Harness) -> None:
    """
    A failed Create whose rollback fails too leaves a faulty layer that
    Remove can finish.
    """
    h.fake.failing.update({"prepare", "remove"})
    with pytest.raises(BackendError, match="prepare"):
        h.run(h.registry.create(A, None, True, {}))
    row = h.row(A)
    assert row is not None and row.state == "faulty"
    h.fake.failing.clear()
    h.run(h.registry.remove(A))
    assert h.row(A) is None


def test_create_checks(h: Harness) -> None:
    """
    Create refuses a missing parent and a conflicting existing layer, and
    accepts a repeat of the same Create.
    """
    with pytest.raises(UnknownLayer, match="parent"):
        h.run(h.registry.create(B, A, False, {}))
    assert B not in h.registry and h.row(B) is None
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.create(A, None, False, {}))
    with pytest.raises(LayerExists):
        h.run(h.registry.create(A, None, True, {}))


def test_depth_limit(h: Harness) -> None:
    """
    A chain of 129 layers (128 lower layers under the top, moby's
    DriverTestDeepLayerRead(128)) is made; a 130th is refused, saying
    why, and leaves nothing.
    """
    parent = None
    for i in range(129):
        h.run(h.registry.create(f"layer-{i}", parent, False, {}))
        parent = f"layer-{i}"
    with pytest.raises(BadRequest, match="more than 128 lower layers"):
        h.run(h.registry.create("too-deep", parent, False, {}))
    assert "too-deep" not in h.registry and h.row("too-deep") is None


def test_remove_checks(h: Harness) -> None:
    """
    Remove refuses a parent and a mounted layer, and succeeds for a layer
    that does not exist.
    """
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.create(B, A, True, {}))
    with pytest.raises(InvalidLayerState, match="parent of 1"):
        h.run(h.registry.remove(A))
    h.run(h.registry.get(B))
    with pytest.raises(InvalidLayerState, match="mounted"):
        h.run(h.registry.remove(B))
    h.run(h.registry.put(B))
    h.run(h.registry.remove(B))
    h.run(h.registry.remove(A))
    h.run(h.registry.remove(C))
    assert h.store.load_layers_thd() == []


def test_apply_refused_with_children(h: Harness) -> None:
    """
    ApplyDiff to a layer that already has children is refused.
    """
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.create(B, A, False, {}))
    with pytest.raises(InvalidLayerState, match="made from it"):
        h.run(h.registry.apply(A, io.BytesIO(b"")))


def test_child_commits_parent(h: Harness) -> None:
    """
    Creating a child of an uncommitted (read-write) layer commits it first.
    """
    h.run(h.registry.create(A, None, True, {}))
    h.run(h.registry.create(B, A, True, {}))
    names = [(n, i) for n, i, _ in h.fake.calls]
    assert names.index(("commit", A)) < names.index(("prepare", B))
    row = h.row(A)
    assert row is not None and row.committed


@pytest.fixture
def kept(tmp_path: Any) -> Harness:
    """
    A harness whose backend keeps a device 5 s after the last Put.
    """
    return Harness(tmp_path, unmap_delay=5.0)


def _names(h: Harness) -> list[tuple[str, str]]:
    return [(n, i) for n, i, _ in h.fake.calls]


def test_create_maps_a_read_write_layer(kept: Harness) -> None:
    """
    A backend that keeps devices maps a read-write layer when it makes it
    (dockerd gets it next): the layer rests mapped with the device
    recorded, and is unmapped when the delay passes without a Get.  An
    image layer is not mapped.
    """
    h = kept
    h.run(h.registry.create(A, None, True, {}))
    h.run(h.registry.create(B, None, False, {}))
    row = h.row(A)
    assert row is not None
    assert (row.state, row.mapping) == ("mapped", {"device": f"/dev/fake-{A[:4]}"})
    row = h.row(B)
    assert row is not None and (row.state, row.mapping) == ("created", None)
    assert h.fake.calls[0] == ("prepare", A, "creating")
    h.clock.advance(5)
    assert h.fake.calls[-1] == ("unmap", A, "unmapping")
    row = h.row(A)
    assert row is not None and (row.state, row.mapping) == ("created", None)


def test_last_put_keeps_the_device_until_the_delay(kept: Harness) -> None:
    """
    With unmap_delay, the last Put unmounts but leaves the layer mapped
    (persisted, with its device); the device is unmapped once the delay
    has passed, through the machine's write-ahead unmapping state.
    """
    h = kept
    h.run(h.registry.create(A, None, True, {}))
    assert h.run(h.registry.get(A)) == f"/mnt/{A}"
    assert ("map", A) not in _names(h)  # mapped at Create
    h.run(h.registry.put(A))
    row = h.row(A)
    assert row is not None
    assert (row.state, row.refcount, row.mountpoint) == ("mapped", 0, None)
    assert row.mapping == {"device": f"/dev/fake-{A[:4]}"}
    assert ("unmap", A) not in _names(h)
    h.clock.advance(4.9)
    assert ("unmap", A) not in _names(h)
    h.clock.advance(0.2)
    assert h.fake.calls[-1] == ("unmap", A, "unmapping")
    row = h.row(A)
    assert row is not None and (row.state, row.mapping) == ("created", None)
    assert h.clock.getDelayedCalls() == []


def test_get_within_the_delay_only_mounts(kept: Harness) -> None:
    """
    A Get before the delay has passed mounts the kept device (no second
    map) and cancels the unmap; the next last Put starts a new delay.
    """
    h = kept
    h.run(h.registry.create(A, None, True, {}))
    h.run(h.registry.get(A))
    h.run(h.registry.put(A))
    h.clock.advance(3)
    before = len(h.fake.calls)
    assert h.run(h.registry.get(A)) == f"/mnt/{A}"
    assert _names(h)[before:] == [("mount", A)]
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10)
    assert ("unmap", A) not in _names(h)
    h.run(h.registry.put(A))
    h.clock.advance(4)
    assert ("unmap", A) not in _names(h)
    h.clock.advance(1)
    assert ("map", A) not in _names(h)
    assert _names(h)[-1] == ("unmap", A)


def test_kept_parent_is_unmapped_before_its_commit(kept: Harness) -> None:
    """
    A container's -init layer, put and kept mapped, is unmapped before it
    is committed for its child: a read-write device is never snapshotted.
    A committed layer's kept (read-only) device stays for its children.
    """
    h = kept
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.apply(A, io.BytesIO(b"tar")))
    h.run(h.registry.get(A))
    h.run(h.registry.put(A))
    h.run(h.registry.create(B, A, True, {}))
    h.run(h.registry.get(B))
    h.run(h.registry.put(B))
    h.run(h.registry.create(C, B, True, {}))
    names = _names(h)
    assert names.index(("unmap", B)) < names.index(("commit", B)) < names.index(("prepare", C))
    assert ("unmap", A) not in names
    states = {r.id: r.state for r in h.store.load_layers_thd()}
    assert states == {A: "mapped", B: "created", C: "mapped"}
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [5.0, 5.0]


def test_apply_and_remove_of_a_kept_layer(kept: Harness) -> None:
    """
    ApplyDiff unmaps a kept device first; Remove of a kept layer removes
    it (the backend drops the device) and leaves no timer behind.
    """
    h = kept
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.get(A))
    h.run(h.registry.put(A))
    h.run(h.registry.apply(A, io.BytesIO(b"tar")))
    assert h.fake.calls[-3:] == [
        ("unmap", A, "unmapping"), ("apply", A, "applying"), ("commit", A, "committing")
    ]
    h.run(h.registry.get(A))
    h.run(h.registry.put(A))
    h.run(h.registry.remove(A))
    assert h.fake.calls[-1] == ("remove", A, "removing")
    assert h.row(A) is None and h.clock.getDelayedCalls() == []


def test_release_all_unmaps_every_kept_device(kept: Harness) -> None:
    """
    dockerd's Cleanup and the daemon's stop unmap every kept device at
    once; held (mounted) layers stay.
    """
    h = kept
    h.run(h.registry.create(A, None, True, {}))
    h.run(h.registry.create(B, None, True, {}))
    for layer in (A, B):
        h.run(h.registry.get(layer))
    h.run(h.registry.put(A))
    h.run(h.registry.release_all())
    states = {r.id: r.state for r in h.store.load_layers_thd()}
    assert states == {A: "created", B: "mounted"}
    assert h.clock.getDelayedCalls() == []


class HeldCalls(InlineBackend):
    """
    The inline adapter, except that while C{hold} is set each call waits
    until the test lets it run (L{release_next}).
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.hold = False
        self.held: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self.hold:
            return super().run(fn, *args)
        d: Deferred[Any] = Deferred()
        self.held.append((d, fn, args))
        return d

    def release_next(self) -> None:
        d, fn, args = self.held.pop(0)
        super().run(fn, *args).chainDeferred(d)


def test_release_all_unmaps_at_once(tmp_path: Any) -> None:
    """
    release_all starts every kept device's unmap before any has finished:
    with the cluster down each may wait for the backend's timeout, and the
    stop should not wait for them one after another.
    """
    h = Harness(tmp_path, unmap_delay=5.0)
    adapter = HeldCalls(h.fake)
    h.registry = LayerRegistry(h.store, adapter, h.clock)
    for layer in (A, B, C):
        h.run(h.registry.create(layer, None, True, {}))
    assert {r.state for r in h.store.load_layers_thd()} == {"mapped"}
    adapter.hold = True
    done = ensureDeferred(h.registry.release_all())
    assert [args[0].id for _, _, args in adapter.held] == [A, B, C]
    assert [c for c in h.fake.calls if c[0] == "unmap"] == []
    while adapter.held:
        adapter.release_next()
    results: list[Any] = []
    done.addBoth(results.append)
    assert results == [None]
    assert {r.id: r.state for r in h.store.load_layers_thd()} == {
        A: "created", B: "created", C: "created"
    }


def test_failed_delayed_unmap_is_faulty_and_logged(kept: Harness) -> None:
    """
    An unmap that fails when the delay passes leaves the layer faulty with
    the error, as a failed unmap at Put does; nothing is left unhandled.
    """
    h = kept
    h.run(h.registry.create(A, None, True, {}))
    h.run(h.registry.get(A))
    h.run(h.registry.put(A))
    h.fake.failing.add("unmap")
    h.clock.advance(5)
    row = h.row(A)
    assert row is not None and row.state == "faulty"
    assert row.error and "unmap" in row.error and "injected" in row.error


def test_restore_after_crash(tmp_path: Any) -> None:
    """
    A registry rebuilt from the store recovers what was in flight: a
    half-made layer is rolled back, a mount in progress is undone, and a
    mounted layer keeps its references.
    """
    h = Harness(tmp_path)
    for layer_id, state, refs in ((A, "creating", 0), (B, "mounting", 0), (C, "mounted", 2)):
        h.store.insert_layer_thd(
            LayerRow(id=layer_id, parent=None, kind="rw", state=state, refcount=refs,
                     mountpoint=f"/mnt/{layer_id}" if refs else None)
        )
        h.fake.existing.add(layer_id)
    fresh = LayerRegistry(h.store, InlineBackend(h.fake), Clock())
    summary = h.run(fresh.restore(h.store.load_layers_thd(), rebooted=False))
    assert summary == {"creating": 1, "mounting": 1, "mounted": 1}
    rows = {r.id: (r.state, r.refcount) for r in h.store.load_layers_thd()}
    assert rows == {B: ("created", 0), C: ("mounted", 2)}
    assert A not in fresh
    fresh2 = LayerRegistry(h.store, InlineBackend(h.fake), Clock())
    h.run(fresh2.restore(h.store.load_layers_thd(), rebooted=True))
    rows = {r.id: (r.state, r.refcount) for r in h.store.load_layers_thd()}
    assert rows == {B: ("created", 0), C: ("created", 0)}


def test_missing_storage_is_faulty(h: Harness) -> None:
    """
    A layer at rest whose storage vanished is marked faulty at start, not
    served as an empty directory.
    """
    h.store.insert_layer_thd(LayerRow(id=A, parent=None, kind="ro", state="created"))
    h.run(h.registry.restore(h.store.load_layers_thd(), rebooted=False))
    row = h.row(A)
    assert row is not None and row.state == "faulty" and "missing" in (row.error or "")
    with pytest.raises(InvalidLayerState, match="faulty"):
        h.run(h.registry.get(A))


@pytest.mark.parametrize("atomic", [False, True])
def test_durability_of_creating(tmp_path: Any, atomic: bool) -> None:
    """
    The write-ahead C{creating} record is fsynced unless the backend's
    prepare is atomic (a power cut that loses it leaves only what start and
    gc clean); either way the layer's C{created}, before the answer, is
    durable, and so makes the record durable too.
    """
    h = Harness(tmp_path)
    h.fake.prepare_is_atomic = atomic  # type: ignore[misc]
    written: list[tuple[str, str, bool]] = []
    insert, update = h.store.insert_layer_thd, h.store.update_layer_thd

    def spy_insert(row: LayerRow, durable: bool = True) -> None:
        written.append(("insert", row.state, durable))
        insert(row, durable)

    def spy_update(row: LayerRow, durable: bool = True) -> None:
        written.append(("update", row.state, durable))
        update(row, durable)

    h.store.insert_layer_thd = spy_insert  # type: ignore[method-assign]
    h.store.update_layer_thd = spy_update  # type: ignore[method-assign]
    h.run(h.registry.create(A, None, False, {}))
    assert written == [("insert", "creating", not atomic), ("update", "created", True)]


def test_transitions_cover_persisted_states() -> None:
    """
    The transition table read from the machine reaches every persisted
    state and the terminal released state.
    """
    targets = {end for _, _, end in transitions()}
    assert set(LAYER_STATES) | {"released"} <= targets | {"creating"}
    assert ("created", "get", "mapping") in set(transitions())


def test_durability_of_transitions(h: Harness) -> None:
    """
    Transitions that change storage are committed durably (across a power
    cut); those about mounts, mappings and references only across a crash
    of txgraph, which a power cut makes moot.
    """
    written: list[tuple[str, bool]] = []
    original = h.store.update_layer_thd

    def spy(row: LayerRow, durable: bool = True) -> None:
        written.append((row.state, durable))
        original(row, durable)

    h.store.update_layer_thd = spy  # type: ignore[method-assign]
    h.run(h.registry.create(A, None, False, {}))
    h.run(h.registry.apply(A, io.BytesIO(b"x")))
    h.run(h.registry.create(B, A, True, {}))
    h.run(h.registry.get(B))
    h.run(h.registry.get(B))
    h.run(h.registry.put(B))
    h.run(h.registry.put(B))
    h.run(h.registry.remove(B))
    assert written == [
        ("created", True),
        ("applying", True),
        ("committing", True),
        ("created", True),
        ("created", True),
        ("mapping", False),
        ("mapped", False),
        ("mounting", False),
        ("mounted", False),
        ("mounted", False),
        ("mounted", False),
        ("unmounting", False),
        ("unmapping", False),
        ("created", False),
        ("removing", True),
    ]
