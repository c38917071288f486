"""containerd's snapshotter suite (txgraph.testing.snapshotter) against
containerd's own overlayfs snapshotter, through the harness's containerd socket.

This validates the Python port against the reference implementation: every
check must pass here before it means anything for txgraph's snapshotter,
which will be the second subscriber.  Each test gets a namespace of its own
on the session's containerd (containerd's metadata keeps namespaces apart,
as Go's suite keeps a new snapshotter per test).
"""

from __future__ import annotations

import itertools
import os

import pytest

from txgraph.testing.snapshotter.client import Target
from txgraph.testing.snapshotter.testsuite import TargetFactory, make_snapshotter_tests

pytestmark = pytest.mark.containerd

_namespaces = itertools.count()


def containerd_target(snapshotter: str) -> TargetFactory:
    """The Snapshots service on the session containerd's socket, for ``snapshotter``,
    in a new namespace per test."""

    def factory(request: pytest.FixtureRequest) -> Target:
        daemon = request.getfixturevalue("containerd")
        namespace = f"snapshot-suite-{os.getpid()}-{next(_namespaces)}"
        return Target(f"unix://{daemon.address}", snapshotter, namespace)

    return factory


class ContainerdOverlayfsTests(make_snapshotter_tests(containerd_target("overlayfs"))):
    """containerd's built-in overlayfs snapshotter passes containerd's suite (as ported)."""
