"""The suite's entry point (Go's ``SnapshotterSuite`` in ``testsuite.go``):
L{make_snapshotter_tests} makes the test class for the endpoints a
subscriber's factory makes, every test of L{metadata_tests} and
L{content_tests} with a fresh ``suite`` fixture.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from txgraph.testing.snapshotter.client import Target
from txgraph.testing.snapshotter.content_tests import SnapshotContentTests
from txgraph.testing.snapshotter.metadata_tests import SnapshotMetadataTests
from txgraph.testing.snapshotter.suite import Suite, cleared_umask


class TargetFactory(Protocol):
    """Makes the :class:`Target` for one test (fixtures come from ``request``)."""

    def __call__(self, request: pytest.FixtureRequest) -> Target: ...


def _labels() -> dict[str, str]:
    """The suite's ``opt``: a gc.root label, so containerd's GC keeps the snapshots."""
    return {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def make_snapshotter_tests(factory: TargetFactory) -> type:
    """The test class of containerd's snapshotter suite for the endpoints ``factory`` makes."""
    labels = _labels()

    class SnapshotterSuiteTests(SnapshotMetadataTests, SnapshotContentTests):
        """containerd v1.6.20's snapshots/testsuite over the gRPC Snapshots service."""

        @pytest.fixture
        def suite(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Suite]:
            """A fresh target, a work directory, umask 0; everything removed afterwards."""
            work = tmp_path / "work"
            work.mkdir()
            suite = Suite(factory(request), work, labels)
            try:
                with cleared_umask():
                    yield suite
            finally:
                suite.cleanup()

    return SnapshotterSuiteTests
