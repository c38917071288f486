"""
Two Docker hosts sharing one Ceph pool: two txgraph instances with
different node ids and state directories, each under its own dockerd, on
one pool and namespace of a real dev cluster.  Both load and run the same
images; neither lists, changes nor removes the other's RBD images, and gc
on one leaves the other's alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Stack, node_gc, pool_images

from txgraph.testing.ceph import DevCluster

pytestmark = [pytest.mark.dockerd, pytest.mark.ceph]


def test_both_nodes_load_and_run(
    two_nodes: tuple[Stack, Stack, str], busybox_image: Path, ceph_cluster: DevCluster
) -> None:
    """
    Both nodes load and run the same image; each node's images carry its
    own node id.
    """
    a, b, namespace = two_nodes
    for stack in (a, b):
        stack.docker("load", "-i", str(busybox_image))
        out = stack.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "hi").stdout
        assert out.strip() == "hi"
    images = pool_images(ceph_cluster, namespace)
    assert any(".node-a." in i for i in images) and any(".node-b." in i for i in images)
    # Besides each node's own images, only the shared layers of the pool.
    assert all(".node-a." in i or ".node-b." in i or ".shared." in i for i in images), images


def test_nodes_do_not_see_each_other(two_nodes: tuple[Stack, Stack, str]) -> None:
    """
    Each node lists only its own layers.
    """
    a, b, _ = two_nodes
    assert a.layer_ids() and b.layer_ids()
    assert a.layer_ids().isdisjoint(b.layer_ids())


def test_removal_on_one_node_keeps_the_other(
    two_nodes: tuple[Stack, Stack, str], ceph_cluster: DevCluster
) -> None:
    """
    docker rmi on node A removes only A's images; B keeps running, and gc on
    A, even with --apply, never touches B's images.
    """
    a, b, namespace = two_nodes
    b_images = {i for i in pool_images(ceph_cluster, namespace) if ".node-b." in i}
    a.docker("rmi", "busybox:local")
    remaining = set(pool_images(ceph_cluster, namespace))
    assert not any(".node-a." in i and ".base" not in i for i in remaining), remaining
    assert b_images <= remaining
    out = b.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "still").stdout
    assert out.strip() == "still"
    assert node_gc(a, "--apply")[0] in (0, 1)
    assert b_images <= set(pool_images(ceph_cluster, namespace))
    assert node_gc(b) == (0, [])
