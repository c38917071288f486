"""
mounts.MountWatch: a waiter wakes on a change of the mount table, not on
its timer (the rbd mapper waits for rbd-fuse's mount with it).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from txgraph import mounts


def test_wakes_on_a_mount_and_an_unmount(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    with mounts.MountWatch() as watch:
        # Nothing changes: the timer ends the wait.  Any mount or unmount
        # on the host (another test, a daemon) wakes the watch early, so
        # the test asks for one quiet wait, not for the first.
        for _ in range(50):
            began = time.monotonic()
            watch.wait(0.2)
            if time.monotonic() - began >= 0.15:
                break
        else:
            raise AssertionError("every wait returned early: the watch never slept")
        timer = threading.Timer(0.3, lambda: mounts.mount("tmpfs", str(target), "tmpfs", 0, ""))
        timer.start()
        try:
            began = time.monotonic()
            while not mounts.is_mountpoint(str(target)):
                assert time.monotonic() - began < 20
                watch.wait(30)
            assert time.monotonic() - began < 20
            # A change made before the wait is not missed either.
            mounts.unmount(str(target))
            began = time.monotonic()
            watch.wait(30)
            assert time.monotonic() - began < 20
            assert not mounts.is_mountpoint(str(target))
        finally:
            timer.join()
            if mounts.is_mountpoint(str(target)):
                mounts.unmount(str(target))
    os.rmdir(target)
