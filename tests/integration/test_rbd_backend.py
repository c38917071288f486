"""
The rbd backend on a real single-node Ceph cluster (memstore) that the
suite starts itself, mapped with whatever mapper this host offers (rbd-fuse
+ loop devices where there is no kernel rbd or nbd): the backend
conformance suite, plus what is particular to RBD: nodes sharing a pool,
option and cluster faults, failed operations that must leave nothing
behind, the size storage option, and dead librbd clients.

Every test gets its own RBD namespace, so tests do not see each other's
images; after every test, nothing of it (loop device, mount, rbd-fuse
process) may be left on the host.  Skipped when Ceph is not installed.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dockerd import host_leftovers, pid_alive
from prometheus_client.parser import text_string_to_metric_families

from txgraph import metrics, mounts
from txgraph.backends import LayerInfo, LayerView, parse_options
from txgraph.backends.catalog import backend_class
from txgraph.backends.rbd import RBDBackend
from txgraph.backends.rbd.metadata import K_OWNER, K_STATE, SNAP, client_nonce
from txgraph.errors import ArchiveError, BackendError, ConfigurationError
from txgraph.model import ChangeKind
from txgraph.testing.ceph import DevCluster
from txgraph.testing.conformance import IDENTITY, Layers, make_backend_tests, new_id
from txgraph.testing.tars import files_tar

pytestmark = [
    pytest.mark.ceph,
    pytest.mark.skipif(
        not DevCluster.available(), reason="Ceph is not installed (needs ceph-mon and ceph-osd)"
    ),
]

MiB = 1 << 20


def _bindings() -> tuple[ModuleType, ModuleType]:
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as e:
        pytest.fail(
            f"Ceph is installed but its Python bindings are not importable ({e}); "
            "run .ci/link-ceph-bindings.sh on the virtualenv"
        )


class Ceph:
    """
    The session's cluster, an admin connection to it, and a fresh
    namespace per test.
    """

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.rados, self.rbd = _bindings()
        self.conn = self.rados.Rados(conffile=cluster.conf)
        self.conn.connect(timeout=30)
        self.ioctx = self.conn.open_ioctx(cluster.pool)

    def close(self) -> None:
        self.ioctx.close()
        self.conn.shutdown()

    def namespace(self) -> str:
        """
        A new, empty RBD namespace.
        """
        name = f"t{uuid.uuid4().hex[:12]}"
        self.rbd.RBD().namespace_create(self.ioctx, name)
        return name

    def options(self, namespace: str, **extra: str) -> dict[str, Any]:
        """
        Parsed options for a backend in C{namespace}, as the restricted
        client.txgraph (mon 'profile rbd', osd 'profile rbd pool=rbd').
        """
        values = {
            "conf": self.cluster.conf,
            "client": DevCluster.client_id,
            "keyring": self.cluster.client_keyring,
            "pool": self.cluster.pool,
            "namespace": namespace,
            "base_size": "256M",
            "node_id": "node-a",
            "timeout": "20",
        }
        values.update(extra)
        return parse_options(RBDBackend, values)

    def backend(self, state_dir: str, namespace: str | None = None, **extra: str) -> RBDBackend:
        """
        A backend (not started) in a new or the given namespace.
        """
        return RBDBackend(state_dir, self.options(namespace or self.namespace(), **extra))

    def io(self, namespace: str) -> Any:
        """
        An admin I/O context in C{namespace}.
        """
        ioctx = self.conn.open_ioctx(self.cluster.pool)
        ioctx.set_namespace(namespace)
        return ioctx

    def images(self, namespace: str) -> list[str]:
        """
        C{rbd ls} of a namespace.
        """
        ioctx = self.io(namespace)
        try:
            return sorted(self.rbd.RBD().list(ioctx))
        finally:
            ioctx.close()

    def trash(self, namespace: str) -> list[str]:
        """
        The names of the images in a namespace's RBD trash.
        """
        ioctx = self.io(namespace)
        try:
            return sorted(e["name"] for e in self.rbd.RBD().trash_list(ioctx))
        finally:
            ioctx.close()

    def snaps(self, namespace: str, image: str) -> list[str]:
        """
        The snapshots of an image.
        """
        ioctx = self.io(namespace)
        try:
            with self.rbd.Image(ioctx, image, read_only=True) as img:
                return [s["name"] for s in img.list_snaps()]
        finally:
            ioctx.close()

    def meta(self, namespace: str, image: str) -> dict[str, str]:
        """
        An image's metadata.
        """
        ioctx = self.io(namespace)
        try:
            with self.rbd.Image(ioctx, image, read_only=True) as img:
                return dict(img.metadata_list())
        finally:
            ioctx.close()


_ceph: Ceph | None = None


@pytest.fixture(scope="session")
def ceph(ceph_cluster: DevCluster) -> Iterator[Ceph]:
    """
    The session's dev cluster (tests/integration/conftest.py), with admin
    access for the checks.
    """
    global _ceph
    _ceph = Ceph(ceph_cluster)
    try:
        yield _ceph
    finally:
        _ceph.close()
        _ceph = None


@pytest.fixture(autouse=True)
def no_leftovers(ceph: Ceph, tmp_path: Path) -> Iterator[None]:
    """
    Every test of this module runs against the session cluster, and leaves
    no loop device, mount or rbd-fuse process behind.
    """
    yield
    assert host_leftovers(str(tmp_path)) == []


def conformance_backend(state_dir: str) -> RBDBackend:
    """
    A backend for the conformance suite, in a namespace of its own.
    """
    assert _ceph is not None, "the ceph fixture is not active"
    return _ceph.backend(state_dir)


class RBDBackendConformanceTests(make_backend_tests(conformance_backend, apply_size="content")):
    """
    The rbd backend keeps the backend contract; its ApplyDiff answers the
    tar's content size, as moby's naive-diff drivers (devicemapper) do.
    """


def local_conformance_backend(state_dir: str) -> RBDBackend:
    """
    A backend that keeps containers' layers locally (C{container_layers=local}),
    in a namespace of its own.
    """
    assert _ceph is not None, "the ceph fixture is not active"
    return _ceph.backend(state_dir, container_layers="local", unmap_delay="1")


class RBDLocalConformanceTests(
    make_backend_tests(local_conformance_backend, apply_size="content", containers=True)
):
    """
    The same contract with containers' layers kept locally: every read-write
    layer made on a parent is an overlayfs directory over its RBD base
    (L{txgraph.backends.rbd.local}), and the layers made on it are local too.
    """


# -- helpers -----------------------------------------------------------------------


@dataclass
class Started:
    """
    A started backend in a namespace of its own, and a driver for it.
    """

    backend: RBDBackend
    namespace: str
    layers: Layers


@pytest.fixture
def started(ceph: Ceph, tmp_path: Path) -> Iterator[Started]:
    """
    A started backend; everything it made is removed afterwards.
    """
    namespace = ceph.namespace()
    backend = ceph.backend(str(tmp_path / "state"), namespace)
    backend.start()
    env = Started(backend, namespace, Layers(backend))
    try:
        yield env
    finally:
        env.layers.cleanup()
        env.backend.stop()


def _read(root: str, name: str) -> bytes:
    with open(os.path.join(root, name), "rb") as f:
        return f.read()


# -- sharing a pool ----------------------------------------------------------------


def test_two_nodes_share_a_pool(ceph: Ceph, tmp_path: Path) -> None:
    """
    Two backends with different node ids in one pool and namespace each
    have their own base and layers: neither lists, changes nor removes the
    other's images, even for the same layer ID.
    """
    namespace = ceph.namespace()
    a = ceph.backend(str(tmp_path / "a"), namespace, node_id="node-a")
    b = ceph.backend(str(tmp_path / "b"), namespace, node_id="node-b")
    a.start()
    b.start()
    la, lb = Layers(a), Layers(b)
    try:
        shared = new_id()
        for layers, content in ((la, b"from a"), (lb, b"from b")):
            layers.prepare(LayerInfo(id=shared, parent=None, readwrite=True))
            layers.write(shared, {"who": content})
        only_b = lb.create()
        assert a.list_layers() == [shared]
        assert sorted(b.list_layers()) == sorted([shared, only_b])
        assert not a.exists(LayerInfo(id=only_b, parent=None))
        # A removing, committing or resetting "its" copy of B's layer
        # touches only its own image: commit finds none; reset (which
        # recovery calls to empty an interrupted ApplyDiff) makes A's own
        # fresh one, and A's remove removes that.
        with pytest.raises(BackendError, match="its image does not exist"):
            a.commit(LayerInfo(id=only_b, parent=None))
        a.reset(LayerInfo(id=only_b, parent=None))
        assert ceph.meta(namespace, f"txgraph.node-a.{only_b}")[K_OWNER] == "node-a"
        assert ceph.meta(namespace, f"txgraph.node-b.{only_b}")[K_OWNER] == "node-b"
        a.remove(LayerInfo(id=only_b, parent=None))
        a.remove(la.infos[shared])
        del la.infos[shared]
        assert b.exists(lb.infos[only_b])
        assert _read(lb.get(shared), "who") == b"from b"
        lb.put(shared)
        images = ceph.images(namespace)
        assert all(not i.startswith("txgraph.node-a.") or i.endswith(".base") for i in images)
        assert f"txgraph.node-b.{shared}" in images and f"txgraph.node-b.{only_b}" in images
        assert ceph.meta(namespace, f"txgraph.node-b.{shared}")[K_OWNER] == "node-b"
    finally:
        la.cleanup()
        lb.cleanup()
        a.stop()
        b.stop()


# -- options and faults ------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("base_size", "ten gigs"),
        ("base_size", "1K"),
        ("fs", "btrfs"),
        ("mapper", "magic"),
        ("node_id", "a.b"),
        ("timeout", "0"),
        ("timeout", "nan"),
        ("timeout", "3601"),
        ("unmap_delay", "-1"),
        ("unmap_delay", "inf"),
        ("unmap_delay", "soon"),
        ("mount_options", "ro"),
        ("pool", "a/b"),
        ("object_size", "3M"),
        ("object_size", "1K"),
        ("object_size", "64M"),
        ("share", "maybe"),
        ("container_layers", "tmpfs"),
    ],
)
def test_bad_option(key: str, value: str) -> None:
    """
    An invalid option value is a configuration error naming the key.
    """
    with pytest.raises(ConfigurationError, match=f"txgraph.rbd.{key}"):
        parse_options(RBDBackend, {key: value})


def test_unknown_option() -> None:
    """
    An unknown key is refused, naming it and the known ones.
    """
    with pytest.raises(ConfigurationError, match="txgraph.rbd.poool.*known: .*pool"):
        parse_options(RBDBackend, {"poool": "rbd"})


def test_without_bindings(tmp_path: Path) -> None:
    """
    Without Ceph's Python bindings the module still imports (the overlay
    backend is unaffected) and start() says what to install.
    """
    script = f"""
import sys
sys.modules["rados"] = None
sys.modules["rbd"] = None
from txgraph.backends.catalog import backend_class
from txgraph.errors import BackendError
cls = backend_class("rbd")
backend_class("overlay")
try:
    cls({str(tmp_path)!r}, {{}}).start()
except BackendError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[2]),
        check=True,
    ).stdout
    assert "python3-rados" in out and "python3-rbd" in out


def test_pool_missing(ceph: Ceph, tmp_path: Path) -> None:
    """
    A pool that does not exist: a clear error naming it, the conf and the
    client, at once.
    """
    backend = RBDBackend(
        str(tmp_path), ceph.options(ceph.namespace(), pool="nosuchpool")
    )
    began = time.monotonic()
    with pytest.raises(BackendError, match="pool nosuchpool does not exist") as info:
        backend.start()
    assert ceph.cluster.conf in info.value.message and "client.txgraph" in info.value.message
    assert time.monotonic() - began < 10


def test_data_pool_missing(ceph: Ceph, tmp_path: Path) -> None:
    """
    A data pool that does not exist is an error naming it.
    """
    backend = RBDBackend(str(tmp_path), ceph.options(ceph.namespace(), data_pool="nosuchdata"))
    with pytest.raises(BackendError, match="data pool nosuchdata does not exist"):
        backend.start()


def test_namespace_missing(ceph: Ceph, tmp_path: Path) -> None:
    """
    A namespace that does not exist is an error saying how to create it.
    """
    backend = RBDBackend(str(tmp_path), ceph.options("nosuchns"))
    with pytest.raises(BackendError, match="namespace nosuchns does not exist.*rbd namespace create"):
        backend.start()


def test_wrong_keyring(ceph: Ceph, tmp_path: Path) -> None:
    """
    A keyring with the wrong key: permission denied, naming the client.
    """
    keyring = tmp_path / "wrong.keyring"
    keyring.write_text("[client.txgraph]\n\tkey = AQBu7YdkAAAAABAAdGhpc2lzbm90dGhla2V5MTIzNA==\n")
    backend = RBDBackend(
        str(tmp_path / "state"), ceph.options(ceph.namespace(), keyring=str(keyring))
    )
    began = time.monotonic()
    with pytest.raises(BackendError, match="client.txgraph") as info:
        backend.start()
    assert "permission denied" in info.value.message or "refused" in info.value.message
    assert str(keyring) in info.value.message
    assert time.monotonic() - began < 25


def test_mapper_unavailable(ceph: Ceph, tmp_path: Path) -> None:
    """
    Asking for a mapper this host cannot offer fails at start, saying why.
    """
    if os.path.isdir("/sys/bus/rbd"):
        pytest.skip("this host has kernel rbd")
    backend = ceph.backend(str(tmp_path), mapper="krbd")
    with pytest.raises(BackendError, match="mapper krbd is not available here: .*rbd module"):
        backend.start()
    assert backend.cluster.handle is None


def test_auto_mapper_is_fuse_here(started: Started) -> None:
    """
    On a host without kernel rbd and nbd, auto picks rbd-fuse, and Status
    says so (and why the others are out).
    """
    backend = started.backend
    status = dict(backend.status())
    if os.path.isdir("/sys/bus/rbd"):
        pytest.skip("this host has kernel rbd")
    assert status["Mapper"] == "fuse"
    assert "krbd" in status["Unavailable Mappers"]


def test_cluster_down(ceph: Ceph, tmp_path: Path) -> None:
    """
    A cluster that goes down mid-run makes calls fail within the timeout
    (not hang), and the metrics count the operation as timed out (librados's
    real error, as the daemon sees it); a cluster that is down at start is
    a clear error naming the conf and client, within the timeout.
    """
    cluster = DevCluster(tmp_path / "c")
    cluster.up()
    try:
        saved = tmp_path / "saved"
        saved.mkdir()
        conf = str(shutil.copy(cluster.conf, saved / "ceph.conf"))
        keyring = str(shutil.copy(cluster.client_keyring, saved / "client.keyring"))
        values = {
            "conf": conf,
            "client": "txgraph",
            "keyring": keyring,
            "pool": cluster.pool,
            "base_size": "64M",
            "node_id": "down",
            "timeout": "3",
        }
        backend = RBDBackend(str(tmp_path / "state"), parse_options(RBDBackend, values))
        backend.start()
        layers = Layers(backend)
        layers.create(readwrite=False)  # nothing mapped when the cluster goes
        cluster.down()
        began = time.monotonic()
        recorder = metrics.enable()
        try:
            with pytest.raises(BackendError, match="rbd prepare of layer") as failed:
                layers.create()
            timeouts = {
                s.labels["op"]: s.value
                for f in text_string_to_metric_families(recorder.render().decode())
                for s in f.samples if s.name == "txgraph_cluster_timeouts_total"
            }
        finally:
            metrics.disable()
        assert time.monotonic() - began < 30
        assert "timeout" in failed.value.message.lower()
        assert timeouts.get("prepare") == 1, timeouts
        backend.stop()
        again = RBDBackend(str(tmp_path / "state"), parse_options(RBDBackend, values))
        began = time.monotonic()
        with pytest.raises(BackendError, match="no answer from the Ceph cluster") as info:
            again.start()
        assert conf in info.value.message and "client.txgraph" in info.value.message
        assert time.monotonic() - began < 15
    finally:
        cluster.down()


def test_image_name_taken(started: Started, ceph: Ceph) -> None:
    """
    An image that already has a layer's name but is not this node's is an
    error, and is left untouched by prepare and remove.
    """
    backend, namespace = started.backend, started.namespace
    layer = LayerInfo(id=new_id(), parent=None)
    name = backend.image_name(layer.id)
    ioctx = ceph.io(namespace)
    try:
        ceph.rbd.RBD().create(ioctx, name, 64 * MiB)
        with ceph.rbd.Image(ioctx, name) as img:
            img.metadata_set("mine", "yes")
    finally:
        ioctx.close()
    with pytest.raises(BackendError, match="already exists and is not a txgraph layer") as info:
        backend.prepare(layer)
    assert layer.id in info.value.message and name in info.value.message
    backend.remove(layer)
    assert not backend.exists(layer)
    assert name in ceph.images(namespace)
    assert ceph.meta(namespace, name) == {"mine": "yes"}
    assert layer.id not in backend.list_layers()
    ioctx = ceph.io(namespace)
    try:
        ceph.rbd.RBD().remove(ioctx, name)
    finally:
        ioctx.close()


def _assert_clean_namespace(ceph: Ceph, namespace: str, keep: set[str]) -> None:
    images = set(ceph.images(namespace))
    assert images == keep | {i for i in images if i.endswith(".base")}


def test_failed_prepare_leaves_nothing(started: Started, ceph: Ceph) -> None:
    """
    A prepare that fails (bad size, size below the parent's, parent not
    committed) leaves no image, snapshot, mapping or mount.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    parent = layers.create(readwrite=False)  # an image layer: not mapped
    for opt, error in (
        ({"size": "lots"}, "invalid storage option size='lots'"),
        ({"size": "64M"}, "smaller than the layer's parent"),
        ({"quota": "1G"}, "quota are not supported"),
    ):
        layer = LayerInfo(id=new_id(), parent=None, readwrite=True, storage_opt=opt)
        with pytest.raises(ConfigurationError, match=error) as info:
            backend.prepare(layer)
        assert layer.id in info.value.message
        backend.remove(layer)
    orphan = LayerInfo(id=new_id(), parent=parent)
    with pytest.raises(BackendError, match="is not committed"):
        backend.prepare(orphan)
    assert host_leftovers(backend.state_dir) == []
    backend.remove(orphan)
    _assert_clean_namespace(ceph, namespace, {backend.image_name(parent)})
    assert ceph.snaps(namespace, backend.image_name(parent)) == []
    assert host_leftovers(backend.state_dir) == []


def test_failed_apply_leaves_nothing(started: Started, ceph: Ceph) -> None:
    """
    A malformed tar fails with an error naming the layer; the layer is
    empty (a fresh clone) again, with no snapshot, mapping or mount left.
    Applying to a layer others were made from is refused.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    base = layers.create()
    layers.write(base, {"inherited": b"x"})
    layer = layers.create(base, readwrite=False)
    good = io.BytesIO(files_tar({"half": b"y" * 3000}))
    truncated = io.BytesIO(good.getvalue()[:1024])
    with pytest.raises(ArchiveError, match=f"rbd apply of layer {layer}"):
        backend.apply(layers.infos[layer], truncated, IDENTITY)
    assert host_leftovers(backend.state_dir) == []
    name = backend.image_name(layer)
    assert ceph.snaps(namespace, name) == []
    assert ceph.meta(namespace, name)[K_STATE] == "clean"
    root = layers.get(layer)
    assert sorted(os.listdir(root)) == ["inherited"]
    layers.put(layer)
    # A committed layer with children cannot be re-applied.
    layers.create(layer, readwrite=False)
    with pytest.raises(BackendError, match="layers were made from"):
        backend.apply(layers.infos[layer], io.BytesIO(files_tar({"f": b"z"})), IDENTITY)
    assert ceph.snaps(namespace, name) == [SNAP]
    assert host_leftovers(backend.state_dir) == []


def test_apply_to_committed_layer(started: Started, ceph: Ceph) -> None:
    """
    ApplyDiff again on a committed layer without children undoes the
    commit and replaces the content.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    layer = layers.create(readwrite=False)
    assert backend.apply(layers.infos[layer], io.BytesIO(files_tar({"one": b"1"})), IDENTITY) == 1
    backend.commit(layers.infos[layer])
    assert backend.apply(layers.infos[layer], io.BytesIO(files_tar({"two": b"22"})), IDENTITY) == 2
    assert ceph.snaps(namespace, backend.image_name(layer)) == []
    assert sorted(os.listdir(layers.get(layer))) == ["two"]
    layers.put(layer)


def _sectors_written(device: str) -> int:
    """
    The 512-byte sectors a block device has written since it was attached.
    """
    with open(f"/sys/block/{os.path.basename(device)}/stat") as f:
        return int(f.read().split()[6])


def test_extraction_is_written_back_as_it_goes(started: Started) -> None:
    """
    An ApplyDiff's data reaches the cluster while the extraction runs, not
    only at its unmount: halfway through the tar, the device it extracts
    into has written most of the files extracted so far.  (The kernel alone
    would keep them in the page cache: it writes back after 30 s, or when
    gigabytes are dirty.)
    """
    backend, layers = started.backend, started.layers
    files = {f"f{i:02}": os.urandom(1 << 20) for i in range(32)}
    body = files_tar(files)
    # Loop devices count from their creation, not from their attach.
    baseline: dict[str, int] = {}
    written: list[int] = []

    class Watching(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            devices = [e.source for e in mounts.mount_table()
                       if e.mountpoint.startswith(backend.names.work + os.sep)]
            if devices and not baseline:
                baseline[devices[0]] = _sectors_written(devices[0])
            if baseline and not written and self.tell() > len(body) // 2:
                assert devices == list(baseline), devices
                deadline = time.monotonic() + 10
                while (_sectors_written(devices[0]) - baseline[devices[0]]) * 512 < 12 << 20:
                    assert time.monotonic() < deadline, "nothing written back in 10 s"
                    time.sleep(0.01)
                written.append(1)
            return super().read(n)

    layer = layers.create(readwrite=False)
    assert backend.apply(layers.infos[layer], Watching(body), IDENTITY) > 0
    assert written, "the extraction never got halfway"
    backend.commit(layers.infos[layer])
    root = layers.get(layer)
    assert _read(root, "f31") == files["f31"]
    layers.put(layer)


def test_size_option_grows_the_layer(started: Started) -> None:
    """
    CreateReadWrite's size storage option grows the clone and its
    filesystem; the parent's files are still there.
    """
    backend, layers = started.backend, started.layers
    base = layers.create()
    layers.write(base, {"kept": b"k"})
    backend.commit(layers.infos[base])
    big = LayerInfo(id=new_id(), parent=base, readwrite=True, storage_opt={"size": "512M"})
    layers.prepare(big)
    root = layers.get(big.id)
    st = os.statvfs(root)
    assert st.f_blocks * st.f_frsize > 400 * MiB
    assert _read(root, "kept") == b"k"
    layers.put(big.id)
    small = os.statvfs(layers.get(base))
    assert small.f_blocks * small.f_frsize < 300 * MiB
    layers.put(base)


def test_read_write_layer_is_mapped_as_it_is_made(
    started: Started, ceph: Ceph, tmp_path: Path
) -> None:
    """
    With unmap_delay (default 5 s), prepare of a read-write layer maps it
    too and returns the live read-write mapping, which mounts with its
    parent's tree without a second map.  An image layer is not mapped,
    nor is any layer with unmap_delay=0.
    """
    backend, layers = started.backend, started.layers
    assert backend.devices.mapper is not None
    base = layers.create(readwrite=False)
    assert layers.infos[base].mapping is None
    layers.write(base, {"from-base": b"b"})
    child = layers.create(base)
    mapping = layers.infos[child].mapping
    assert mapping is not None and mapping["readonly"] is False
    assert backend.devices.mapper.alive(mapping)
    root = layers.get(child)
    assert layers.infos[child].mapping == mapping
    assert _read(root, "from-base") == b"b"
    layers.put(child)
    assert not backend.devices.mapper.alive(mapping)
    zero = ceph.backend(str(tmp_path / "zero"), started.namespace, node_id="node-z",
                        unmap_delay="0")
    zero.start()
    try:
        assert zero.unmap_delay == 0
        plain = LayerInfo(id=new_id(), parent=None, readwrite=True)
        assert zero.prepare(plain) is None
        assert host_leftovers(zero.state_dir) == []
        zero.remove(plain)
    finally:
        zero.stop()


def test_userns_root(started: Started) -> None:
    """
    A layer without a parent is owned by the remapped root (userns-remap).
    """
    layers = started.layers
    layer = LayerInfo(id=new_id(), parent=None, root_ids=(100000, 100000))
    layers.prepare(layer)
    st = os.stat(layers.get(layer.id))
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    layers.put(layer.id)


def test_unmap_finds_mapping_after_crash(started: Started) -> None:
    """
    With no recorded mapping (a crash before it was persisted), unmap and
    remove find the layer's mapping and mount from what exists.
    """
    backend, layers = started.backend, started.layers
    layer = layers.create()
    info = layers.infos[layer]
    mapping = backend.map(info)
    root = backend.mount(replace(info, mapping=mapping), [])
    backend.unmap(info)
    assert not os.path.ismount(os.path.dirname(root))
    assert not os.path.exists(mapping["fuse_dir"]) or not os.listdir(mapping["fuse_dir"])
    backend.map(info)
    backend.remove(info)
    del layers.infos[layer]


def test_mapping_process_found_from_its_record(
    started: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A mapping's rbd-fuse is found from its pid record, with no pass over
    /proc; a record that names another process (a pid used again) is not
    trusted, and the mounted mapping is then found by a pass over /proc.
    The record goes with the mapping.
    """
    from txgraph.backends.rbd.mappers.fuse import FuseMapper

    backend, layers = started.backend, started.layers
    mapper = backend.devices.mapper
    assert isinstance(mapper, FuseMapper)
    layer = layers.create()
    layers.get(layer)
    info = layers.infos[layer]
    assert info.mapping is not None
    record = os.path.join(mapper.pid_root, layer)
    with open(record) as f:
        pid, start = (int(v) for v in f.read().split())
    assert pid == info.mapping["pid"]

    def no_scan() -> dict[str, list[int]]:
        raise AssertionError("a pass over /proc")

    with monkeypatch.context() as m:
        m.setattr(mapper, "_fuse_processes", no_scan)
        assert mapper.alive(info.mapping)
        assert [f["pid"] for f in mapper.find(backend.image_name(layer), layer)] == [pid]
        # Nothing mapped under another tag: no process to look for.
        assert mapper.find(backend.image_name(layer), "other-tag") == []

    scans = []
    real = mapper._fuse_processes

    def counted() -> dict[str, list[int]]:
        scans.append(1)
        return real()

    with open(record, "w") as f:
        f.write(f"{pid} {start + 1}\n")
    with monkeypatch.context() as m:
        m.setattr(mapper, "_fuse_processes", counted)
        assert mapper.alive(info.mapping)
    assert scans
    layers.put(layer)
    assert not os.path.exists(record)


def _wait_dead(pid: int, timeout: float = 10) -> None:
    """
    Wait until a process we killed has exited (a zombie or gone): SIGKILL
    takes effect asynchronously, and PID 1 here reaps late.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exit after SIGKILL")


def test_dead_rbd_fuse(started: Started, ceph: Ceph) -> None:
    """
    After rbd-fuse is killed with -9 under a mounted layer (its exclusive
    lock and watch stay behind), the layer is remounted, and mapped and
    written again at once rather than after the 30 s watch timeout.
    """
    backend, layers = started.backend, started.layers
    layer = layers.create()
    root = layers.get(layer)
    with open(os.path.join(root, "before"), "wb") as f:
        f.write(b"b")
        f.flush()
        os.fsync(f.fileno())
    info = layers.infos[layer]
    assert info.mapping is not None
    os.kill(info.mapping["pid"], signal.SIGKILL)
    _wait_dead(info.mapping["pid"])
    began = time.monotonic()
    again = backend.ensure_mounted(info, [])
    assert again == root
    with open(os.path.join(again, "after"), "wb") as f:
        f.write(b"a")
        f.flush()
        os.fsync(f.fileno())
    assert time.monotonic() - began < 15
    layers.put(layer)
    began = time.monotonic()
    root = layers.get(layer)
    assert sorted(os.listdir(root)) == ["after", "before"]
    layers.put(layer)
    assert time.monotonic() - began < 15


def test_dead_reader_is_no_obstacle_to_removal(started: Started) -> None:
    """
    A committed layer is mapped read-only; its rbd-fuse killed with -9
    leaves a stale watch, which would make removing the image fail for
    30 s: remove blocklists the dead client and succeeds at once.
    """
    backend, layers = started.backend, started.layers
    layer = layers.create()
    layers.write(layer, {"f": b"x"})
    backend.commit(layers.infos[layer])
    layers.get(layer)
    info = layers.infos.pop(layer)
    layers.mounted.discard(layer)
    assert info.mapping is not None and info.mapping["readonly"]
    os.kill(info.mapping["pid"], signal.SIGKILL)
    _wait_dead(info.mapping["pid"])
    began = time.monotonic()
    backend.remove(info)
    assert not backend.exists(info)
    assert backend.settle_trash() == []
    assert time.monotonic() - began < 15


def test_restart_keeps_base(started: Started, ceph: Ceph, tmp_path: Path) -> None:
    """
    A second start of the same node finds its formatted base and does not
    format it again: existing layers keep their content.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    layer = layers.create()
    layers.write(layer, {"f": b"data"})
    base = backend.names.base_image
    snaps_before = ceph.snaps(namespace, base)
    second = RBDBackend(str(tmp_path / "state2"), dict(backend.config))
    second.start()
    try:
        assert ceph.snaps(namespace, base) == snaps_before
        view = Layers(second)
        view.infos[layer] = layers.infos[layer]
        assert _read(view.get(layer), "f") == b"data"
        view.put(layer)
    finally:
        second.stop()


def test_restart_with_mounted_layer(started: Started) -> None:
    """
    After a txgraph restart (a new backend on the same state directory,
    the old one never unmounting), a layer recorded as mounted is found
    mounted and mapped as it was, and can be put away as usual.
    """
    backend, layers = started.backend, started.layers
    layer = layers.create()
    root = layers.get(layer)
    with open(os.path.join(root, "f"), "wb") as f:
        f.write(b"kept")
    info = layers.infos[layer]
    backend.stop()
    again = RBDBackend(backend.state_dir, dict(backend.config))
    again.start()
    try:
        assert again.ensure_mounted(info, []) == root
        assert _read(root, "f") == b"kept"
        # The same mapping (device and rbd-fuse process) is still in use.
        assert info.mapping is not None
        assert [m["device"] for m in again.devices.mappings(again.image_name(layer), layer)] == [
            info.mapping["device"]
        ]
        again.unmount(info)
        again.unmap(info)
        layers.mounted.discard(layer)
        assert host_leftovers(backend.state_dir) == []
    finally:
        layers.backend = again
        started.backend = again


def test_diff_of_mounted_layer(started: Started) -> None:
    """
    Changes and DiffSize of a layer that is mounted (a running container)
    read it through its mount.
    """
    backend, layers = started.backend, started.layers
    base = layers.create()
    layers.write(base, {"a": b"a"})
    child = layers.create(base)
    root = layers.get(child)
    with open(os.path.join(root, "new"), "wb") as f:
        f.write(b"12345")
    info = layers.infos[child]
    changes = backend.changes(info, layers.chain(child), base)
    assert [(c.path, c.kind) for c in changes] == [("/new", ChangeKind.ADD)]
    assert backend.diff_size(info, layers.chain(child), base) == 5
    layers.put(child)


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="xfsprogs is not installed")
def test_xfs(ceph: Ceph, tmp_path: Path) -> None:
    """
    With fs=xfs, parent and child (same filesystem UUID) mount together,
    and diffs work.
    """
    backend = ceph.backend(str(tmp_path), fs="xfs", base_size="320M")
    backend.start()
    layers = Layers(backend)
    try:
        base = layers.create()
        layers.write(base, {"a": b"a"})
        child = layers.create(base)
        layers.write(child, {"b": b"bb"})
        parent_root = layers.get(base)
        child_root = layers.get(child)
        assert sorted(os.listdir(child_root)) == ["a", "b"]
        assert os.listdir(parent_root) == ["a"]
        layers.put(base)
        layers.put(child)
        assert backend.diff_size(layers.infos[child], layers.chain(child), base) == 2
    finally:
        layers.cleanup()
        backend.stop()


def test_bad_storage_option_names_key(started: Started) -> None:
    """
    An invalid size is a configuration error naming the option (before
    anything is made).
    """
    backend = started.backend
    layer = LayerInfo(id=new_id(), parent=None, readwrite=True, storage_opt={"size": "-5G"})
    with pytest.raises(ConfigurationError, match="size='-5G'"):
        backend.prepare(layer)
    assert not backend.exists(layer)


def test_backend_class() -> None:
    """
    The rbd backend is found by name.
    """
    assert backend_class("rbd") is RBDBackend


# -- removal through the trash -------------------------------------------------------


def test_removed_images_are_purged_children_first(started: Started, ceph: Ceph) -> None:
    """
    Remove moves a layer's image to the RBD trash and answers; the
    background purge deletes it.  A parent removed while its child's image
    still waits in the trash (dockerd removes a container's layer, then
    its -init layer, at once) is purged after the child.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    init = layers.create()
    layers.write(init, {"etc/hosts": b"h"})
    container = layers.create(init)
    names = {backend.image_name(init), backend.image_name(container)}
    for layer in (container, init):
        backend.remove(layers.infos.pop(layer))
    assert not names & set(ceph.images(namespace))
    assert backend.settle_trash() == []
    assert ceph.trash(namespace) == []
    assert ("Removed Images Not Purged", "0") in backend.status()
    # The name is free at once: the same layer ID can be made again.
    layers.prepare(LayerInfo(id=init, parent=None, readwrite=True))
    assert os.listdir(layers.get(init)) == []
    layers.put(init)


def test_trashed_image_with_a_clone_waits(started: Started, ceph: Ceph) -> None:
    """
    An image whose snapshot a live layer was cloned from (only possible by
    going around the layer store's check) stays in the trash, readable by
    its clone; gc reports it with the reason, and it is purged once the
    clone is removed.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    parent = layers.create()
    layers.write(parent, {"f": b"from the parent"})
    child = layers.create(parent)
    backend.remove(layers.infos[parent])
    left = backend.settle_trash()
    assert [(name, why) for _, name, why in left] == [(
        backend.image_name(parent),
        f"images made from its snapshot remain: {backend.image_name(child)}",
    )]
    assert _read(layers.get(child), "f") == b"from the parent"
    layers.put(child)
    assert ("Removed Images Not Purged", "1") in backend.status()
    trash_id = left[0][0]
    orphans = [o for o in backend.orphans({}) if o.id.startswith("trash.")]
    assert [(o.kind, o.id) for o in orphans] == [("object", f"trash.{trash_id}")]
    assert "made from its snapshot remain" in orphans[0].detail
    with pytest.raises(BackendError, match=f"trash id {trash_id}.*made from its snapshot"):
        backend.repair(orphans[0])
    backend.remove(layers.infos.pop(child))
    del layers.infos[parent]
    assert backend.settle_trash() == []
    assert ceph.trash(namespace) == []
    assert not [o for o in backend.orphans({}) if o.id.startswith("trash.")]


def test_purge_resumes_at_start(started: Started, ceph: Ceph, tmp_path: Path) -> None:
    """
    An image moved to the trash by a node that then stopped (or crashed)
    is purged when the node starts again; an image in the trash that is
    named like this node's but is not its own is left alone.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    layer = layers.create(readwrite=False)  # not mapped: the purge may delete it
    name = backend.image_name(layer)
    impostor = backend.image_name(new_id())
    backend.stop()
    ioctx = ceph.io(namespace)
    try:
        ceph.rbd.RBD().create(ioctx, impostor, 64 * MiB)
        with ceph.rbd.Image(ioctx, impostor) as img:
            img.metadata_set(K_OWNER, "node-b")
        ceph.rbd.RBD().trash_move(ioctx, name, 0)
        ceph.rbd.RBD().trash_move(ioctx, impostor, 0)
    finally:
        ioctx.close()
    assert ceph.trash(namespace) == sorted([name, impostor])
    second = RBDBackend(str(tmp_path / "state"), dict(backend.config))
    second.start()
    try:
        assert second.settle_trash() == []
        assert ceph.trash(namespace) == [impostor]
        assert not [o for o in second.orphans({}) if o.id.startswith("trash.")]
        started.backend = started.layers.backend = second
    finally:
        del layers.infos[layer]
    ioctx = ceph.io(namespace)
    try:
        entry = next(e for e in ceph.rbd.RBD().trash_list(ioctx) if e["name"] == impostor)
        ceph.rbd.RBD().trash_remove(ioctx, entry["id"])
    finally:
        ioctx.close()


def test_child_of_a_shared_layer_is_cloned_from_the_shared_image(
    started: Started, ceph: Ceph, tmp_path: Path
) -> None:
    """
    A layer made on an image layer that is an unchanged clone of a shared
    image is cloned from the shared image itself (one clone level less to
    open), before and after a restart; a layer made on a container's layer
    is cloned from that layer.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    image = layers.create(readwrite=False)
    backend.apply(layers.infos[image], io.BytesIO(files_tar({"f": b"from the image"})), IDENTITY)
    init = layers.create(image)
    layers.write(init, {"etc/hosts": b"h"})
    container = layers.create(init)

    def parent(layer: str) -> str:
        ioctx = ceph.io(namespace)
        try:
            with ceph.rbd.Image(ioctx, backend.image_name(layer), read_only=True) as img:
                return str(img.get_parent_image_spec()["image_name"])
        finally:
            ioctx.close()

    shared = parent(image)
    assert shared.startswith(backend.shared_image(""))
    assert parent(init) == shared
    assert ceph.meta(namespace, backend.image_name(init))["txgraph.depth"] == ceph.meta(
        namespace, backend.image_name(image)
    )["txgraph.depth"]
    assert parent(container) == backend.image_name(init)
    root = layers.get(container)
    assert (_read(root, "f"), _read(root, "etc/hosts")) == (b"from the image", b"h")
    layers.put(container)
    second = RBDBackend(str(tmp_path / "state"), dict(backend.config))
    backend.stop()
    second.start()
    started.backend = started.layers.backend = second
    again = layers.create(image)
    assert parent(again) == shared


# -- handles opened ahead of the commit (issue 18) ----------------------------------


def _watchers(ceph: Ceph, namespace: str, image: str) -> list[str]:
    """
    The addresses of the clients watching an image (read-only opens, as
    this one, watch nothing).
    """
    ioctx = ceph.io(namespace)
    try:
        with ceph.rbd.Image(ioctx, image, read_only=True) as img:
            return sorted(w["addr"] for w in img.watchers_list())
    finally:
        ioctx.close()


def _lockers(ceph: Ceph, namespace: str, image: str) -> list[str]:
    """
    The addresses of the clients holding an image's exclusive lock.
    """
    ioctx = ceph.io(namespace)
    try:
        with ceph.rbd.Image(ioctx, image, read_only=True) as img:
            return [entry[2] for entry in (img.list_lockers() or {}).get("lockers", [])]
    finally:
        ioctx.close()


def test_commit_through_a_handle_opened_ahead(started: Started, ceph: Ceph) -> None:
    """
    A layer expected to be committed gets its image opened read-write as
    it is made (while rbd-fuse maps it); that idle handle neither holds
    the exclusive lock nor slows rbd-fuse's writes, and the commit
    snapshots through it: the snapshot holds every write made through the
    mapping after the handle was opened, as a clone of it shows; the
    handle is closed after the commit (no watcher, no lock left).
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    handles = backend.cluster.handles
    own = client_nonce(backend.cluster.handle.get_addrs())
    base = layers.create(readwrite=False)
    layers.write(base, {"base": b"from the base"})
    layers.commit(base)
    taken = handles.taken
    info = LayerInfo(id=new_id(), parent=base, readwrite=True, commit_expected=True)
    layers.prepare(info)
    name = backend.image_name(info.id)
    assert handles.held() == [name] and handles.ready(name, 20)
    assert len(_watchers(ceph, namespace, name)) == 2  # rbd-fuse and the handle
    big = os.urandom(3 * MiB + 12345)
    began = time.monotonic()
    root = layers.get(info.id)
    with open(os.path.join(root, "big"), "wb") as f:
        f.write(big)
        f.flush()
        os.fsync(f.fileno())
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc", "hosts"), "wb") as f:
        f.write(b"written while the handle was held")
    os.unlink(os.path.join(root, "base"))
    assert time.monotonic() - began < 15
    # rbd-fuse wrote, so it holds the lock; the idle handle does not.
    lockers = _lockers(ceph, namespace, name)
    assert len(lockers) == 1 and client_nonce(lockers[0]) != own
    layers.put(info.id)
    assert handles.held() == [name]
    layers.commit(info.id)
    assert handles.taken == taken + 1 and handles.held() == []
    assert _watchers(ceph, namespace, name) == [] and _lockers(ceph, namespace, name) == []
    assert ceph.snaps(namespace, name) == [SNAP]
    child = layers.create(info.id)
    root = layers.get(child)
    assert sorted(os.listdir(root)) == ["big", "etc"]
    assert _read(root, "big") == big
    assert _read(root, "etc/hosts") == b"written while the handle was held"
    layers.put(child)


def test_image_layer_commits_through_its_handle(started: Started, ceph: Ceph) -> None:
    """
    An image layer (not mapped at Create) gets its handle once it is
    mapped read-write, by a Get (moby's chain of layers written through
    their mounts), and the commit takes it.  With shared layers (the
    default), ApplyDiff extracts into a candidate image, whose snapshot
    takes the handle opened while the tar was extracted.  A layer without
    the hint gets none.
    """
    backend, layers = started.backend, started.layers
    handles = backend.cluster.handles
    parent = None
    contents = []
    for i in range(2):
        info = LayerInfo(id=new_id(), parent=parent, commit_expected=True)
        layers.prepare(info)
        assert handles.held() == []
        taken = handles.taken
        assert backend.apply(info, io.BytesIO(files_tar({f"f{i}": b"%d" % i})), IDENTITY) == 1
        assert handles.taken == taken + 1 and handles.held() == []
        layers.commit(info.id)
        contents.append(f"f{i}")
        parent = info.id
    written = LayerInfo(id=new_id(), parent=parent, commit_expected=True)
    layers.prepare(written)
    assert handles.held() == []
    root = layers.get(written.id)
    assert handles.held() == [backend.image_name(written.id)]
    with open(os.path.join(root, "f2"), "wb") as f:
        f.write(b"2")
    layers.put(written.id)
    taken = handles.taken
    layers.commit(written.id)
    assert handles.taken == taken + 1
    plain = layers.create(written.id)
    layers.get(plain)
    assert handles.held() == []
    layers.put(plain)
    top = layers.create(plain)
    root = layers.get(top)
    assert sorted(os.listdir(root)) == [*contents, "f2"]
    layers.put(top)


def test_flatten_through_a_held_handle(ceph: Ceph, tmp_path: Path) -> None:
    """
    Without shared layers, an ApplyDiff's layer gets its handle while its
    tar is extracted, a read-write layer as it is mapped; at
    flatten_depth, the commit flattens and snapshots through the handle,
    and the flat layer keeps its ancestors' data.
    """
    namespace = ceph.namespace()
    backend = ceph.backend(str(tmp_path / "state"), namespace, flatten_depth="2", share="no")
    backend.start()
    layers = Layers(backend)
    try:
        parent = None
        for i in range(3):
            info = LayerInfo(
                id=new_id(), parent=parent, readwrite=i % 2 == 1, commit_expected=True
            )
            layers.prepare(info)
            if info.readwrite:
                layers.write(info.id, {f"f{i}": b"%d" % i})
            else:
                tar = io.BytesIO(files_tar({f"f{i}": b"%d" % i}))
                assert backend.apply(layers.infos[info.id], tar, IDENTITY) == 1
            assert backend.cluster.handles.held() == [backend.image_name(info.id)]
            taken = backend.cluster.handles.taken
            layers.commit(info.id)
            assert backend.cluster.handles.taken == taken + 1
            parent = info.id
        # The second layer (depth 2) was flattened, the third cloned from it.
        flat = backend.image_name(layers.infos[parent].parent or "")
        assert ceph.meta(namespace, flat)["txgraph.depth"] == "0"
        assert ceph.meta(namespace, backend.image_name(parent))["txgraph.depth"] == "1"
        top = layers.create(parent)
        root = layers.get(top)
        assert sorted(os.listdir(root)) == ["f0", "f1", "f2"]
        layers.put(top)
    finally:
        layers.cleanup()
        backend.stop()


def test_held_handles_are_closed(started: Started, ceph: Ceph, tmp_path: Path) -> None:
    """
    A handle held ahead of a commit that does not come is closed: before
    its image goes to the trash (which the purge then empties: no watcher
    holds it), after the idle limit, and at the backend's stop.  Layers
    without the hint get none.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    handles = backend.cluster.handles
    plain = layers.create()
    assert handles.held() == []
    removed = LayerInfo(id=new_id(), parent=None, readwrite=True, commit_expected=True)
    layers.prepare(removed)
    name = backend.image_name(removed.id)
    assert handles.ready(name, 20) and len(_watchers(ceph, namespace, name)) == 2
    backend.remove(layers.infos.pop(removed.id))
    assert handles.held() == []
    assert backend.settle_trash() == [] and ceph.trash(namespace) == []
    handles.idle = 0.2
    idle = LayerInfo(id=new_id(), parent=None, readwrite=True, commit_expected=True)
    layers.prepare(idle)
    name = backend.image_name(idle.id)
    assert handles.ready(name, 20)
    deadline = time.monotonic() + 10
    while handles.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handles.held() == [] and len(_watchers(ceph, namespace, name)) == 1  # rbd-fuse's
    handles.idle = 60.0
    kept = LayerInfo(id=new_id(), parent=plain, readwrite=True, commit_expected=True)
    layers.commit(plain)
    layers.prepare(kept)
    name = backend.image_name(kept.id)
    assert handles.ready(name, 20) and len(_watchers(ceph, namespace, name)) == 2
    second = RBDBackend(str(tmp_path / "state"), dict(backend.config))
    backend.stop()
    assert handles.held() == [] and len(_watchers(ceph, namespace, name)) == 1  # rbd-fuse's
    second.start()
    started.backend = started.layers.backend = second
    # Committed without a handle after the restart.
    layers.commit(kept.id)
    assert second.cluster.handles.taken == 0


def test_handle_of_a_killed_txgraph_does_not_hold_the_commit(
    started: Started, ceph: Ceph, tmp_path: Path
) -> None:
    """
    A txgraph killed while it held a handle ahead of a commit leaves that
    handle's watch on the image for about 30 s, and a snapshot waits for
    every watcher: the first commit after the restart drops the dead
    client's watch (blocklisting it) before snapshotting, so it does not
    wait.
    """
    backend, namespace, layers = started.backend, started.namespace, started.layers
    layer = layers.create()
    layers.write(layer, {"f": b"f"})
    name = backend.image_name(layer)
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import rados, rbd, sys, time\n"
            f"c = rados.Rados(conffile={ceph.cluster.conf!r}, rados_id={DevCluster.client_id!r},"
            f" conf={{'keyring': {ceph.cluster.client_keyring!r}}})\n"
            "c.connect(timeout=30)\n"
            f"io = c.open_ioctx({ceph.cluster.pool!r}); io.set_namespace({namespace!r})\n"
            f"image = rbd.Image(io, {name!r})\n"
            "print('open', flush=True)\n"
            "time.sleep(600)\n"
        )],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert len(_watchers(ceph, namespace, name)) == 1
    finally:
        holder.kill()
        holder.wait()
    second = RBDBackend(str(tmp_path / "state"), dict(backend.config))
    backend.stop()
    second.start()
    started.backend = started.layers.backend = second
    began = time.monotonic()
    layers.commit(layer)
    assert time.monotonic() - began < 15
    assert ceph.snaps(namespace, name) == [SNAP] and _watchers(ceph, namespace, name) == []


# -- containers' layers on local storage (container_layers=local) ------------------


@pytest.fixture
def local(ceph: Ceph, tmp_path: Path) -> Iterator[Started]:
    """
    A started backend that keeps containers' layers locally, unmapping
    unused lowers after 1 s; everything it made is removed afterwards.
    """
    namespace = ceph.namespace()
    backend = ceph.backend(str(tmp_path / "state"), namespace, container_layers="local", unmap_delay="1")
    backend.start()
    env = Started(backend, namespace, Layers(backend, containers=True))
    try:
        yield env
    finally:
        env.layers.cleanup()
        env.backend.stop()


def _lowers_mounted(backend: RBDBackend) -> list[str]:
    return mounts.mounted_under(backend.lowers.root)


def _lower_gone(backend: RBDBackend) -> bool:
    """
    Whether no lower is mounted or mapped any more: the sweep unmounts
    first, then waits for the rbd-fuse process to exit.
    """
    return _lowers_mounted(backend) == [] and host_leftovers(backend.state_dir) == []


def _wait_until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_container_layers_are_local(local: Started, ceph: Ceph) -> None:
    """
    With container_layers=local, a container's layer and its -init layer
    are overlayfs directories (no RBD image of theirs), over the image
    layer's device mapped read-only once, while a layer is mounted over it
    and unmap_delay seconds more; image layers stay RBD clones.  Changes,
    Diff and DiffSize read them against their parent, and their Diff
    applied to a new image layer in the pool reproduces the container's
    tree.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"etc/keep": b"kept", "etc/gone": b"gone", "bin/tool": b"t" * 1000})
    init = layers.create(image)
    container = layers.create(init)
    images = ceph.images(local.namespace)
    assert backend.image_name(image) in images
    assert backend.image_name(init) not in images and backend.image_name(container) not in images
    assert backend.local.is_local(init) and backend.local.is_local(container)
    assert backend.local.base_of(init) == image == backend.local.base_of(container)
    assert _lowers_mounted(backend) == []
    root = layers.get(container)
    assert _read(root, "etc/keep") == b"kept"
    with open(os.path.join(root, "new"), "wb") as f:
        f.write(b"12345")
    os.unlink(os.path.join(root, "etc/gone"))
    # One lower for the image, however many containers use it.
    other = layers.create(layers.create(image))
    assert _read(layers.get(other), "bin/tool") == b"t" * 1000
    assert _lowers_mounted(backend) == [backend.lowers.point(image)]
    assert backend.metadata(layers.infos[container], layers.chain(container))["LowerDir"].split(":") == [
        backend.local.diff_dir(init), backend.lowers.path(image)
    ]
    layers.put(other)
    layers.put(container)
    info = layers.infos[container]
    changes = backend.changes(info, layers.chain(container), init)
    assert sorted((c.path, c.kind) for c in changes) == sorted(
        [("/new", ChangeKind.ADD), ("/etc", ChangeKind.MODIFY), ("/etc/gone", ChangeKind.DELETE)]
    )
    assert backend.diff_size(info, layers.chain(container), init) == 5
    out = io.BytesIO()
    backend.diff(info, layers.chain(container), init, out, IDENTITY)
    copy = layers.create(image, readwrite=False)
    out.seek(0)
    backend.apply(layers.infos[copy], out, IDENTITY)
    layers.commit(copy)
    assert backend.image_name(copy) in ceph.images(local.namespace)
    tree = layers.get(copy)
    assert sorted(os.listdir(os.path.join(tree, "etc"))) == ["keep"]
    assert _read(tree, "new") == b"12345"
    layers.put(copy)
    # Unused for unmap_delay: unmounted and unmapped.
    _wait_until(lambda: _lower_gone(backend), "the unused lower stayed mounted or mapped")
    assert host_leftovers(backend.state_dir) == []


def test_local_layer_survives_a_restart(local: Started) -> None:
    """
    A txgraph restart (a new backend on the same state directory, the old
    one stopped with a container's layer mounted) keeps the layer and its
    lower mounted; the new backend's recovery takes the lower again, which
    stays while the layer is mounted and goes after its last Put.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"f": b"image"})
    container = layers.create(image)
    root = layers.get(container)
    with open(os.path.join(root, "g"), "wb") as f:
        f.write(b"written")
    info = layers.infos[container]
    backend.stop()
    assert _lowers_mounted(backend) == [backend.lowers.point(image)]
    again = RBDBackend(backend.state_dir, dict(backend.config))
    again.start()
    layers.backend = local.backend = again
    assert again.ensure_mounted(info, layers.chain(container)) == root
    time.sleep(1.5)  # past unmap_delay: held, so not swept
    assert _read(root, "f") == b"image" and _read(root, "g") == b"written"
    layers.put(container)
    _wait_until(lambda: _lower_gone(again), "the lower stayed after the last Put")


def test_lower_left_by_a_crash_is_swept_or_repaired(local: Started, ceph: Ceph) -> None:
    """
    A lower a killed txgraph left mounted with nothing over it is swept
    unmap_delay after the next start, and gc lists it meanwhile (and
    repairs it); a lower mapping left without its mount (killed between
    the two) is unmapped at start.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"f": b"image"})
    other = layers.create()
    layers.commit(other)
    backend.lowers.acquire(image)  # and never released: the process "dies"
    key = backend.names.key(other)
    os.makedirs(backend.lowers.point(other))
    assert backend.devices.mapper is not None
    backend.devices.mapper.map(backend.image_name(other), readonly=True, tag=f"lower.{key}")
    again = ceph.backend(backend.state_dir, local.namespace, container_layers="local", unmap_delay="30")
    again.start()
    layers.backend = local.backend = again
    try:
        assert _lowers_mounted(again) == [again.lowers.point(image)]
        assert not os.path.exists(again.lowers.point(other))
        assert again.devices.mappings(again.image_name(other)) == []
        views = {i: LayerView(i, "created", None, None) for i in (image, other)}
        (orphan,) = [o for o in again.orphans(views) if o.id.startswith(again.lowers.root)]
        assert orphan.id == again.lowers.point(image)
        again.repair(orphan)
        assert _lowers_mounted(again) == []
        assert [o for o in again.orphans(views) if o.id.startswith(again.lowers.root)] == []
    finally:
        backend.lowers.users.clear()


def _kill_lower(backend: RBDBackend, image: str) -> None:
    """
    SIGKILL the rbd-fuse of the image's lower, as the OOM killer would,
    and wait until it is gone (its device and mount stay, dead).
    """
    assert backend.devices.mapper is not None
    (mapping,) = backend.devices.mapper.find(
        backend.image_name(image), f"lower.{backend.names.key(image)}"
    )
    assert mapping["alive"] and mapping["pid"]
    os.kill(mapping["pid"], signal.SIGKILL)
    _wait_until(
        lambda: not any(
            m["alive"] for m in backend.devices.mapper.find(  # type: ignore[union-attr]
                backend.image_name(image), f"lower.{backend.names.key(image)}")
        ),
        "the killed rbd-fuse still looks alive",
    )


def test_dead_lower_is_mapped_again_or_refused(local: Started) -> None:
    """
    A lower whose rbd-fuse was killed: while a container's layer is
    mounted over it, a second container of the image is refused with an
    error that says why (and the first one's layer is still put and
    removed); once nothing uses it, the next container maps the image
    again and reads it.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"f": b"image"})
    first, second = layers.create(image), layers.create(image)
    layers.get(first)
    _kill_lower(backend, image)
    with pytest.raises(BackendError, match=r"is dead \(its rbd-fuse exited\) while container layers "
                       r"are mounted over it"):
        layers.get(second)
    layers.put(first)
    # Unused now, and still dead (the sweep has not run yet, or has):
    # mapped again either way.
    assert _read(layers.get(second), "f") == b"image"
    layers.put(second)
    # Killed again while lingering after its last user: mapped again.
    _kill_lower(backend, image)
    assert _read(layers.get(first), "f") == b"image"
    layers.put(first)
    _wait_until(lambda: _lower_gone(backend), "the lower stayed after the last Put")
    assert host_leftovers(backend.state_dir) == []


def test_restart_over_a_dead_lower(local: Started) -> None:
    """
    txgraph restarts while a container's layer is mounted over a lower
    whose rbd-fuse was killed: the layer's recovery takes the lower again
    (no error: the container is broken whatever txgraph says, and its Put
    must work), the Put lets it go, and the next container maps the
    image again.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"f": b"image"})
    container = layers.create(image)
    layers.get(container)
    info = layers.infos[container]
    _kill_lower(backend, image)
    backend.stop()
    again = RBDBackend(backend.state_dir, dict(backend.config))
    again.start()
    layers.backend = local.backend = again
    again.ensure_mounted(info, layers.chain(container))
    assert again.lowers.users == {again.names.key(image): 1}
    layers.put(container)
    other = layers.create(image)
    assert _read(layers.get(other), "f") == b"image"
    layers.put(other)
    _wait_until(lambda: _lower_gone(again), "the lower stayed after the last Put")


def test_image_layer_under_a_lingering_lower_is_removed(local: Started, ceph: Ceph) -> None:
    """
    Removing an image layer whose lower is still mapped (within unmap_delay
    of its last user) unmaps it first; one with a local layer mounted over
    it is refused, naming why.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    container = layers.create(image)
    layers.get(container)
    with pytest.raises(BackendError, match="lower layer of a mounted local container layer"):
        backend.remove(layers.infos[image])
    layers.put(container)
    backend.remove(layers.infos.pop(container))
    assert _lowers_mounted(backend) == [backend.lowers.point(image)]
    backend.remove(layers.infos.pop(image))
    assert _lowers_mounted(backend) == []
    assert backend.image_name(image) not in ceph.images(local.namespace)
    assert host_leftovers(backend.state_dir) == []


def test_local_layers_under_userns_remap(local: Started) -> None:
    """
    Under userns-remap (Backend.allow_traverse with the remapped root's
    gid), the remapped root can reach a local layer's mount: rbd/local/
    and the layer's directory are 0710 root:<gid>, and the layer's root is
    owned by the remapped root.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.commit(image)
    backend.allow_traverse(100000)
    container = new_id()
    layers.prepare(LayerInfo(id=container, parent=image, readwrite=True, container=True,
                             root_ids=(100000, 100000)))
    for path in (backend.local.root, os.path.dirname(backend.local.diff_dir(container))):
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, 100000), path
    st = os.stat(layers.get(container))
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    layers.put(container)


def test_switching_back_to_pool_keeps_local_layers(local: Started, ceph: Ceph) -> None:
    """
    Restarted with container_layers=pool, a backend still serves the local
    layers made before (mounted over their image's lower, removed as local
    layers), and makes new containers' layers as RBD clones again.
    """
    backend, layers = local.backend, local.layers
    image = layers.create()
    layers.write(image, {"f": b"image"})
    layers.commit(image)
    container = layers.create(image)
    backend.stop()
    again = ceph.backend(backend.state_dir, local.namespace, container_layers="pool", unmap_delay="1")
    again.start()
    layers.backend = local.backend = again
    assert again.local.is_local(container) and not again.maps_layer(container)
    assert _read(layers.get(container), "f") == b"image"
    layers.put(container)
    fresh = layers.create(image)
    assert not again.local.is_local(fresh) and again.image_name(fresh) in ceph.images(local.namespace)
    assert _read(layers.get(fresh), "f") == b"image"
    layers.put(fresh)
