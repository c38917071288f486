"""
Tests for the state database: Alembic migrations from empty to head, the
models matching the head revision, refusal of a newer database, the
database thread, and row round trips.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from twisted.internet import reactor

from txgraph.errors import SchemaTooNew
from txgraph.store import (
    LAYER_STATES,
    SCHEMA_HEAD,
    DatabaseThread,
    LayerRow,
    Store,
    alembic_config,
    metadata,
    migrations_dir,
)


def test_migrations_empty_to_head(tmp_path: Any) -> None:
    """
    An empty database is migrated to the head revision, and opening it
    again changes nothing.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert store.schema_revision_thd() == head
    store.open_thd()
    assert store.schema_revision_thd() == head


def test_schema_head_constant() -> None:
    """
    The head revision the store trusts without Alembic is the scripts' head.
    """
    from txgraph.store import SCHEMA_HEAD

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_HEAD


def test_models_match_head(tmp_path: Any) -> None:
    """
    The tables txgraph.store declares are exactly what the migrations make.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_every_migration_downgrades(tmp_path: Any) -> None:
    """
    Every revision has a working downgrade back to an empty schema.
    """
    from alembic import command

    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with store.engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["alembic_version"]


def test_refuses_newer_database(tmp_path: Any) -> None:
    """
    A database at a revision this code does not know is refused, with a
    message naming the revision.
    """
    path = str(tmp_path / "t.db")
    Store(path).open_thd()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaTooNew, match="9999"):
        Store(path).open_thd()


def test_migrations_in_a_child(tmp_path: Any) -> None:
    """
    Migrated in a child process (as the daemon does), a new database
    reaches the head revision, and a newer one is refused with the same
    message as in-process.
    """
    path = str(tmp_path / "t.db")
    Store(path).open_thd(migrate_in_child=True)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (SCHEMA_HEAD,)
        ]
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaTooNew, match="at schema revision 9999, which this txgraph does not know"):
        Store(path).open_thd(migrate_in_child=True)


def test_open_driver_migrates_in_a_child(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The daemon (and txgraph-admin on a stopped daemon's state) opens its
    database with the migrations in a child process.
    """
    from txgraph import statedir

    asked: list[bool] = []

    def open_thd(self: Store, migrate_in_child: bool = False) -> None:
        asked.append(migrate_in_child)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Store, "open_thd", open_thd)
    state = str(tmp_path / "state")
    lock = statedir.StateDirLock(state)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            statedir.open_driver(None, state, "overlay", {}, lock, None, None)  # type: ignore[arg-type]
    finally:
        lock.release()
    assert asked == [True]


def test_database_is_private(tmp_path: Any) -> None:
    """
    The database file is readable by root only.
    """
    path = str(tmp_path / "t.db")
    Store(path).open_thd()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_state_constraint(tmp_path: Any) -> None:
    """
    The database refuses a state the layer machine does not have.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_layer_thd(LayerRow(id="x", parent=None, kind="ro", state="bogus"))
    for state in LAYER_STATES:
        store.insert_layer_thd(LayerRow(id=state, parent=None, kind="ro", state=state))


def test_row_round_trip(tmp_path: Any) -> None:
    """
    Every field of a layer row survives a write and a read.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    row = LayerRow(
        id="a" * 64,
        parent="b" * 64,
        kind="rw",
        state="mounted",
        refcount=3,
        committed=True,
        size=12345,
        mountpoint="/x/merged",
        mapping={"device": "/dev/loop7", "mapper": "fuse"},
        storage_opt={"size": "1G"},
        error=None,
        created_at=1.5,
        updated_at=2.5,
    )
    store.insert_layer_thd(row)
    assert store.load_layers_thd() == [row]
    row.state = "created"
    row.refcount = 0
    store.update_layer_thd(row)
    assert store.load_layers_thd() == [row]
    store.delete_layer_thd(row.id)
    assert store.load_layers_thd() == []
    with pytest.raises(LookupError):
        store.update_layer_thd(row)


def test_config(tmp_path: Any) -> None:
    """
    Settings are stored as JSON and replaced by key.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    store.set_config_thd({"init": {"home": "/x", "opts": ["a=b"]}, "backend": "overlay"})
    store.set_config_thd({"backend": "rbd"})
    assert store.get_config_thd() == {
        "init": {"home": "/x", "opts": ["a=b"]},
        "backend": "rbd",
    }


def test_migrations_shipped() -> None:
    """
    The migrations directory holds the Alembic environment.
    """
    assert (migrations_dir() / "env.py").exists()
    assert (migrations_dir() / "versions").is_dir()


def test_database_thread_is_one_thread() -> None:
    """
    Every call runs in the same, dedicated thread, never the caller's.
    """
    dbthread = DatabaseThread(reactor)
    seen: list[str] = []
    dbthread.start()
    try:
        import queue

        done: queue.Queue[int] = queue.Queue()
        for i in range(5):
            dbthread.pool.callInThread(
                lambda i=i: (seen.append(threading.current_thread().name), done.put(i))
            )
        assert sorted(done.get(timeout=5) for _ in range(5)) == list(range(5))
    finally:
        dbthread.stop()
    assert len(set(seen)) == 1
    assert seen[0] != threading.current_thread().name
