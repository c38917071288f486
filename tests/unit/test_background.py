"""
The background passes the rbd backend purges its trash with.
"""

from __future__ import annotations

import threading
import time

from txgraph.backends.background import BackgroundPasses


class Work:
    """
    A pass that counts its runs, can be held inside a run, and reports
    work left while C{left} is positive (one less per run).
    """

    def __init__(self, left: int = 0, fail: int = 0) -> None:
        self.runs = 0
        self.threads: set[str] = set()
        self.left = left
        self.fail = fail
        self.hold = threading.Event()
        self.hold.set()
        self.inside = threading.Event()

    def __call__(self) -> bool:
        self.runs += 1
        self.threads.add(threading.current_thread().name)
        self.inside.set()
        self.hold.wait(10)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("cluster unreachable")
        self.left = max(0, self.left - 1)
        return self.left > 0


def test_first_pass_at_start_and_settle_waits_for_a_new_one() -> None:
    work = Work()
    passes = BackgroundPasses("test passes", work, retry=60)
    passes.start()
    try:
        assert passes.settle(10)
        # The start's pass and at least the one settle asked for; never the
        # caller's thread.
        assert work.runs >= 1
        assert work.threads == {"test passes"}
        before = work.runs
        assert passes.settle(10)
        assert work.runs == before + 1
    finally:
        assert passes.stop(10)


def test_wakes_during_a_pass_merge_into_one_more() -> None:
    work = Work()
    passes = BackgroundPasses("test passes", work, retry=60)
    passes.start()
    try:
        assert passes.settle(10)
        work.hold.clear()
        work.inside.clear()
        passes.wake()
        assert work.inside.wait(10)
        runs = work.runs
        for _ in range(5):
            passes.wake()
        work.hold.set()
        assert passes.settle(10)
        # The held pass, one for the five wakes, one for settle (which may
        # have merged with them).
        assert runs + 1 <= work.runs <= runs + 2
    finally:
        assert passes.stop(10)


def test_retries_while_work_is_left_and_after_a_failure() -> None:
    work = Work(left=3, fail=1)
    passes = BackgroundPasses("test passes", work, retry=0.05)
    passes.start()
    try:
        deadline = time.monotonic() + 10
        while work.left and time.monotonic() < deadline:
            time.sleep(0.01)
        # One failed pass, then three that each finished one piece, with no
        # wake: the retry interval drove them.
        assert work.left == 0 and work.runs == 4
        runs = work.runs
        time.sleep(0.3)
        assert work.runs == runs
    finally:
        assert passes.stop(10)


def test_stop_waits_for_the_pass_in_progress() -> None:
    work = Work()
    passes = BackgroundPasses("test passes", work, retry=60)
    work.hold.clear()
    passes.start()
    assert work.inside.wait(10)
    assert not passes.stopping
    assert not passes.stop(0.1)
    # The pass in progress can see it should end early.
    assert passes.stopping
    work.hold.set()
    # Stopped: nothing settles any more.
    assert passes.settle(0.1) is False
    # The thread ends after its pass.
    deadline = time.monotonic() + 10
    while any(t.name == "test passes" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_settle_without_a_thread_returns_false() -> None:
    passes = BackgroundPasses("test passes", Work(), retry=60)
    assert passes.settle(0.1) is False
