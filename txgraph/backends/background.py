"""
Background passes: work a backend does after answering, in a thread of its
own (never the reactor's, never a request's).

A L{BackgroundPasses} runs a I{pass} (a function doing all the work there
is and saying whether some is left) once at start, whenever it is woken,
and again every C{retry} seconds while work is left.  Wakes during a pass
are merged into one more pass.  L{BackgroundPasses.settle} lets a caller
wait until everything asked for before it was tried: gc does, so that it
reports only what the background could not finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from twisted.logger import Logger

log = Logger()


class BackgroundPasses:
    """
    One thread running C{work} passes.

    @ivar what: what the passes do, for log messages and the thread's name.
    """

    def __init__(self, what: str, work: Callable[[], bool], retry: float) -> None:
        self.what = what
        self._work = work
        self._retry = retry
        self._cond = threading.Condition()
        # Pass generations: asked for, begun and finished.  The first pass
        # (what a crash left for us) is asked for at start.
        self._wanted = 1
        self._begun = 0
        self._finished = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """
        Start the thread; its first pass begins at once.
        """
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.what, daemon=True)
        self._thread.start()

    def wake(self) -> int:
        """
        Ask for a pass; return its generation.
        """
        with self._cond:
            self._wanted += 1
            self._cond.notify_all()
            return self._wanted

    def settle(self, timeout: float) -> bool:
        """
        Ask for a pass and wait until it finished (False if it did not
        within C{timeout} seconds, or the passes are not running).
        """
        generation = self.wake()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._finished < generation:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    @property
    def stopping(self) -> bool:
        """
        Whether C{stop} was called: a long pass should end early.
        """
        return self._stopping

    def stop(self, timeout: float) -> bool:
        """
        Stop after the pass in progress, if any; False if it did not end
        within C{timeout} seconds.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        left = False
        while True:
            with self._cond:
                if self._wanted == self._begun and not self._stopping:
                    # Idle until woken; while work is left, retry anyway.
                    self._cond.wait(self._retry if left else None)
                if self._stopping:
                    return
                self._begun = self._wanted
                generation = self._begun
            try:
                left = self._work()
            except Exception as e:
                log.error("{what}: {error}", what=self.what, error=e)
                left = True
            with self._cond:
                self._finished = generation
                self._cond.notify_all()
