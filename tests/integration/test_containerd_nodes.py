"""
Two containerd nodes on one Ceph pool, each with its own txgraph (rbd
backend, node ids node-a and node-b, one RBD namespace): containerd's
remote-snapshot shortcut between hosts.

Node A pulls the suite's Debian image and busybox through CRI (the path on
which containerd's unpacker labels each layer with its chain ID), from the
session's local registry: it unpacks every layer and publishes each as the
pool's shared layer of its chain.  Node B then pulls the same images: every
Prepare is answered AlreadyExists from the pool (B's txgraph makes its
committed snapshot a clone of the shared layer), so B fetches and unpacks
nothing, the pool grows by less than 4 MiB, and B runs the image
(``ctr run --snapshotter txgraph`` in CRI's namespace ``k8s.io``: CRI itself
cannot start a sandbox without CNI).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Components, rbd_cli, rbd_flags, rbd_namespace
from containerd import CRI_NAMESPACE, Containerd, PushedImage, Registry, push_image
from dockerd import rbd_fuse_processes
from txgraphd import Txgraphd

from txgraph.snapshotter import TARGET_REF
from txgraph.testing.ceph import DevCluster

pytestmark = pytest.mark.containerd


def _used_bytes(cluster: DevCluster, namespace: str) -> int:
    """The bytes the namespace's images (and snapshots) hold in the pool (``rbd du``)."""
    report = json.loads(rbd_cli(cluster, "du", "--format", "json", "--pool", cluster.pool,
                                "--namespace", namespace))
    return int(report.get("total_used_size", 0))


@pytest.fixture(scope="module")
def pushed(containerd: Containerd, registry: Registry, busybox_image: Path,
           debian_image: Path) -> dict[str, PushedImage]:
    """busybox:local and debian:local pushed to the session registry."""
    return {
        "busybox": push_image(containerd, registry, busybox_image, "txgraph-test/nodes-busybox"),
        "debian": push_image(containerd, registry, debian_image, "txgraph-test/nodes-debian"),
    }


@pytest.fixture
def nodes(
    module_components: Components, ceph_cluster: DevCluster, registry: Registry,
    tmp_path: Path,
) -> Iterator[tuple[tuple[Txgraphd, Containerd], tuple[Txgraphd, Containerd], str]]:
    """Nodes A and B: each a txgraph (rbd, one namespace) serving containerd,
    and a containerd whose CRI plugin unpacks with it."""
    if not os.access("/usr/bin/containerd", os.X_OK):
        pytest.skip("containerd is not installed")
    namespace = rbd_namespace(ceph_cluster)
    made: list[tuple[Txgraphd, Containerd]] = []
    try:
        for node in ("node-a", "node-b"):
            daemon = module_components.txgraph(
                *rbd_flags(ceph_cluster, namespace, node=node), containerd=True
            )
            assert daemon.containerd_socket is not None
            ctrd = Containerd(
                tmp_path / node, proxy_plugins={"txgraph": daemon.containerd_socket},
                cri_snapshotter="txgraph", plain_http_registries=[registry.host],
            )
            made.append((daemon, ctrd))
            ctrd.start()
        yield made[0], made[1], namespace
    finally:
        for _daemon, ctrd in reversed(made):
            ctrd.cleanup()
        # What containerd left (the images' snapshots: a held rbd layer keeps
        # its device and rbd-fuse until Remove) goes before the daemons stop.
        for daemon, _ctrd in made:
            _remove_snapshots(daemon)
            assert rbd_fuse_processes(os.path.realpath(daemon.state_dir)) == [], daemon.state_dir


def _remove_snapshots(daemon: Txgraphd) -> None:
    """Remove every snapshot a txgraph holds, children before their parents."""
    from txgraph.testing.snapshotter.client import Snapshotter, Target

    client = Snapshotter(Target(f"unix://{daemon.containerd_socket}", "txgraph", CRI_NAMESPACE))
    try:
        while infos := client.walk():
            parents = {info.parent for info in infos}
            leaves = [info.name for info in infos if info.name not in parents]
            assert leaves, f"cannot remove snapshots {infos}"
            for name in leaves:
                client.remove(name)
    finally:
        client.close()


def _snapshots(daemon: Txgraphd) -> list[tuple[str, int, dict[str, str]]]:
    """(name, kind, labels) of every snapshot of a txgraph, over its socket."""
    from txgraph.testing.snapshotter.client import Snapshotter, Target

    client = Snapshotter(Target(f"unix://{daemon.containerd_socket}", "txgraph", CRI_NAMESPACE))
    try:
        return [(i.name, i.kind, dict(i.labels)) for i in client.walk()]
    finally:
        client.close()


def test_second_node_takes_every_layer_from_the_pool(
    nodes: tuple[tuple[Txgraphd, Containerd], tuple[Txgraphd, Containerd], str],
    pushed: dict[str, PushedImage], ceph_cluster: DevCluster,
) -> None:
    """A unpacks and publishes every layer; B's CRI pull of the same images
    takes every layer from the pool (no Commit: each committed snapshot is
    named by its extract key and each chain is logged as taken), the pool
    grows by less than 4 MiB, and B runs the Debian image."""
    from txgraph.api.containerd.proto import snapshots_pb2

    (daemon_a, node_a), (daemon_b, node_b), namespace = nodes
    chains = {c for image in pushed.values() for c in image.chain_ids}
    for image in pushed.values():
        node_a.cri_pull(image.reference, timeout=600)
    unpacked = _snapshots(daemon_a)
    assert {labels.get(TARGET_REF) for _n, _k, labels in unpacked} == chains, unpacked
    log_a = daemon_a.log_path.read_text(errors="replace")
    for chain in chains:
        assert f"chain {chain} published as" in log_a, chain

    before = _used_bytes(ceph_cluster, namespace)
    for image in pushed.values():
        node_b.cri_pull(image.reference, timeout=600)
    grown = _used_bytes(ceph_cluster, namespace) - before
    assert grown < 4 << 20, f"the pool grew by {grown} bytes for node B's pulls"

    adopted = _snapshots(daemon_b)
    assert {labels[TARGET_REF] for _n, _k, labels in adopted} == chains, adopted
    for name, kind, _labels in adopted:
        # Taken from the pool: committed under the Prepare's key; an unpacked
        # layer would have been committed as k8s.io/<n>/<chain ID>.
        assert kind == snapshots_pb2.COMMITTED and "/extract-" in name, adopted
    log_b = daemon_b.log_path.read_text(errors="replace")
    for chain in chains:
        assert f"chain {chain} taken from the pool" in log_b, chain
    assert "published as" not in log_b

    container = f"nodes-{os.getpid()}"
    out = node_b.ctr(
        "run", "--rm", "--snapshotter", "txgraph", pushed["debian"].reference, container,
        "cat", "/etc/debian_version", namespace=CRI_NAMESPACE,
    ).stdout
    assert out.strip()[:2].isdigit(), out
