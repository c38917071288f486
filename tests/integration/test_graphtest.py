"""
moby's graph driver conformance suite (L{txgraph.testing.graphtest}, a
port of moby v20.10.24's C{daemon/graphdriver/graphtest}) against a real
C{twistd txgraph} on each backend, over its plugin socket; and what else
dockerd, BuildKit and moby's tests may send: any safe layer ID, and sizes
that cannot be honoured.

The rbd daemon's base image is 32 MiB, so that moby's 50M quota layer is
a larger clone of its parent, grown and enforced by its filesystem.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from conftest import Components, rbd_flags, rbd_namespace

from txgraph import mounts
from txgraph.testing.graphtest import (
    PluginClient,
    PluginError,
    make_graphtest,
    random_id,
)

#: The rbd daemon's base image size (the smallest ext4 base txgraph takes).
RBD_BASE_SIZE = "32M"


@pytest.fixture(scope="class")
def graphdriver(request: pytest.FixtureRequest, module_components: Components) -> Iterator[PluginClient]:
    """
    A txgraph daemon on the test class's backend; a client of its socket.
    """
    flags: list[str] = []
    if request.cls.backend == "rbd":
        cluster = request.getfixturevalue("ceph_cluster")
        flags = rbd_flags(cluster, rbd_namespace(cluster))
        flags[flags.index("--rbd-base-size") + 1] = RBD_BASE_SIZE
    daemon = module_components.txgraph(*flags)
    yield PluginClient(str(daemon.socket))
    daemon.stop()


class TestOverlayGraphtest(make_graphtest()):
    """
    moby's graphtest against the overlay backend (quota required).
    """

    backend = "overlay"


class TestRBDGraphtest(make_graphtest()):
    """
    moby's graphtest against the rbd backend (quota required).
    """

    backend = "rbd"


#: IDs that are safe as file names and that earlier txgraph refused; some
#: would break a mount option (":", ","), name a backend's own file or
#: image (".tmp", "base") or imitate a hashed key, if used as they are.
ODD_IDS = [
    "mpg3f1ddm7e6v3dqk5ppnv1bq",
    "a:b,c=d",
    ".tmp",
    "base",
    "candidate.x",
    "x." + "0" * 64,
    "\u00e9" * 127,
    "a" * 255,
    "dot.dot",
]


@pytest.mark.parametrize("backend", ["overlay", "rbd"])
def test_any_safe_layer_id(backend: str, components: Components, request: pytest.FixtureRequest) -> None:
    """
    A chain of layers with odd but safe IDs is created, written, read
    through, diffed and applied (IDs in ApplyDiff's query), listed by
    Exists, and removed, leaving nothing mounted.
    """
    flags: list[str] = []
    if backend == "rbd":
        cluster = request.getfixturevalue("ceph_cluster")
        flags = rbd_flags(cluster, rbd_namespace(cluster))
    daemon = components.txgraph(*flags)
    driver = PluginClient(str(daemon.socket))
    parent = ""
    for i, layer_id in enumerate(ODD_IDS):
        driver.create(layer_id, parent)
        with driver.mounted(layer_id) as root, open(os.path.join(root, f"file-{i}"), "w") as f:
            f.write(layer_id)
        parent = layer_id
    with driver.mounted(ODD_IDS[-1]) as root:
        for i, layer_id in enumerate(ODD_IDS):
            with open(os.path.join(root, f"file-{i}")) as f:
                assert f.read() == layer_id
    copy = "copy:of," + ODD_IDS[-1][:10]
    driver.create(copy, ODD_IDS[-2])
    size = driver.apply_diff(copy, ODD_IDS[-2], driver.diff(ODD_IDS[-1], ODD_IDS[-2]))
    assert size == driver.diff_size(copy, ODD_IDS[-2]) == len(ODD_IDS[-1])
    assert all(driver.exists(i) for i in ODD_IDS + [copy])
    for layer_id in [copy] + ODD_IDS[::-1]:
        driver.remove(layer_id)
        assert not driver.exists(layer_id)
    assert mounts.mounted_under(str(daemon.state_dir)) == []


def test_overlay_sizes_that_cannot_be_honoured(components: Components) -> None:
    """
    On overlay, a size too small for a filesystem is answered with moby's
    own "not supported" words, a size on an image layer with overlay2's,
    an unreadable size names the value; none leaves a layer behind.
    """
    driver = PluginClient(str(components.txgraph().socket))
    layer = random_id()
    with pytest.raises(PluginError) as e:
        driver.create_rw(layer, "", {"size": "16K"})
    assert e.value.message == "Filesystem does not support, or has not enabled quotas"
    with pytest.raises(PluginError) as e:
        driver.create(layer, "", {"size": "50M"})
    assert e.value.message == "--storage-opt size is only supported for ReadWrite Layers"
    with pytest.raises(PluginError) as e:
        driver.create_rw(layer, "", {"size": "lots"})
    assert "invalid storage option size='lots'" in e.value.message
    assert not driver.exists(layer)


def test_rbd_size_below_parent(components: Components, request: pytest.FixtureRequest) -> None:
    """
    On rbd, a size below the parent's image is refused, saying so (as
    moby's devicemapper refuses one below its base size).
    """
    cluster = request.getfixturevalue("ceph_cluster")
    flags = rbd_flags(cluster, rbd_namespace(cluster))
    flags[flags.index("--rbd-base-size") + 1] = "64M"
    driver = PluginClient(str(components.txgraph(*flags).socket))
    driver.create("Base")
    with pytest.raises(PluginError) as e:
        driver.create_rw("rbdTest", "Base", {"size": "40M"})
    assert "is smaller than the layer's parent" in e.value.message
    assert not driver.exists("rbdTest")


def test_overlay_sized_layer_survives_a_crash(components: Components) -> None:
    """
    A mounted sized layer's filesystem stays mounted through a SIGKILL of
    txgraph and its restart (its data still there, its size still
    enforced), and its last Put afterwards releases the filesystem and its
    loop device; Remove deletes the layer's file.
    """
    daemon = components.txgraph()
    driver = PluginClient(str(daemon.socket))
    driver.create("Base")
    driver.create_rw("sized", "Base", {"size": "20M"})
    root = driver.get("sized")
    with open(os.path.join(root, "before"), "wb") as f:
        f.write(b"x" * (5 << 20))
    daemon.kill()
    daemon.start()
    assert driver.get("sized") == root
    with open(os.path.join(root, "before"), "rb") as f:
        assert len(f.read()) == 5 << 20
    with pytest.raises(OSError) as full, open(os.path.join(root, "big"), "wb") as f:
        f.write(b"y" * (20 << 20))
    assert full.value.errno == errno.ENOSPC
    os.remove(os.path.join(root, "big"))
    driver.put("sized")
    driver.put("sized")
    layer_dir = daemon.state_dir / "overlay" / "sized"
    assert mounts.mounted_under(str(daemon.state_dir)) == []
    assert [d for d, f in mounts.loop_backing_files().items() if f.startswith(str(layer_dir))] == []
    assert driver.diff_size("sized", "Base") == 5 << 20
    assert mounts.mounted_under(str(daemon.state_dir)) == []
    driver.remove("sized")
    assert not layer_dir.exists()
