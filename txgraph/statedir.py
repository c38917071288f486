"""
A txgraph state directory, as start-up opens it: the exclusive lock that
keeps one txgraph per state directory (L{StateDirLock}), and everything up
to a driver ready to start (L{open_driver}).  The daemon (L{txgraph.tap})
and C{txgraph-admin} on a stopped daemon's state (L{txgraph.admin.client})
both open a state directory this way.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

from twisted.python.threadpool import ThreadPool

from txgraph.backends import parse_options
from txgraph.backends.catalog import backend_class
from txgraph.driver import Driver, parse_storage_opts
from txgraph.errors import ConfigurationError, TxgraphError
from txgraph.snapshotstore import SnapshotStore
from txgraph.snapshotter import Snapshotter
from txgraph.store import DatabaseThread, Store


class StateDirLock:
    """
    An exclusive lock on the state directory, held for the daemon's life
    (and by C{txgraph-admin} working on a stopped daemon's database).
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """
        Take the lock or raise a L{TxgraphError} saying who holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise TxgraphError(
                    f"another txgraph (pid {holder or 'unknown'}) is using the state "
                    f"directory {os.path.dirname(self.path)}"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """
        Drop the lock.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_driver(
    reactor: Any,
    state_dir: str,
    backend_name: str,
    backend_options: dict[str, str],
    lock: StateDirLock,
    pool: ThreadPool,
    dbthread: DatabaseThread,
) -> Driver:
    """
    Everything up to a driver ready to L{Driver.start}: take the state
    directory's lock, open and upgrade the database (migrations in a child
    process, so that no txgraph process keeps Alembic loaded), configure and start
    the backend (options from the command line, overridden by those dockerd
    gave at Init), start the thread pool and the database thread.  Used by
    the daemon and by C{txgraph-admin} on a stopped daemon's state.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    lock.acquire()
    store = Store(os.path.join(state_dir, "txgraph.db"), dbthread)
    store.open_thd(migrate_in_child=True)
    config = store.get_config_thd()
    cls = backend_class(backend_name)
    persisted = config.get("backend")
    if persisted is not None and persisted != cls.name and store.load_layers_thd():
        raise ConfigurationError(
            f"the state directory holds layers of the {persisted} backend; "
            f"start txgraph with --backend {persisted}"
        )
    values = dict(backend_options)
    init = config.get("init")
    if init is not None:
        values.update(parse_storage_opts(init["opts"], cls))
    backend = cls(state_dir, parse_options(cls, values))
    backend.start()
    store.set_config_thd({"backend": cls.name, "backend_options": backend_options})
    pool.start()
    dbthread.start()
    return Driver(reactor, store, backend, pool, backend_options, state_dir)


def open_snapshotter(driver: Driver) -> Snapshotter:
    """
    containerd's snapshotter on a driver's layers, store and backend (to
    L{Snapshotter.start} once the driver has started).
    """
    return Snapshotter(driver.registry, SnapshotStore(driver.store), driver.backend)
