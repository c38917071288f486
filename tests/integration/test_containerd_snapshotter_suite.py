"""containerd's snapshotter suite (txgraph.testing.snapshotter) against
containerd's own overlayfs snapshotter, through the harness's containerd socket,
and against txgraph's snapshotter on both backends, over the socket of a real
twistd (--containerd-listen).

The containerd run validates the Python port against the reference
implementation: every check must pass there before it means anything for
txgraph's.  Each test gets a namespace of its own
on the session's containerd (containerd's metadata keeps namespaces apart,
as Go's suite keeps a new snapshotter per test).
"""

from __future__ import annotations

import itertools
import os

import pytest
from conftest import Components, rbd_flags, rbd_namespace
from txgraphd import Txgraphd

from txgraph.testing.ceph import DevCluster
from txgraph.testing.snapshotter.client import Target
from txgraph.testing.snapshotter.testsuite import TargetFactory, make_snapshotter_tests

_namespaces = itertools.count()


def containerd_target(snapshotter: str) -> TargetFactory:
    """The Snapshots service on the session containerd's socket, for ``snapshotter``,
    in a new namespace per test."""

    def factory(request: pytest.FixtureRequest) -> Target:
        daemon = request.getfixturevalue("containerd")
        namespace = f"snapshot-suite-{os.getpid()}-{next(_namespaces)}"
        return Target(f"unix://{daemon.address}", snapshotter, namespace)

    return factory


@pytest.mark.containerd
class ContainerdOverlayfsTests(make_snapshotter_tests(containerd_target("overlayfs"))):
    """containerd's built-in overlayfs snapshotter passes containerd's suite (as ported)."""


def txgraph_target(backend: str) -> TargetFactory:
    """txgraph's own snapshotter, served by a real twistd (one per backend and
    module) on its --containerd-listen socket.  Every test leaves it empty."""

    def factory(request: pytest.FixtureRequest) -> Target:
        daemon = request.getfixturevalue(f"txgraph_{backend}_snapshotter")
        return Target(f"unix://{daemon.containerd_socket}", "txgraph")

    return factory


@pytest.fixture(scope="module")
def txgraph_overlay_snapshotter(module_components: Components) -> Txgraphd:
    """txgraph on the overlay backend, serving containerd's snapshotter protocol."""
    return module_components.txgraph(containerd=True)


@pytest.fixture(scope="module")
def txgraph_rbd_snapshotter(module_components: Components, ceph_cluster: DevCluster) -> Txgraphd:
    """txgraph on the rbd backend (the session's Ceph cluster, a namespace of its
    own), serving containerd's snapshotter protocol."""
    return module_components.txgraph(
        *rbd_flags(ceph_cluster, rbd_namespace(ceph_cluster)), containerd=True
    )


@pytest.fixture(scope="module")
def txgraph_rbd_local_snapshotter(module_components: Components, ceph_cluster: DevCluster) -> Txgraphd:
    """txgraph on the rbd backend with containers' layers on local storage
    (container_layers=local: every active snapshot that is not an unpack's,
    and every snapshot made on one, is local), serving containerd's
    snapshotter protocol."""
    return module_components.txgraph(
        *rbd_flags(ceph_cluster, rbd_namespace(ceph_cluster)),
        "--rbd-container-layers", "local", containerd=True,
    )


class TxgraphOverlayTests(make_snapshotter_tests(txgraph_target("overlay"))):
    """txgraph's snapshotter on the overlay backend passes containerd's suite."""


@pytest.mark.ceph
class TxgraphRbdTests(make_snapshotter_tests(txgraph_target("rbd"))):
    """txgraph's snapshotter on the rbd backend passes containerd's suite."""

    @pytest.mark.skip(reason="128 clones, each mapped with rbd-fuse and mounted, take some 130 s "
                             "here; it passes (run with -k 128 after removing this skip), and the "
                             "overlay run keeps the check in CI")
    def test_128_layers_mount(self) -> None:
        """128LayersMount on rbd: skipped for time (see the reason)."""


@pytest.mark.ceph
class TxgraphRbdLocalTests(make_snapshotter_tests(txgraph_target("rbd_local"))):
    """txgraph's snapshotter on the rbd backend with container_layers=local
    passes containerd's suite (128LayersMount included: above the first
    snapshot, every layer of its chain is local)."""
