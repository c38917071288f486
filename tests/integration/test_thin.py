"""
Thin images and shared layers on a real dev cluster, with two Docker hosts
(two dockerd, two txgraph: nodes A and B) sharing one pool and namespace.

 - make-thin on A; B runs the thin image and sees the same file tree as the
   full image, with the same config, reading a small fraction of the
   image's bytes from the cluster (asserted from txgraph's counters);
 - the same ordinary image loaded on B adds almost nothing to the pool;
   removing it on A keeps B working; gc on either node keeps what the other
   uses, and removes shared layers once no node uses them;
 - bad descriptors of every kind are refused at load time, leaving nothing.

The tests of this module run in order, on the same two nodes.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack, node_gc, pool_images, rbd_cli
from dockerd import DockerCommandError
from prometheus_client.parser import text_string_to_metric_families
from txgraphd import admin

from txgraph import thin
from txgraph.admin.client import Daemon
from txgraph.admin.make_thin import thin_tar
from txgraph.testing.ceph import DevCluster

pytestmark = [pytest.mark.dockerd, pytest.mark.ceph]

FULL = "debian:local"
THIN = "debian:thin"
# Every file's checksum, and every other entry's type, mode, owner and target,
# on the container's own filesystem (not the files dockerd writes per container).
_SKIP = f"! -path /{thin.DESCRIPTOR_PATH} ! -path /etc/hostname ! -path /etc/hosts ! -path /etc/resolv.conf"
TREE = (
    f"find / -xdev -type f {_SKIP} -exec sha256sum {{}} + | sort; "
    f"find / -xdev ! -type f {_SKIP} -printf '%p %M %U:%G %l\\n' | sort"
)


def _used_bytes(cluster: DevCluster, namespace: str) -> int:
    """
    The bytes the namespace's images (and snapshots) hold in the pool.
    """
    report = json.loads(rbd_cli(cluster, "du", "--format", "json", "--pool", cluster.pool,
                             "--namespace", namespace))
    return int(report.get("total_used_size", 0))


def _lazy_read_bytes(stack: Stack) -> float:
    """
    C{txgraph_cluster_read_bytes_total} of the node's metrics (through its
    admin socket, as C{txgraph-admin top} reads them).
    """
    text = b"".join(Daemon(str(stack.txgraph.state_dir)).stream("/metrics")).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "txgraph_cluster_read_bytes"]
    (sample,) = [s for s in family.samples if s.name == "txgraph_cluster_read_bytes_total"]
    return float(sample.value)


def _admin_json(stack: Stack, *args: str) -> Any:
    result = admin(stack.txgraph.state_dir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _tree(stack: Stack, image: str) -> str:
    return str(stack.docker("run", "--rm", "--network", "none", image, "sh", "-c", TREE,
                            timeout=600).stdout)


@pytest.fixture(scope="module")
def made(
    two_nodes: tuple[Stack, Stack, str], debian_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """
    Node A loads the Debian image and makes a thin image of it; node B gets
    the thin image (docker save on A, docker load on B: what a registry
    would carry).
    """
    a, b, _ = two_nodes
    a.docker("load", "-i", str(debian_image), timeout=900)
    report = _admin_json(
        a, "make-thin", FULL, "--tag", THIN, "--docker-host", a.dockerd.host, "--json"
    )
    saved = tmp_path_factory.mktemp("thin") / "thin.tar"
    a.docker("save", "-o", str(saved), THIN)
    b.docker("load", "-i", str(saved))
    return {"report": report, "saved": saved}


def test_make_thin_describes_the_layers(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], ceph_cluster: DevCluster
) -> None:
    """
    make-thin stored each layer once, as a shared snapshot named by its
    chain ID (A's load had already stored it, so it was found there), and
    the thin image has one layer: the descriptor, at its path.
    """
    a, _, namespace = two_nodes
    report = made["report"]
    descriptor = report["descriptor"]
    full = json.loads(a.docker("image", "inspect", FULL).stdout)[0]
    assert [layer["diff_id"] for layer in descriptor["layers"]] == full["RootFS"]["Layers"]
    assert descriptor["cluster"] == {
        "fsid": ceph_cluster.fsid, "pool": ceph_cluster.pool, "namespace": namespace,
    }
    assert descriptor["version"] == thin.VERSION and descriptor["image"]["id"] == full["Id"]
    assert all(layer["existed"] for layer in report["layers"]), report["layers"]
    images = pool_images(ceph_cluster, namespace)
    for layer in descriptor["layers"]:
        image = layer["snapshot"].split("@")[0]
        assert image in images and image.endswith(layer["chain_id"][7:])
        info = json.loads(rbd_cli(ceph_cluster, "info", "--format", "json",
                               f"{ceph_cluster.pool}/{namespace}/{image}"))
        # Small objects: a clone's first write copies 256 KiB, not 4 MiB.
        assert info["object_size"] == 256 << 10, info
    thin_info = json.loads(a.docker("image", "inspect", THIN).stdout)[0]
    assert len(thin_info["RootFS"]["Layers"]) == 1
    assert thin_info["Id"] == report["thin_id"]


def test_thin_image_runs_on_the_other_node_with_the_same_tree(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any]
) -> None:
    """
    B, which never saw the full image, runs the thin one: the same files
    (checksums over the whole tree), the same config; and B's docker save
    of the thin image gives back the very layer that was loaded.
    """
    a, b, _ = two_nodes
    assert FULL not in b.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert _tree(b, THIN) == _tree(a, FULL)
    full = json.loads(a.docker("image", "inspect", FULL).stdout)[0]["Config"]
    thin_config = json.loads(b.docker("image", "inspect", THIN).stdout)[0]["Config"]
    assert thin_config == full
    out = b.docker("run", "--rm", "--network", "none", THIN, "cat", f"/{thin.DESCRIPTOR_PATH}").stdout
    assert json.loads(out) == made["report"]["descriptor"]
    saved = b.docker("save", THIN, text=False).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer = outer.extractfile(manifest[0]["Layers"][0])
        assert layer is not None
        digest = "sha256:" + hashlib.sha256(layer.read()).hexdigest()
    assert digest == json.loads(b.docker("image", "inspect", THIN).stdout)[0]["RootFS"]["Layers"][0]


def test_the_thin_tree_is_one_shared_image_that_the_other_node_clones(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], ceph_cluster: DevCluster
) -> None:
    """
    The thin layer's tree (the image's with the descriptor added) is a
    shared image of the chain of the descriptor's tar on the image's
    layers, made once, by A's load in make-thin: B's thin layer is a clone
    of it, so B's load wrote no descriptor and mapped nothing.
    """
    a, b, namespace = two_nodes
    descriptor = made["report"]["descriptor"]
    raw = json.dumps(descriptor, indent=1, sort_keys=True).encode() + b"\n"
    # B's load of what A saved: the layer dockerd recorded is the descriptor's tar.
    diff_id = json.loads(b.docker("image", "inspect", THIN).stdout)[0]["RootFS"]["Layers"][0]
    assert diff_id == "sha256:" + hashlib.sha256(thin.layer_tar(raw)).hexdigest()
    chain = thin.chain_id(descriptor["layers"][-1]["chain_id"], diff_id)
    (tree,) = [i for i in pool_images(ceph_cluster, namespace) if i.endswith(".shared.ext4." + chain[7:])]
    children = rbd_cli(ceph_cluster, "children", "--format", "json",
                       f"{ceph_cluster.pool}/{namespace}/{tree}@txgraph")
    users = sorted(c["image"].split(".")[1] for c in json.loads(children))
    assert users == ["node-a", "node-b"], children
    # The shared images are the base, the image's layers and that tree.
    shared = [i for i in pool_images(ceph_cluster, namespace)
              if ".shared.ext4." in i and not i.endswith(".base")]
    assert len(shared) == len(descriptor["layers"]) + 1, shared


def test_a_thin_container_reads_a_small_fraction_of_the_image(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any]
) -> None:
    """
    A container of the thin image running one binary reads, through its
    mapping, a few percent of the image's bytes from the cluster; status
    shows it per mounted layer, and the metrics count it (the counter
    keeps it after the container is gone).
    """
    _, b, _ = two_nodes
    image_bytes = sum(layer["size"] for layer in made["report"]["descriptor"]["layers"])
    assert image_bytes > 50 << 20
    before = _lazy_read_bytes(b)
    name = "thin-reader"
    b.docker("run", "-d", "--name", name, "--network", "none", THIN, "sleep", "600")
    try:
        reads = _admin_json(b, "status", "--json")["cluster_reads"]
        assert len(reads) == 1, reads
        (counters,) = reads.values()
        assert 0 < counters["bytes_read"] < image_bytes // 10, (counters, image_bytes)
        status = b.status()
        assert any(k.startswith("Lazy Reads ") for k in status), status
        counted = _lazy_read_bytes(b) - before
        # (Sampled a moment later: the mapping may have read a little more.)
        assert counters["bytes_read"] <= counted < image_bytes // 10, (counted, counters)
    finally:
        b.docker("rm", "-f", name)
    assert _lazy_read_bytes(b) - before >= counted


def test_the_same_ordinary_image_on_the_other_node_adds_almost_nothing(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], debian_image: Path,
    ceph_cluster: DevCluster,
) -> None:
    """
    B loads the full image too: its layer is found in the pool by chain ID,
    B's own copy is discarded, and the pool grows by almost nothing.
    Then A removes everything: B keeps working; gc on A keeps what B uses.
    """
    a, b, namespace = two_nodes
    before = _used_bytes(ceph_cluster, namespace)
    b.docker("load", "-i", str(debian_image), timeout=900)
    grown = _used_bytes(ceph_cluster, namespace) - before
    assert grown < 4 << 20, grown
    assert not [i for i in pool_images(ceph_cluster, namespace) if ".candidate." in i]
    for image in (THIN, FULL):
        a.docker("rmi", image)
    assert node_gc(a, "--apply")[1] == []
    out = b.docker("run", "--rm", "--network", "none", FULL, "cat", "/etc/debian_version").stdout
    assert out.strip()
    out = b.docker("run", "--rm", "--network", "none", THIN, "cat", "/etc/debian_version").stdout
    assert out.strip()
    assert node_gc(b)[1] == []


def test_gc_removes_shared_layers_once_no_node_uses_them(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], ceph_cluster: DevCluster
) -> None:
    """
    Once B removed its images too, the shared layers are unused: gc on both
    nodes at once finds them and removes them without an error; nothing is
    left but the nodes' own base images.
    """
    a, b, namespace = two_nodes
    for image in (THIN, FULL):
        b.docker("rmi", image)
    shared = [i for i in pool_images(ceph_cluster, namespace) if ".shared." in i]
    assert shared
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: node_gc(s, "--apply")[1], (a, b)))
    # Each node finds what is unused when it looks (the other may have
    # removed some already); together they find all, and every removal works.
    assert {f["id"] for found in results for f in found} == set(shared)
    for found in results:
        assert all(f["kind"] == "shared" and f["repaired"] for f in found), found
    assert pool_images(ceph_cluster, namespace) == ["txgraph.node-a.base", "txgraph.node-b.base"]
    assert node_gc(a)[1] == [] and node_gc(b)[1] == []


def _bad(descriptor: dict[str, Any], change: Any) -> bytes:
    document = copy.deepcopy(descriptor)
    change(document)
    return json.dumps(document).encode()


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(document: dict[str, Any]) -> None:
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


BAD = {
    "malformed": (lambda d: b"{\"kind\": \"txgraph.thin\", ", "not valid JSON"),
    "version": (lambda d: _bad(d, _set(("version",), 99)), "unknown format version 99"),
    "missing-snapshot": (
        lambda d: _bad(d, _set(("layers", -1, "snapshot"), "txgraph.shared.ext4.gone@txgraph")),
        "does not exist in the pool",
    ),
    "other-cluster": (
        lambda d: _bad(d, _set(("cluster", "fsid"), "00000000-0000-0000-0000-000000000000")),
        "points to Ceph cluster 00000000-0000-0000-0000-000000000000",
    ),
    "other-pool": (lambda d: _bad(d, _set(("cluster", "pool"), "elsewhere")), "points to pool elsewhere"),
    "other-filesystem": (lambda d: _bad(d, _set(("filesystem",), "xfs")), "holds xfs snapshots"),
    "wrong-chain": (
        lambda d: _bad(d, _set(("layers", 0, "diff_id"), "sha256:" + "0" * 64)),
        "does not follow from the diff IDs",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_descriptors_are_refused_at_load_leaving_nothing(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], ceph_cluster: DevCluster, kind: str
) -> None:
    """
    A thin image whose descriptor is malformed, of an unknown version, or
    points at a missing snapshot, another cluster, pool or filesystem, or
    a broken chain, fails docker load with the reason; no layer, image or
    pool object is left behind.
    """
    _, b, namespace = two_nodes
    make, message = BAD[kind]
    descriptor = make(made["report"]["descriptor"])
    archive, _ = thin_tar({"architecture": "amd64", "os": "linux", "config": {}}, descriptor,
                           f"bad:{kind}", "test")
    layers = b.layer_ids()
    images = pool_images(ceph_cluster, namespace)
    with pytest.raises(DockerCommandError) as caught:
        b.docker("load", input=archive, text=False)
    assert message in caught.value.stderr.decode(), caught.value.stderr
    assert b.layer_ids() == layers
    assert pool_images(ceph_cluster, namespace) == images
    assert f"bad:{kind}" not in b.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert node_gc(b)[1] == []


def test_a_descriptor_on_top_of_other_layers_is_refused(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], busybox_image: Path
) -> None:
    """
    A descriptor is only honoured as an image's only layer: one committed
    on top of another layer is refused, naming why.
    """
    _, b, _ = two_nodes
    b.docker("load", "-i", str(busybox_image))
    raw = json.dumps(made["report"]["descriptor"]).encode()
    layers = b.layer_ids()
    tar = thin.layer_tar(raw)
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    busybox = json.loads(b.docker("image", "inspect", "busybox:local").stdout)[0]
    # An image of busybox's layer plus the descriptor layer.
    saved = b.docker("save", "busybox:local", text=False).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        lower = outer.extractfile(manifest[0]["Layers"][0]).read()  # type: ignore[union-attr]
    config["rootfs"] = {"type": "layers", "diff_ids": busybox["RootFS"]["Layers"] + [
        "sha256:" + hashlib.sha256(tar).hexdigest()]}
    raw_config = json.dumps(config).encode()
    config_name = hashlib.sha256(raw_config).hexdigest() + ".json"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for path, data in (
            (config_name, raw_config),
            ("lower/layer.tar", lower),
            ("top/layer.tar", tar),
            ("manifest.json", json.dumps([{"Config": config_name, "RepoTags": ["bad:stacked"],
                                           "Layers": ["lower/layer.tar", "top/layer.tar"]}]).encode()),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DockerCommandError) as caught:
        b.docker("load", input=out.getvalue(), text=False)
    assert "must be its image's only layer" in caught.value.stderr.decode()
    assert b.layer_ids() == layers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nosuch:image",), "dockerd has no image 'nosuch:image'"),
        (("busybox:local", "--pool", "elsewhere"), "--pool elsewhere: this txgraph keeps its layers in pool"),
        (("busybox:local", "--docker-host", "unix:///nonexistent.sock"), "does not exist (is dockerd running?)"),
    ],
    ids=["no-image", "other-pool", "no-dockerd"],
)
def test_make_thin_refuses_bad_input(
    two_nodes: tuple[Stack, Stack, str], made: dict[str, Any], ceph_cluster: DevCluster,
    busybox_image: Path, args: tuple[str, ...], message: str,
) -> None:
    """
    make-thin names what is wrong (exit 2) and stores nothing.
    """
    a, _, namespace = two_nodes
    a.docker("load", "-i", str(busybox_image))
    images = pool_images(ceph_cluster, namespace)
    extra = () if "--docker-host" in args else ("--docker-host", a.dockerd.host)
    result = admin(a.txgraph.state_dir, "make-thin", *args, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert pool_images(ceph_cluster, namespace) == images
