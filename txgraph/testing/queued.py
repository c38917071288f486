"""
A stand-in for a worker thread in unit tests: each call is queued and runs
only when L{QueuedCalls.drain} is called, in order, so that a test decides
what piles up behind a slow thread and when it runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class QueuedCalls:
    """
    C{run(fn, *args)} like a thread's, run later by L{drain}.
    """

    def __init__(self) -> None:
        self.jobs: deque[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = deque()

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Queue C{fn(*args)}; the Deferred fires when it has run.
        """
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def drain(self) -> None:
        """
        Run everything queued, including what the calls queue meanwhile.
        """
        while self.jobs:
            fn, args, d = self.jobs.popleft()
            try:
                result = fn(*args)
            except Exception:
                d.errback(Failure())
            else:
                d.callback(result)
