"""
Proof that blocking work stays off the reactor thread: the real driver,
store and overlay backend run in-process under a running reactor
(pytest-twisted), and every backend and database call records the thread
it ran in.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool

from txgraph.backends.overlay import OverlayBackend
from txgraph.driver import Driver
from txgraph.store import DatabaseThread, Store
from txgraph.testing.tars import files_tar

A = "a" * 64
B = "b" * 64

#: What a backend declares of one layer: read by the layer machine on the
#: reactor, like the class's C{maps} and C{commits}, from memory only
#: (tests/unit/test_rbd_lowers.py proves rbd's do no I/O).
DECLARATIONS = {"maps_layer", "commits_layer", "prepares_atomically"}


class RecordingOverlay(OverlayBackend):
    """
    The overlay backend, noting for each call whether it ran in the
    reactor thread.
    """

    calls: list[tuple[str, bool]]

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name.startswith("_") or not callable(attr) or name in ("status",):
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            object.__getattribute__(self, "calls").append((name, isInIOThread()))
            return attr(*args, **kwargs)

        return recorded


class RecordingStore(Store):
    """
    The store, noting the thread each database call ran in.
    """

    threads: set[str]

    def _run(self, fn: Any, *args: Any) -> Any:
        def recorded(*a: Any) -> Any:
            self.threads.add(threading.current_thread().name)
            assert not isInIOThread()
            return fn(*a)

        return super()._run(recorded, *args)


@pytest_twisted.ensureDeferred
async def test_no_blocking_call_on_the_reactor(tmp_path: Path) -> None:
    """
    Create, ApplyDiff, Get, Put, Changes, Diff, DiffSize and Remove run every
    backend call in the backend pool and every database call in the one
    database thread; none runs in the reactor thread.
    """
    pool = ThreadPool(minthreads=0, maxthreads=4, name="txgraph-backend")
    dbthread = DatabaseThread(reactor, name="txgraph-db")
    pool.start()
    dbthread.start()
    store = RecordingStore(str(tmp_path / "txgraph.db"), dbthread)
    store.threads = set()
    store.open_thd()
    backend = RecordingOverlay(str(tmp_path), {"mountopt": ""})
    backend.calls = []
    backend.start()  # at start-up, before anything is served
    backend.calls.clear()
    driver = Driver(reactor, store, backend, pool, {}, str(tmp_path))
    try:
        await driver.start()
        await driver.create(A, None, False, {})
        assert await driver.apply_diff(A, None, io.BytesIO(files_tar({"hello": b"hello"}))) == 5
        await driver.create(B, A, True, {})
        directory = await driver.get(B)
        Path(directory, "new").write_bytes(b"x")
        await driver.put(B)
        assert [c.path for c in await driver.changes(B, A)] == ["/new"]
        out = io.BytesIO()
        await driver.diff(B, A, out)
        assert await driver.diff_size(B, A) == 1
        await driver.remove(B)
        await driver.remove(A)
    finally:
        dbthread.stop()
        pool.stop()
    names = {name for name, _ in backend.calls}
    assert {"prepare", "apply", "mount", "unmount", "changes", "diff", "diff_size", "remove"} <= names
    assert [
        name for name, in_reactor in backend.calls if in_reactor and name not in DECLARATIONS
    ] == []
    assert len(store.threads) == 1 and "txgraph-db" in store.threads.pop()
