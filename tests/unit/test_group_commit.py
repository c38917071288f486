"""
Tests for the store's write path: the prepared statements on the database
thread's own connection, and group commit of writes queued while the
database thread is busy.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txgraph.store import LayerRow, Store
from txgraph.testing.queued import QueuedCalls

A = "a" * 64
B = "b" * 64
C = "c" * 64


class QueuedThread(QueuedCalls):
    """
    A database "thread" that runs its jobs only when told to, so that
    writes pile up as they do behind a slow commit.
    """


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


@pytest.fixture
def store(tmp_path: Any) -> Store:
    s = Store(str(tmp_path / "t.db"), QueuedThread())  # type: ignore[arg-type]
    s.open_thd()
    for layer in (A, B):
        s.insert_layer_thd(LayerRow(id=layer, parent=None, kind="ro", state="created"))
    return s


def statements(store: Store) -> list[str]:
    seen: list[str] = []
    store._connection_thd().set_trace_callback(seen.append)
    return seen


def test_queued_writes_commit_together(store: Store) -> None:
    """
    Writes queued while the database thread is busy are one job and one
    commit; each caller's Deferred fires only after that commit.
    """
    thread: QueuedThread = store._thread  # type: ignore[assignment]
    a = LayerRow(id=A, parent=None, kind="ro", state="mounted", refcount=1)
    b = LayerRow(id=B, parent=None, kind="ro", state="removing")
    c = LayerRow(id=C, parent=None, kind="rw", state="creating")
    done = [
        store.update_layer(a, durable=False),
        store.update_layer(b, durable=True),
        store.insert_layer(c),
    ]
    assert len(thread.jobs) == 1
    assert not any(d.called for d in done)
    seen = statements(store)
    thread.drain()
    assert [outcome(d) for d in done] == [None, None, None]
    assert sum(1 for s in seen if s == "COMMIT") == 1
    # One write is durable, so the group is.
    assert store._sync == "FULL"
    rows = {r.id: (r.state, r.refcount) for r in store.load_layers_thd()}
    assert rows == {A: ("mounted", 1), B: ("removing", 0), C: ("creating", 0)}


def test_failed_write_fails_alone(store: Store) -> None:
    """
    A write that fails in a group (a row that is gone, a constraint) fails
    its own caller, with the error SQLAlchemy would have raised; the others
    are committed.
    """
    thread: QueuedThread = store._thread  # type: ignore[assignment]
    gone = LayerRow(id=C, parent=None, kind="ro", state="created")
    bogus = LayerRow(id=B, parent=None, kind="ro", state="bogus")
    a = LayerRow(id=A, parent=None, kind="ro", state="mounted", refcount=2)
    done = [
        store.update_layer(gone, durable=False),
        store.update_layer(bogus, durable=False),
        store.update_layer(a, durable=False),
    ]
    thread.drain()
    results = [outcome(d) for d in done]
    assert isinstance(results[0], Failure) and results[0].check(LookupError)
    assert isinstance(results[1], Failure) and results[1].check(sa.exc.IntegrityError)
    assert results[2] is None
    rows = {r.id: (r.state, r.refcount) for r in store.load_layers_thd()}
    assert rows == {A: ("mounted", 2), B: ("created", 0)}
    assert store._sync == "NORMAL"


def test_writes_keep_fifo_order(store: Store) -> None:
    """
    A write never joins a group queued before another database call: the
    database thread still runs everything in the order submitted.
    """
    thread: QueuedThread = store._thread  # type: ignore[assignment]
    store.update_layer(LayerRow(id=A, parent=None, kind="ro", state="mounted", refcount=1), False)
    loaded = store.load_layers()
    store.update_layer(LayerRow(id=B, parent=None, kind="ro", state="mounted", refcount=1), False)
    assert len(thread.jobs) == 3
    thread.drain()
    assert {r.id: r.state for r in outcome(loaded)} == {A: "mounted", B: "created"}


def test_group_of_one_is_the_plain_write(store: Store) -> None:
    """
    A write alone in its group goes through the store's own _thd method,
    in its own transaction.
    """
    thread: QueuedThread = store._thread  # type: ignore[assignment]
    calls: list[tuple[str, bool]] = []
    original = store.update_layer_thd

    def spy(row: LayerRow, durable: bool = True) -> None:
        calls.append((row.state, durable))
        original(row, durable)

    store.update_layer_thd = spy  # type: ignore[method-assign]
    d = store.update_layer(LayerRow(id=A, parent=None, kind="ro", state="mounted"), False)
    thread.drain()
    assert outcome(d) is None
    assert calls == [("mounted", False)]
    d = store.update_layer(LayerRow(id=C, parent=None, kind="ro", state="mounted"), False)
    thread.drain()
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(LookupError)


def test_inserts_and_settings_are_durable(store: Store) -> None:
    """
    A new layer and the settings are committed at synchronous=FULL even
    right after a non-durable update.
    """
    conn = store._connection_thd()
    for write in (
        lambda: store.insert_layer_thd(LayerRow(id=C, parent=None, kind="ro", state="creating")),
        lambda: store.set_config_thd({"x": 1}),
    ):
        store.update_layer_thd(LayerRow(id=A, parent=None, kind="ro", state="mounted"), False)
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)
        write()
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)


def test_delete_after_removing_is_not_durable(store: Store) -> None:
    """
    Forgetting a removed layer is committed at synchronous=NORMAL: a power
    cut can only bring the row back in removing, the state a crash at
    removing.after leaves, which recovery finishes.
    """
    conn = store._connection_thd()
    store.update_layer_thd(LayerRow(id=B, parent=None, kind="ro", state="removing"), True)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)
    store.delete_layer_thd(B)
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)
    assert [r.id for r in store.load_layers_thd()] == [A]


def test_prepared_update_matches_sqlalchemy(store: Store) -> None:
    """
    The prepared statements write every column as SQLAlchemy reads it back.
    """
    row = LayerRow(
        id=C,
        parent=A,
        kind="rw",
        state="mounted",
        refcount=3,
        committed=True,
        size=1 << 40,
        mountpoint="/m",
        mapping={"device": "/dev/loop9"},
        storage_opt={"size": "1G"},
        error="e",
        created_at=1.25,
        updated_at=2.5,
    )
    store.insert_layer_thd(row)
    row.state = "created"
    row.committed = False
    row.mapping = None
    row.storage_opt = {}
    store.update_layer_thd(row, durable=False)
    assert [r for r in store.load_layers_thd() if r.id == C] == [row]
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_layer_thd(row)
    # A failed write leaves no transaction open behind it.
    assert not store._connection_thd().in_transaction


def test_unserialisable_row_fails_alone(store: Store) -> None:
    """
    A row whose fields cannot be written (a mapping that is not JSON) fails
    its own caller in the database thread, as before; the rest of its
    group is committed.
    """
    thread: QueuedThread = store._thread  # type: ignore[assignment]
    bad = LayerRow(id=B, parent=None, kind="ro", state="mapped", mapping={"x": object()})
    a = LayerRow(id=A, parent=None, kind="ro", state="mounted", refcount=1)
    done = [store.update_layer(bad, durable=False), store.update_layer(a, durable=False)]
    thread.drain()
    results = [outcome(d) for d in done]
    assert isinstance(results[0], Failure) and results[0].check(TypeError)
    assert results[1] is None
    rows = {r.id: r.state for r in store.load_layers_thd()}
    assert rows == {A: "mounted", B: "created"}
