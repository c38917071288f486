"""
Read-write librbd handles opened ahead of a commit (issue 18).

Committing an rbd layer (snapshot and protect) used to open its image
first: 50-110 ms on the test machine, growing about 7 ms per ancestor, for
two calls that take 17 ms.  A layer that will likely be committed (an image
layer, a container's C{-init} layer, containerd's unpack snapshots: see
L{txgraph.backends.LayerInfo.commit_expected}) gets its image opened in a
thread of its own once the layer is mapped read-write (not while the
mapper opens the image for the map: the two opens then slowed the map by
about what the commit saved), so the open happens while the layer is
used; the commit takes that handle instead of opening one
(L{Handles.take}).  An open still in progress is waited for.

A held handle is process state only: nothing in the cluster or the state
directory records it, so a crash loses nothing but the open.  It never
writes before the commit, so it never takes the image's exclusive lock
from the layer's mapper (rbd-fuse, which writes through a client of its
own); librbd refreshes its view of the header when another client changes
it, so a snapshot through an old handle sees everything written before.
It is closed before the image is removed, moved to the trash or remade
(L{Handles.drop}: a watcher would make the removal wait), after
C{IDLE} seconds unused, when more than C{LIMIT} are held (the oldest), and
at the backend's stop.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from twisted.logger import Logger

log = Logger()

#: Seconds an unused handle stays open.
IDLE = 60.0
#: Handles held at most (each keeps its image and its ancestors open).
LIMIT = 16


class Handles:
    """
    Images opened read-write ahead of their commit, by image name.

    @ivar opened: handles opened so far (for tests and benchmarks).
    @ivar taken: handles a caller took (used instead of a fresh open).
    """

    def __init__(
        self,
        opener: Callable[[str], Any],
        idle: float = IDLE,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._opener = opener
        self.idle = idle
        self.limit = limit
        self._clock = clock
        self._cond = threading.Condition()
        # name -> (the open, its image when done; when it was asked for)
        self._held: collections.OrderedDict[str, tuple[Future[Any], float]] = (
            collections.OrderedDict()
        )
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: threading.Thread | None = None
        self._stopping = False
        self.opened = 0
        self.taken = 0

    def start(self) -> None:
        """
        Start the threads that open and expire handles.
        """
        with self._cond:
            self._stopping = False
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rbd handle open")
            self._sweeper = threading.Thread(target=self._sweep_loop, name="rbd handle expiry", daemon=True)
            self._sweeper.start()

    def held(self) -> list[str]:
        """
        The images with a handle held or being opened, oldest first.
        """
        with self._cond:
            return list(self._held)

    def ready(self, name: str, timeout: float | None = None) -> bool:
        """
        Wait for the open of C{name}'s handle; whether one is held, open.
        """
        with self._cond:
            entry = self._held.get(name)
        if entry is None:
            return False
        try:
            entry[0].result(timeout)
        except Exception:
            return False
        return True

    def open_soon(self, name: str) -> None:
        """
        Open C{name} read-write in a thread of its own, to be taken by the
        commit; a handle already held for it stays.  Without the threads
        (not started, or stopped), nothing.
        """
        evicted: list[Future[Any]] = []
        with self._cond:
            if self._executor is None or self._stopping or name in self._held:
                return
            while len(self._held) >= self.limit:
                evicted.append(self._held.popitem(last=False)[1][0])
            self._held[name] = (self._executor.submit(self._open, name), self._clock())
            self._cond.notify_all()
        for future in evicted:
            self._close(future)

    def _open(self, name: str) -> Any:
        image = self._opener(name)
        with self._cond:
            self.opened += 1
        return image

    def take(self, name: str) -> Any | None:
        """
        The handle held for C{name}, now the caller's to close (waiting
        for its open to finish); None if there is none or its open failed.
        """
        with self._cond:
            entry = self._held.pop(name, None)
        if entry is None:
            return None
        try:
            image = entry[0].result()
        except Exception as e:
            log.debug("ahead-of-commit open of {image} failed: {error}", image=name, error=e)
            return None
        with self._cond:
            self.taken += 1
        return image

    def drop(self, name: str) -> None:
        """
        Close the handle held for C{name}, if any (once its open is done):
        before the image is removed, trashed or remade.
        """
        with self._cond:
            entry = self._held.pop(name, None)
        if entry is not None:
            self._close(entry[0])

    @staticmethod
    def _close(future: Future[Any]) -> None:
        try:
            image = future.result()
        except Exception:
            return
        with contextlib.suppress(Exception):
            image.close()

    def sweep(self) -> float | None:
        """
        Close the handles unused for C{idle} seconds; return when the next
        one expires (by the clock), or None if none is held.
        """
        now = self._clock()
        expired: list[Future[Any]] = []
        with self._cond:
            for name, (future, since) in list(self._held.items()):
                if now - since >= self.idle:
                    expired.append(future)
                    del self._held[name]
            following = min((since for _f, since in self._held.values()), default=None)
        for future in expired:
            self._close(future)
        return None if following is None else following + self.idle

    def _sweep_loop(self) -> None:
        while True:
            following = self.sweep()
            with self._cond:
                if self._stopping:
                    return
                if following is None:
                    self._cond.wait()
                else:
                    self._cond.wait(max(0.0, following - self._clock()))
                if self._stopping:
                    return

    def close_all(self) -> None:
        """
        Stop the threads and close every handle (after the opens in
        progress finish).
        """
        with self._cond:
            self._stopping = True
            held = [future for future, _since in self._held.values()]
            self._held.clear()
            executor, self._executor = self._executor, None
            sweeper, self._sweeper = self._sweeper, None
            self._cond.notify_all()
        for future in held:
            self._close(future)
        if executor is not None:
            executor.shutdown(wait=True)
        if sweeper is not None:
            sweeper.join()
