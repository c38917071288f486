"""The suite's ``helpers.go``: one test's snapshotter, work directory and
label set (``Suite``, with snapshotterPrepareMount, applyToMounts,
createSnapshot, checkSnapshot(s)), checkInfo and assertLabels.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from txgraph import mounts
from txgraph.api.containerd.proto import mount_pb2
from txgraph.testing import fstest
from txgraph.testing.fstest import Applier
from txgraph.testing.snapshotter.client import Info, Snapshotter, Target
from txgraph.testing.snapshotter.mount import mount_all, unmount_all


class Suite:
    """One test's snapshotter, work directory and the Go suite's helpers."""

    def __init__(self, target: Target, work: Path, labels: dict[str, str]) -> None:
        self.target = target
        self.sn = Snapshotter(target)
        self.work = work
        self.opt = labels
        self._names = itertools.count()

    def mkdir(self, name: str) -> str:
        """``work/name``, created (os.MkdirAll(..., 0777))."""
        path = self.work / name
        path.mkdir(mode=0o777, parents=True, exist_ok=True)
        return str(path)

    def prepare_mount(self, name: str, parent: str) -> str:
        """snapshotterPrepareMount: prepare ``work/name`` on ``parent`` and mount it there."""
        preparing = self.mkdir(name)
        ms = self.sn.prepare(preparing, parent, self.opt)
        assert len(ms) >= 1, "expected mounts to have entries"
        mount_all(ms, preparing)
        return preparing

    def apply_to_mounts(self, ms: Sequence[mount_pb2.Mount], applier: Applier) -> None:
        """applyToMounts: mount on a temporary directory, apply, unmount (detached)."""
        td = tempfile.mkdtemp(prefix="prepare", dir=self.work)
        try:
            mount_all(ms, td)
            try:
                applier(td)
            finally:
                unmount_all(td)
        finally:
            shutil.rmtree(td)

    def create_snapshot(self, parent: str, applier: Applier) -> str:
        """createSnapshot: a committed snapshot of ``applier`` on ``parent``; its name."""
        name = f"{id(applier):#x}-{random.getrandbits(63)}"
        prepare = f"{name}-prepare"
        ms = self.sn.prepare(prepare, parent, self.opt)
        self.apply_to_mounts(ms, applier)
        self.sn.commit(name, prepare, self.opt)
        return name

    def check_snapshot(self, name: str, check: str) -> None:
        """checkSnapshot: a view of ``name`` must equal the directory ``check``."""
        td = tempfile.mkdtemp(prefix="check", dir=self.work)
        view = f"{name}-view"
        try:
            ms = self.sn.view(view, name, self.opt)
            try:
                mount_all(ms, td)
                try:
                    fstest.check_directory_equal(check, td)
                finally:
                    unmount_all(td)
            finally:
                self.sn.remove(view)
        finally:
            shutil.rmtree(td)

    def check_snapshots(self, *appliers: Applier) -> None:
        """checkSnapshots: a chain of snapshots, one per applier, each checked
        in a view against one directory the appliers are run on in turn."""
        td = tempfile.mkdtemp(prefix="flat", dir=self.work)
        try:
            parent = ""
            for i, applier in enumerate(appliers, 1):
                try:
                    name = self.create_snapshot(parent, applier)
                except Exception as error:
                    raise AssertionError(f"failed to create snapshot {i}: {error}") from error
                applier(td)
                try:
                    self.check_snapshot(name, td)
                except AssertionError as error:
                    raise AssertionError(f"snapshot check failed on snapshot {i}: {error}") from None
                parent = name
        finally:
            shutil.rmtree(td)

    def check_directory_equal_with_applier(self, root: str, applier: Applier) -> None:
        """fstest.CheckDirectoryEqualWithApplier, with a scratch directory in work."""
        fstest.check_directory_equal_with_applier(root, applier, self.work / ".fstest")

    def cleanup(self) -> None:
        """Unmount whatever the test left mounted in work, then remove every
        snapshot the target holds, children before their parents."""
        for point in reversed(mounts.mounted_under(str(self.work))):
            unmount_all(point)
        self.sn.close()
        sn = Snapshotter(self.target)
        try:
            while True:
                infos = sn.walk()
                if not infos:
                    return
                parents = {info.parent for info in infos}
                leaves = [info.name for info in infos if info.name not in parents]
                for name in leaves:
                    sn.remove(name)
                if not leaves:
                    raise AssertionError(f"cannot clean up snapshots {infos}")
        finally:
            sn.close()


def check_info(si1: Info, si2: Info) -> None:
    """checkInfo: the two infos are the same (kind, name, parent, labels, times)."""
    assert si1.kind == si2.kind, f"expected kind {si1.kind}, got {si2.kind}"
    assert si1.name == si2.name, f"expected name {si1.name}, got {si2.name}"
    assert si1.parent == si2.parent, f"expected Parent {si1.parent}, got {si2.parent}"
    assert len(si1.labels) == len(si2.labels), (
        f"expected {len(si1.labels)} labels, got {len(si2.labels)}"
    )
    for key, value in si1.labels.items():
        assert si2.labels.get(key) == value, f"expected label {value}, got {si2.labels.get(key)}"
    assert si1.created == si2.created, f"expected Created {si1.created}, got {si2.created}"
    assert si1.updated == si2.updated, f"expected Updated {si1.updated}, got {si2.updated}"


def assert_labels(actual: dict[str, str], expected: dict[str, str]) -> None:
    """assertLabels: exactly the expected labels."""
    assert len(actual) == len(expected), f"Label size mismatch: {actual} vs {expected}"
    for key, value in expected.items():
        assert actual.get(key) == value, (
            f"Wrong label value for {key}, got {actual.get(key)!r}, expected {value!r}"
        )




@contextmanager
def cleared_umask() -> Iterator[None]:
    """clearMask: umask 0 for the test (fstest.CreateDir's modes are exact)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)
