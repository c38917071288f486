"""
Persistent state: every layer's machine state, refcount and device mapping,
and the options dockerd gave at Init, in SQLite; and the table of
containerd's snapshots, whose rows L{txgraph.snapshotstore} reads and writes.

SQLite is used through SQLAlchemy Core from exactly one dedicated thread
(L{DatabaseThread}): requests run there in FIFO order, so transitions commit
in the order the layer machines issue them, and the reactor thread never
blocks on the disk.  Functions that run in that thread end in C{_thd}; each
is one transaction, which never spans a Deferred, and returns plain Python
values (never SQLAlchemy result objects).

The schema is created and upgraded only by the Alembic migrations in
C{migrations/} (installed as L{txgraph.migrations}); L{Store.open_thd}
refuses a database written by a newer txgraph.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from txgraph import metrics
from txgraph.errors import SchemaTooNew, TxgraphError

T = TypeVar("T")

#: Every state a layer row may hold; the CHECK constraint on C{layers.state}
#: and the layer machine's states are both built from this tuple.
LAYER_STATES: tuple[str, ...] = (
    "creating",
    "created",
    "applying",
    "committing",
    "mapping",
    "mapped",
    "mounting",
    "mounted",
    "unmounting",
    "unmapping",
    "removing",
    "faulty",
)

#: The head revision of C{migrations/}: a database at it needs no Alembic
#: at all (importing Alembic costs some 10 MB of the daemon's memory).
#: tests/unit/test_store.py checks it against the scripts.
SCHEMA_HEAD = "0002"

metadata = sa.MetaData()

layers = sa.Table(
    "layers",
    metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("parent", sa.String(80), nullable=True, index=True),
    sa.Column("kind", sa.String(2), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("refcount", sa.Integer, nullable=False, server_default="0"),
    sa.Column("committed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("mountpoint", sa.Text, nullable=True),
    sa.Column("mapping", sa.Text, nullable=True),
    sa.Column("storage_opt", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.CheckConstraint("kind IN ('ro', 'rw')", name="ck_layers_kind"),
    sa.CheckConstraint(
        "state IN (" + ", ".join(f"'{s}'" for s in LAYER_STATES) + ")",
        name="ck_layers_state",
    ),
    sa.CheckConstraint("refcount >= 0", name="ck_layers_refcount"),
)

#: The kinds of containerd snapshot (containerd's snapshots.Kind, by name).
SNAPSHOT_KINDS: tuple[str, ...] = ("view", "active", "committed")

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("layer_id", sa.String(80), primary_key=True),
    sa.Column("key", sa.Text, nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("parent", sa.Text, nullable=True, index=True),
    sa.Column("labels", sa.Text, nullable=True),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("inodes", sa.BigInteger, nullable=True),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("updated_ns", sa.BigInteger, nullable=False),
    sa.CheckConstraint(
        "kind IN (" + ", ".join(f"'{k}'" for k in SNAPSHOT_KINDS) + ")",
        name="ck_snapshots_kind",
    ),
)

config = sa.Table(
    "config",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

#: The hot writes as plain SQL, built once from the table above and run on
#: the database thread's own sqlite3 connection (see L{Store._execute_thd}):
#: SQLAlchemy Core would build, compile and wrap the same statement each
#: time, some 0.4 ms per transaction.  The schema is still Alembic's.
_COLUMNS = [c.name for c in layers.columns]
UPDATE_LAYER_SQL = (
    "UPDATE layers SET "
    + ", ".join(f"{name} = :{name}" for name in _COLUMNS if name != "id")
    + " WHERE id = :id"
)
INSERT_LAYER_SQL = (
    f"INSERT INTO layers ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in _COLUMNS)})"
)
DELETE_LAYER_SQL = "DELETE FROM layers WHERE id = :id"


@dataclass
class LayerRow:
    """
    One layer as persisted: what the layer machine needs to be rebuilt after
    a restart.

    @ivar mapping: backend-specific description of the attached block device
        (None when unmapped, or for backends that do not map).
    @ivar storage_opt: CreateReadWrite's StorageOpt (e.g. C{{"size": "1G"}}).
    """

    id: str
    parent: str | None
    kind: str
    state: str
    refcount: int = 0
    committed: bool = False
    size: int | None = None
    mountpoint: str | None = None
    mapping: dict[str, Any] | None = None
    storage_opt: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def readwrite(self) -> bool:
        """
        Whether this is a container (CreateReadWrite) layer.
        """
        return self.kind == "rw"

    def to_db(self) -> dict[str, Any]:
        """
        The column values for this row.
        """
        return {
            "id": self.id,
            "parent": self.parent,
            "kind": self.kind,
            "state": self.state,
            "refcount": self.refcount,
            "committed": self.committed,
            "size": self.size,
            "mountpoint": self.mountpoint,
            "mapping": None if self.mapping is None else json.dumps(self.mapping),
            "storage_opt": json.dumps(self.storage_opt) if self.storage_opt else None,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_db(cls, row: sa.Row[Any]) -> LayerRow:
        """
        Build a L{LayerRow} from a C{layers} result row.
        """
        m = row._mapping
        return cls(
            id=m["id"],
            parent=m["parent"],
            kind=m["kind"],
            state=m["state"],
            refcount=m["refcount"],
            committed=bool(m["committed"]),
            size=m["size"],
            mountpoint=m["mountpoint"],
            mapping=None if m["mapping"] is None else json.loads(m["mapping"]),
            storage_opt=json.loads(m["storage_opt"]) if m["storage_opt"] else {},
            error=m["error"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
        )


def migrations_dir() -> Path:
    """
    Where the Alembic scripts are: C{txgraph/migrations} in an installed
    copy, C{migrations/} at the top of a source checkout.
    """
    here = Path(__file__).resolve().parent
    installed = here / "migrations"
    if (installed / "env.py").exists():
        return installed
    return here.parent / "migrations"


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """
    An Alembic configuration for txgraph's migrations, bound to
    C{connection} when given (the migrations then run on it).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


#: The exit code of L{_MIGRATE_CHILD} for L{SchemaTooNew}.
_SCHEMA_TOO_NEW_EXIT = 3

#: What L{Store._migrate_in_child} runs: the migrations of the database
#: named by its argument; L{SchemaTooNew}'s message on stderr.
_MIGRATE_CHILD = f"""
import sys
from txgraph.errors import SchemaTooNew
from txgraph.store import Store
try:
    Store(sys.argv[1])._migrate_thd()
except SchemaTooNew as e:
    sys.stderr.write(e.message)
    sys.exit({_SCHEMA_TOO_NEW_EXIT})
"""


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL lets readers (txgraph-admin) look while the daemon writes;
    # synchronous=FULL makes each commit durable across a host crash.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_engine(path: str) -> sa.Engine:
    """
    An engine for the SQLite database at C{path}, one connection, with the
    pragmas txgraph relies on.
    """
    engine = sa.create_engine(
        f"sqlite:///{path}",
        poolclass=sa.pool.StaticPool,
        connect_args={"check_same_thread": False},
    )
    sa.event.listen(engine, "connect", _configure_sqlite)
    return engine


class DatabaseThread:
    """
    One thread that runs every database call, in the order submitted.

    @ivar pool: a L{ThreadPool} of exactly one thread.
    """

    def __init__(self, reactor: IReactorThreads, name: str = "txgraph-db") -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name=name)

    def start(self) -> None:
        """
        Start the thread.
        """
        self.pool.start()

    def stop(self) -> None:
        """
        Finish what was submitted, then stop the thread.
        """
        self.pool.stop()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """
        Run C{fn(*args, **kwargs)} in the database thread.
        """
        return deferToThreadPool(self._reactor, self.pool, fn, *args, **kwargs)


class Store:
    """
    txgraph's state database.

    Methods ending in C{_thd} are blocking and must run in the database
    thread (or, for C{txgraph-admin} on a stopped daemon, in a process that
    holds the state directory's lock); the others return Deferreds.
    """

    def __init__(self, path: str, dbthread: DatabaseThread | None = None) -> None:
        self.path = path
        self.engine = create_engine(path)
        self._thread = dbthread
        # The connection's current PRAGMA synchronous (see update_layer_thd).
        self._sync = "FULL"
        # The engine's one sqlite3 connection, for the hot writes.
        self._raw: sqlite3.Connection | None = None
        # The group of writes queued last, while more may join it (see
        # _write): only touched by the reactor thread.
        self._group: _Group | None = None

    # -- blocking API ------------------------------------------------------

    def open_thd(self, migrate_in_child: bool = False) -> None:
        """
        Create or upgrade the schema to the head migration, refusing a
        database newer than this code.  With C{migrate_in_child}, the
        migrations run in a child process (L{_migrate_in_child}).
        """
        if os.path.exists(self.path):
            os.chmod(self.path, 0o600)
        else:
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        with self.engine.connect() as conn:
            if sa.inspect(conn).has_table("alembic_version"):
                current = conn.exec_driver_sql(
                    "SELECT version_num FROM alembic_version"
                ).scalar()
                if current == SCHEMA_HEAD:
                    return
        if migrate_in_child:
            self._migrate_in_child()
        else:
            self._migrate_thd()

    def _migrate_in_child(self) -> None:
        """
        L{_migrate_thd} in a child process of the same interpreter and
        txgraph, so that Alembic and what it imports (Mako, Pygments: 9 MB)
        are never loaded into a long-lived daemon, which would keep them
        for its whole life after a first start or an upgrade.
        """
        package_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.environ.get("PYTHONPATH")
        result = subprocess.run(
            [sys.executable, "-c", _MIGRATE_CHILD, self.path],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                "PYTHONPATH": package_root + (os.pathsep + pythonpath if pythonpath else ""),
            },
        )
        if result.returncode == 0:
            return
        message = result.stderr.strip()
        if result.returncode == _SCHEMA_TOO_NEW_EXIT:
            raise SchemaTooNew(message)
        raise TxgraphError(
            f"upgrading the state database {self.path} failed (exit {result.returncode}): "
            f"{message[-4000:]}"
        )

    def _migrate_thd(self) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self.engine.begin() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            script = ScriptDirectory.from_config(alembic_config())
            known = {rev.revision for rev in script.walk_revisions()}
            if current is not None and current not in known:
                raise SchemaTooNew(
                    f"the state database {self.path} is at schema revision "
                    f"{current}, which this txgraph does not know (it knows up to "
                    f"{script.get_current_head()}); it was written by a newer "
                    "txgraph: run that version, or restore a backup"
                )
            if current != script.get_current_head():
                command.upgrade(alembic_config(conn), "head")

    def schema_revision_thd(self) -> str | None:
        """
        The Alembic revision the database is at.
        """
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def load_layers_thd(self) -> list[LayerRow]:
        """
        Every persisted layer.
        """
        with self.engine.connect() as conn:
            return [
                LayerRow.from_db(r)
                for r in conn.execute(sa.select(layers).order_by(layers.c.created_at))
            ]

    def insert_layer_thd(self, row: LayerRow, durable: bool = True) -> None:
        """
        Persist a new layer, durably unless told otherwise: the layer
        machine's C{creating} record is not durable on a backend whose
        C{prepare} is atomic (L{txgraph.backends.Backend.prepare_is_atomic}),
        since the durable commit of its outcome follows before any answer.
        """
        self._execute_thd(_insert(row, durable))

    def update_layer_thd(self, row: LayerRow, durable: bool = True) -> None:
        """
        Persist a layer's new state and fields.

        A durable update is on disk before this returns, across a power cut
        (C{synchronous=FULL}: the WAL is fsynced).  A non-durable one
        survives a crash of txgraph but may be lost with a power cut
        (C{synchronous=NORMAL}); the layer machine uses that only for
        transitions about mounts, mappings and references, which a power cut
        destroys anyway (recovery after a reboot resets them), and the next
        durable commit makes every earlier one durable too.
        """
        self._execute_thd(_update(row, durable))

    def delete_layer_thd(self, layer_id: str) -> None:
        """
        Forget a layer whose storage is gone (after C{removing}).

        Not durable (C{synchronous=NORMAL}, as in L{update_layer_thd}): it
        survives a crash of txgraph, and the next durable commit (any
        insert, or any storage transition) makes it durable too.  A power
        cut before that brings the row back in C{removing}, with its storage
        gone: the very state a crash at C{removing.after} leaves, which
        recovery finishes by removing again (removal is idempotent).  So no
        state is reachable after a crash that was not before.
        """
        self._execute_thd(_delete(layer_id))

    def _connection_thd(self) -> sqlite3.Connection:
        """
        The engine's sqlite3 connection itself (the pool is static: one
        connection, open until L{close_thd}), with its pragmas.
        """
        if self._raw is None:
            with self.engine.connect() as conn:
                raw = conn.connection.driver_connection
            assert isinstance(raw, sqlite3.Connection)
            self._raw = raw
        return self._raw

    def _synchronous_thd(self, conn: sqlite3.Connection, durable: bool) -> None:
        # Outside any transaction (SQLite ignores it inside one).
        mode = "FULL" if durable else "NORMAL"
        if self._sync != mode:
            conn.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def _commit_thd(self, conn: sqlite3.Connection) -> None:
        # A frame of its own, so that profiles show the commit (the fsync).
        m = metrics.current
        if m is None:
            conn.commit()
            return
        start = perf_counter()
        conn.commit()
        m.commit(self._sync, perf_counter() - start)

    def _execute_thd(self, write: _Write) -> None:
        """
        One write as one transaction, committed at its durability.
        """
        conn = self._connection_thd()
        self._synchronous_thd(conn, write.durable)
        try:
            write.execute(conn)
            self._commit_thd(conn)
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            if isinstance(e, sqlite3.Error):
                raise _translate(write, e) from e
            raise

    def write_group_thd(self, writes: list[_Write]) -> list[BaseException | None]:
        """
        Several writes, queued while the database thread was busy, in one
        transaction: one commit (durable if any of them must be), each
        write in a savepoint of its own so that one that fails (a row that
        is gone, a constraint) fails alone.  Returns each write's error, or
        None; an error of the commit itself is every write's.
        """
        if metrics.current is not None:
            metrics.current.db_group.observe(len(writes))
        if len(writes) == 1:
            only = writes[0]
            try:
                if only.thd is not None:
                    only.thd()
                else:
                    self._execute_thd(only)
            except Exception as e:
                return [e]
            return [None]
        conn = self._connection_thd()
        self._synchronous_thd(conn, any(w.durable for w in writes))
        outcomes: list[BaseException | None] = []
        try:
            conn.execute("BEGIN")
            for write in writes:
                conn.execute("SAVEPOINT txgraph_write")
                outcome: BaseException | None = None
                try:
                    write.execute(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO txgraph_write")
                    outcome = _translate(write, e)
                conn.execute("RELEASE txgraph_write")
                outcomes.append(outcome)
            self._commit_thd(conn)
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            failed = _translate(writes[0], e)
            return [failed] * len(writes)
        return outcomes

    def get_config_thd(self) -> dict[str, Any]:
        """
        All persisted settings (Init's arguments, the effective options).
        """
        with self.engine.connect() as conn:
            return {
                r.key: json.loads(r.value) for r in conn.execute(sa.select(config))
            }

    def set_config_thd(self, values: dict[str, Any]) -> None:
        """
        Persist settings, replacing those with the same keys, durably.
        """
        self._synchronous_thd(self._connection_thd(), True)
        with self.engine.begin() as conn:
            for key, value in values.items():
                conn.execute(config.delete().where(config.c.key == key))
                conn.execute(config.insert().values(key=key, value=json.dumps(value)))

    def close_thd(self) -> None:
        """
        Close the database connection.
        """
        self._raw = None
        self.engine.dispose()

    # -- asynchronous API --------------------------------------------------

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        assert self._thread is not None, "Store has no database thread"
        # Writes submitted after this call must not join a group queued
        # before it: the database thread runs everything in FIFO order.
        self._group = None
        return self._thread.run(fn, *args)

    def _write(self, write: _Write) -> Deferred[None]:
        """
        Queue a write for the database thread; fire once it is committed
        (at its durability).  Writes queued while the thread is busy form a
        group that it commits in one transaction (L{write_group_thd}): group
        commit, one fsync for all, and still every caller waits for its own
        write to be on disk.
        """
        assert self._thread is not None, "Store has no database thread"
        waiting: Deferred[None] = Deferred()
        if self._group is not None and self._group.add(write, waiting):
            return waiting
        group = _Group()
        group.add(write, waiting)
        self._group = group
        done = self._thread.run(self._write_group_thd, group)
        done.addCallbacks(group.fire, group.fail)
        return waiting

    def _write_group_thd(self, group: _Group) -> list[BaseException | None]:
        return self.write_group_thd(group.take())

    def load_layers(self) -> Deferred[list[LayerRow]]:
        """
        Every persisted layer.
        """
        return self._run(self.load_layers_thd)

    def insert_layer(self, row: LayerRow, durable: bool = True) -> Deferred[None]:
        """
        Persist a new layer (a copy of C{row} as it is now); see
        L{insert_layer_thd} for C{durable}.
        """
        row.created_at = row.updated_at = time.time()
        copy = _copy(row)
        return self._write(
            _insert(copy, durable, lambda: self.insert_layer_thd(copy, durable))
        )

    def update_layer(self, row: LayerRow, durable: bool = True) -> Deferred[None]:
        """
        Persist a layer's fields (a copy of C{row} as it is now); see
        L{update_layer_thd} for C{durable}.
        """
        row.updated_at = time.time()
        copy = _copy(row)
        return self._write(
            _update(copy, durable, lambda: self.update_layer_thd(copy, durable))
        )

    def delete_layer(self, layer_id: str) -> Deferred[None]:
        """
        Forget a layer.
        """
        return self._write(
            _delete(layer_id, lambda: self.delete_layer_thd(layer_id))
        )

    def get_config(self) -> Deferred[dict[str, Any]]:
        """
        All persisted settings.
        """
        return self._run(self.get_config_thd)

    def set_config(self, values: dict[str, Any]) -> Deferred[None]:
        """
        Persist settings.
        """
        return self._run(self.set_config_thd, dict(values))


@dataclass
class _Write:
    """
    One write to the C{layers} table, as a prepared statement.  Its
    parameters are computed where it runs, in the database thread.

    @ivar row: the row to insert or update (a snapshot), or None for a delete.
    @ivar layer_id: the layer written.
    @ivar must_exist: the row must be there (an update): L{LookupError}
        otherwise.
    @ivar thd: the same write through the store's own C{_thd} method, run
        when it is alone in its group.
    """

    statement: str
    durable: bool
    row: LayerRow | None
    layer_id: str
    must_exist: bool = False
    thd: Callable[[], None] | None = None

    @property
    def params(self) -> dict[str, Any]:
        """
        The statement's bound parameters.
        """
        return self.row.to_db() if self.row is not None else {"id": self.layer_id}

    def execute(self, conn: sqlite3.Connection) -> None:
        """
        Run the statement (in the caller's transaction).
        """
        cursor = conn.execute(self.statement, self.params)
        if self.must_exist and cursor.rowcount != 1:
            raise LookupError(f"layer {self.layer_id} is not in the database")


def _insert(
    row: LayerRow, durable: bool = True, thd: Callable[[], None] | None = None
) -> _Write:
    return _Write(INSERT_LAYER_SQL, durable, row, row.id, thd=thd)


def _update(
    row: LayerRow, durable: bool, thd: Callable[[], None] | None = None
) -> _Write:
    return _Write(UPDATE_LAYER_SQL, durable, row, row.id, must_exist=True, thd=thd)


def _delete(layer_id: str, thd: Callable[[], None] | None = None) -> _Write:
    # Not durable: see Store.delete_layer_thd.
    return _Write(DELETE_LAYER_SQL, False, None, layer_id, thd=thd)


def _translate(write: _Write, error: BaseException) -> BaseException:
    # The same exceptions SQLAlchemy raised for these statements
    # (sqlalchemy.exc.IntegrityError for a constraint, ...).
    if isinstance(error, sqlite3.Error):
        try:
            params: Any = write.params
        except Exception:
            params = None
        return sa.exc.DBAPIError.instance(write.statement, params, error, sqlite3.Error)
    return error


class _Group:
    """
    Writes queued for the database thread while it was busy, committed
    together.  The reactor adds to it until the database thread takes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self.writes: list[_Write] = []
        self.waiting: list[Deferred[None]] = []

    def add(self, write: _Write, waiting: Deferred[None]) -> bool:
        """
        (Reactor.)  Join the group, unless the database thread took it.
        """
        with self._lock:
            if self._closed:
                return False
            self.writes.append(write)
            self.waiting.append(waiting)
            return True

    def take(self) -> list[_Write]:
        """
        (Database thread.)  Close the group; its writes.
        """
        with self._lock:
            self._closed = True
            return list(self.writes)

    def fire(self, outcomes: list[BaseException | None]) -> None:
        """
        (Reactor.)  Tell each writer how its write went.
        """
        for waiting, outcome in zip(self.waiting, outcomes, strict=True):
            if outcome is None:
                waiting.callback(None)
            else:
                waiting.errback(Failure(outcome))

    def fail(self, failure: Failure) -> None:
        """
        (Reactor.)  The group could not run at all.
        """
        for waiting in self.waiting:
            waiting.errback(failure)


def _copy(row: LayerRow) -> LayerRow:
    # The reactor keeps mutating its LayerRow; the database thread gets a
    # snapshot so that what is written is what was true when it was asked.
    return LayerRow(
        **{
            **row.__dict__,
            "mapping": None if row.mapping is None else dict(row.mapping),
            "storage_opt": dict(row.storage_opt),
        }
    )


def states_in(rows: Iterable[LayerRow]) -> dict[str, int]:
    """
    How many layers are in each state.
    """
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return counts
