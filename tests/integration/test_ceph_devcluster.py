"""Prove the Ceph dev cluster (txgraph/testing/ceph-dev-cluster.sh) the RBD tests stand on.

A real single-node cluster (1 mon + 1 OSD on 127.0.0.1, memstore) is brought up in a
temporary directory, used through librados/librbd and through ``map`` (rbd-fuse +
losetup: this machine has no kernel rbd/nbd), and torn down; ``down`` must leave no
process, mount, loop device or directory behind, even after the OSD was killed under a
mounted filesystem.

Skipped when ceph-mon/ceph-osd are not installed.  With them installed, the Python
bindings must be importable: on Debian, ``.ci/link-ceph-bindings.sh VENV`` links
python3-rados/python3-rbd into the virtualenv.  Block-device tests need root.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

try:
    from txgraph.testing.ceph import SCRIPT, DevCluster, DevClusterError
except ModuleNotFoundError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from txgraph.testing.ceph import SCRIPT, DevCluster, DevClusterError

pytestmark = pytest.mark.skipif(
    not DevCluster.available(), reason="Ceph is not installed (needs ceph-mon and ceph-osd)")

MiB = 1 << 20
GiB = 1 << 30

needs_blockdev = pytest.mark.skipif(
    os.geteuid() != 0
    or not os.path.exists("/dev/fuse")
    or not all(shutil.which(b) for b in ("rbd-fuse", "losetup", "mkfs.ext4", "mount", "umount")),
    reason="map needs root, /dev/fuse, rbd-fuse, losetup and mkfs.ext4")


# ------------------------------------------------------------------------ helpers

def _bindings() -> tuple[ModuleType, ModuleType]:
    try:  # (no type stubs exist for Ceph's Cython modules)
        rados = importlib.import_module("rados")
        rbd = importlib.import_module("rbd")
    except ImportError as e:  # Ceph is installed (else we were skipped): a setup error
        pytest.fail(f"Ceph is installed but the Python bindings are not importable ({e}); "
                    f"run: .ci/link-ceph-bindings.sh {sys.prefix}", pytrace=False)
    return rados, rbd


@contextlib.contextmanager
def _client(cluster: DevCluster, **kwargs: Any) -> Iterator[Any]:
    """A connected rados.Rados for ``cluster``, shut down on exit."""
    rados, _ = _bindings()
    r = rados.Rados(conffile=cluster.conf, **kwargs)
    try:
        r.connect(timeout=30)
        yield r
    finally:
        r.shutdown()


def _name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _sh(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def _live_pids_referencing(path: str) -> list[tuple[int, str]]:
    """Non-zombie processes whose command line mentions ``path`` (zombies are dead:
    PID 1 here reaps late)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if path in cmdline and state not in ("Z", "X"):
            found.append((int(entry), cmdline.replace("\0", " ")))
    return found


def _mountinfo_lines_referencing(*needles: str) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [ln for ln in text.splitlines() if any(n in ln for n in needles)]


def _loop_majmin(dev: str) -> str:
    return Path(f"/sys/class/block/{os.path.basename(dev)}/dev").read_text().strip()


def _loops_referencing(*needles: str) -> list[str]:
    out = _sh("losetup", "-l", "-n", "-O", "NAME,BACK-FILE")
    return [ln for ln in out.splitlines() if any(n in ln for n in needles)]


def _assert_nothing_left(cluster_dir: str, *other_paths: str) -> None:
    needles = (cluster_dir, *other_paths)
    assert not os.path.exists(cluster_dir), f"{cluster_dir} still exists"
    for n in needles:
        assert not _live_pids_referencing(n), f"processes left: {_live_pids_referencing(n)}"
    assert not _mountinfo_lines_referencing(*needles), _mountinfo_lines_referencing(*needles)
    assert not _loops_referencing(*needles), _loops_referencing(*needles)


def _mkfs_mount(dev: str, mountpoint: Path) -> None:
    _sh("mkfs.ext4", "-q", "-F", dev)
    mountpoint.mkdir(parents=True, exist_ok=True)
    _sh("mount", dev, str(mountpoint))


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """One memstore cluster shared by the tests of this module."""
    c = DevCluster(tmp_path_factory.mktemp("ceph"))
    try:
        c.up()
        yield c
    finally:
        c.down()


@pytest.fixture
def ioctx(cluster: DevCluster) -> Iterator[Any]:
    """An admin I/O context on pool rbd."""
    with _client(cluster) as r, r.open_ioctx(cluster.pool) as io:
        yield io


# -------------------------------------------------------------------------- tests

def test_up_exports_everything_in_dir(cluster: DevCluster) -> None:
    """``up`` exports the variables a test needs, and the cluster lives in DIR."""
    d = Path(cluster.dir)
    assert cluster.pool == "rbd"
    assert cluster.conf == str(d / "ceph.conf") and Path(cluster.conf).is_file()
    assert Path(cluster.keyring).is_file() and Path(cluster.client_keyring).is_file()
    assert Path(cluster.keyring).stat().st_mode & 0o077 == 0
    assert cluster.mon_host.startswith("[v2:127.0.0.1:") and ",v1:127.0.0.1:" in cluster.mon_host
    port = int(cluster.mon_host.split(":")[2].split(",")[0])
    assert 20000 <= port <= 29998
    assert cluster.env["CEPH_DEV_DIR"] == str(d)
    uuid.UUID(cluster.fsid)
    for f in ("run/mon.a.pid", "run/osd.0.pid", "run/ceph-mon.a.asok", "run/ceph-osd.0.asok",
              "log/ceph-mon.a.log", "log/ceph-osd.0.log", "mon/ceph-a", "osd/ceph-0"):
        assert (d / f).exists(), f
    assert cluster.status()


def test_librbd_image_snapshot_clone(ioctx: Any) -> None:
    """Create, write, read, snapshot + protect, clone, and CoW through librbd."""
    _, rbd = _bindings()
    parent, child, snap = _name("parent"), _name("child"), "base"
    api = rbd.RBD()
    api.create(ioctx, parent, 64 * MiB)
    data = os.urandom(MiB)
    try:
        with rbd.Image(ioctx, parent) as img:
            assert img.write(data, 4 * MiB) == MiB
            assert img.read(4 * MiB, MiB) == data
            img.create_snap(snap)
            img.protect_snap(snap)
        api.clone(ioctx, parent, snap, ioctx, child)
        try:
            with rbd.Image(ioctx, child) as img:
                assert img.read(4 * MiB, MiB) == data  # the parent's data, through the clone
                img.write(b"x" * 4096, 4 * MiB)
                assert img.read(4 * MiB, 4096) == b"x" * 4096
                assert img.parent_info()[1] == parent
            with rbd.Image(ioctx, parent, snapshot=snap, read_only=True) as img:
                assert img.read(4 * MiB, MiB) == data  # the snapshot is untouched
            assert child in api.list(ioctx)
        finally:
            api.remove(ioctx, child)
        with rbd.Image(ioctx, parent) as img:
            img.unprotect_snap(snap)
            img.remove_snap(snap)
    finally:
        api.remove(ioctx, parent)
    assert parent not in api.list(ioctx)


@needs_blockdev
def test_map_mkfs_mount_and_clone(cluster: DevCluster, ioctx: Any, tmp_path: Path) -> None:
    """map -> mkfs.ext4 -> mount -> write -> umount -> unmap; the data is in RBD, and a
    clone of a snapshot of it mounts as a copy-on-write layer."""
    _, rbd = _bindings()
    image, clone = _name("fs"), _name("layer")
    rbd.RBD().create(ioctx, image, GiB)
    mnt = tmp_path / "mnt"
    try:
        dev = cluster.map(image)
        assert dev.startswith("/dev/loop") and Path(dev).is_block_device()
        assert cluster.map(image) == dev  # idempotent
        _mkfs_mount(dev, mnt)
        (mnt / "hello").write_text("from ext4 on rbd\n")
        _sh("umount", str(mnt))
        cluster.unmap(image)
        assert not _loops_referencing(cluster.dir)
        assert not _mountinfo_lines_referencing(cluster.dir)
        cluster.unmap(image)  # idempotent

        with rbd.Image(ioctx, image) as img:  # ext4 superblock magic, written through FUSE
            assert img.read(1024 + 56, 2) == b"\x53\xef"
            img.create_snap("s")
            img.protect_snap("s")
        rbd.RBD().clone(ioctx, image, "s", ioctx, clone)

        dev = cluster.map(clone)
        mnt.mkdir(exist_ok=True)
        _sh("mount", dev, str(mnt))
        assert (mnt / "hello").read_text() == "from ext4 on rbd\n"
        (mnt / "layer-file").write_text("only in the clone\n")
        _sh("umount", str(mnt))
        cluster.unmap(clone)

        dev = cluster.map(image)  # the parent does not see the clone's file
        _sh("mount", "-o", "ro", dev, str(mnt))
        assert sorted(p.name for p in mnt.iterdir()) == ["hello", "lost+found"]
        _sh("umount", str(mnt))
        cluster.unmap(image)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        for name in (clone, image):
            cluster.unmap(name)
        api = rbd.RBD()
        if clone in api.list(ioctx):
            api.remove(ioctx, clone)
        with rbd.Image(ioctx, image) as img:
            if any(s["name"] == "s" for s in img.list_snaps()):
                img.unprotect_snap("s")
                img.remove_snap("s")
        api.remove(ioctx, image)


def test_up_reuses_a_running_cluster(cluster: DevCluster) -> None:
    """A second ``up`` on the same DIR returns the same cluster and starts nothing."""
    d = Path(cluster.dir)
    pids = {f: (d / "run" / f).read_text().strip() for f in ("mon.a.pid", "osd.0.pid")}
    again = DevCluster(cluster.dir).up()
    assert again.env == cluster.env
    assert {f: (d / "run" / f).read_text().strip() for f in pids} == pids
    assert len(_live_pids_referencing(cluster.dir + "/ceph.conf")) >= 2


def test_restricted_client_can_create_images(cluster: DevCluster) -> None:
    """client.txgraph (profile rbd, pool rbd) can manage images but not the cluster."""
    rados, rbd = _bindings()
    with _client(cluster, rados_id=DevCluster.client_id,
                 conf={"keyring": cluster.client_keyring}) as r:
        with r.open_ioctx(cluster.pool) as io:
            name = _name("restricted")
            rbd.RBD().create(io, name, 16 * MiB)
            with rbd.Image(io, name) as img:
                img.write(b"abc", 0)
                assert img.read(0, 3) == b"abc"
            rbd.RBD().remove(io, name)
        ret, _, msg = r.mon_command(
            '{"prefix": "osd pool create", "pool": "nope", "pg_num": 8}', b"")
        assert ret == -errno.EACCES, msg


@pytest.mark.parametrize("client_id", ["admin", DevCluster.client_id])
def test_wrong_keyring_fails_fast(cluster: DevCluster, tmp_path: Path, client_id: str) -> None:
    """A key the cluster does not know is refused at connect, with a clear error."""
    rados, _ = _bindings()
    bad = tmp_path / "bad.keyring"
    bad.write_text(f"[client.{client_id}]\n\tkey = AQBpsANrAAAAABAAvTLm0SwZ7spK5frHW/wmIQ==\n")
    r = rados.Rados(conffile=cluster.conf, rados_id=client_id,
                    conf={"keyring": str(bad), "client_mount_timeout": "3",
                          "rados_mon_op_timeout": "3"})
    start = time.monotonic()
    with pytest.raises(rados.PermissionDeniedError, match="permission denied"):
        r.connect(timeout=5)
    assert time.monotonic() - start < 10
    r.shutdown()


def test_status_and_down_refuse_what_is_not_theirs(tmp_path: Path) -> None:
    """status fails on a missing cluster; up/down never touch a foreign non-empty DIR."""
    assert not DevCluster(tmp_path / "nothing").status()
    DevCluster(tmp_path / "nothing").down()  # idempotent on a missing DIR
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious").write_text("keep me")
    for cmd in ("up", "down"):
        proc = _script(cmd, str(foreign))
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and "not a ceph-dev-cluster directory" in proc.stderr
    assert (foreign / "precious").read_text() == "keep me"
    with pytest.raises(DevClusterError, match="bad image name"):
        DevCluster(foreign).map("../x")


def test_up_retries_a_taken_mon_port(tmp_path: Path) -> None:
    """A mon port already bound makes ``up`` pick another pair instead of failing."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        env = dict(os.environ, CEPH_DEV_MON_PORT=str(taken - 1))
        d = tmp_path / "c"
        try:
            proc = _script("up", str(d), env=env)
            assert proc.returncode == 0, proc.stderr
            mon_host = DevCluster.parse_exports(proc.stdout)["CEPH_MON_HOST"]
            assert f":{taken}" not in mon_host and f":{taken - 1}," not in mon_host
        finally:
            _script("down", str(d))
    assert not d.exists()


@needs_blockdev
def test_down_leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> None:
    """down with a dirty mounted fs, a mapped image and a foreign rbd-fuse outside DIR."""
    _, rbd = _bindings()
    c = DevCluster(tmp_path_factory.mktemp("ceph-down"))
    outside = tmp_path_factory.mktemp("outside")
    fuse_proc: subprocess.Popen[bytes] | None = None
    try:
        c.up()
        with _client(c) as r, r.open_ioctx(c.pool) as io:
            for name in ("mounted", "mapped", "foreign"):
                rbd.RBD().create(io, name, 256 * MiB)
        mounted_dev = c.map("mounted")
        _mkfs_mount(mounted_dev, outside / "mnt")
        (outside / "mnt" / "dirty").write_bytes(os.urandom(8 * MiB))  # not synced
        mapped_dev = c.map("mapped")
        # an rbd-fuse of this cluster that `map` did not start, mounted outside DIR
        (outside / "fuse").mkdir()
        fuse_proc = subprocess.Popen(
            ["rbd-fuse", "-c", c.conf, "-p", c.pool, str(outside / "fuse"), "-f"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (outside / "fuse" / "foreign").exists():
            assert time.monotonic() < deadline and fuse_proc.poll() is None, "rbd-fuse failed"
            time.sleep(0.01)
        foreign_dev = _sh("losetup", "--find", "--show", str(outside / "fuse" / "foreign")).strip()
        majmins = [_loop_majmin(d) for d in (mounted_dev, mapped_dev, foreign_dev)]
        cluster_dir = c.dir
    except BaseException:
        c.down()
        if fuse_proc is not None:
            fuse_proc.kill()
            fuse_proc.wait()
        raise
    c.down()
    assert fuse_proc.wait(timeout=10) is not None  # it exited once unmounted
    _assert_nothing_left(cluster_dir, str(outside))
    mountinfo = [ln.split()[2] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert not set(majmins) & set(mountinfo)
    c.down()  # idempotent


@needs_blockdev
def test_down_after_the_osd_was_killed(tmp_path_factory: pytest.TempPathFactory,
                                       tmp_path: Path) -> None:
    """A dead OSD under a mounted ext4 with dirty data: down kills rbd-fuse first, so
    the unmount cannot block forever, and still cleans up everything."""
    _, rbd = _bindings()
    c = DevCluster(tmp_path_factory.mktemp("ceph-kill"))
    try:
        c.up()
        with _client(c) as r, r.open_ioctx(c.pool) as io:
            rbd.RBD().create(io, "victim", 256 * MiB)
        dev = c.map("victim")
        _mkfs_mount(dev, tmp_path / "mnt")
        osd_pid = int((Path(c.dir) / "run" / "osd.0.pid").read_text())
        os.kill(osd_pid, signal.SIGKILL)
        (tmp_path / "mnt" / "dirty").write_bytes(os.urandom(4 * MiB))  # page cache only
        assert not c.status()
        cluster_dir = c.dir
    finally:
        c.down()
    _assert_nothing_left(cluster_dir, str(tmp_path / "mnt"))


def test_up_recreates_a_broken_cluster(tmp_path: Path) -> None:
    """``up`` on a DIR whose OSD died starts a fresh cluster (memstore lost its data)."""
    c = DevCluster(tmp_path / "c")
    try:
        first = dict(c.up().env)
        os.kill(int((tmp_path / "c" / "run" / "osd.0.pid").read_text()), signal.SIGKILL)
        second = dict(c.up().env)
        assert second["CEPH_FSID"] != first["CEPH_FSID"]
        assert c.status()
    finally:
        c.down()
    assert not (tmp_path / "c").exists()


def test_bluestore(tmp_path: Path) -> None:
    """CEPH_DEV_STORE=bluestore keeps the OSD data on a sparse file in DIR."""
    _, rbd = _bindings()
    with DevCluster(tmp_path / "bs", store="bluestore") as c:
        block = Path(c.dir) / "osd" / "ceph-0" / "block"
        assert block.is_file() and not block.is_symlink()
        st = block.stat()
        assert st.st_size == 10 * GiB and st.st_blocks * 512 < GiB  # sparse
        with pytest.raises(DevClusterError, match="runs bluestore"):
            DevCluster(c.dir, store="memstore").up()
        with _client(c) as r, r.open_ioctx(c.pool) as io:
            rbd.RBD().create(io, "b", 64 * MiB)
            with rbd.Image(io, "b") as img:
                img.write(b"z" * MiB, 0)
                assert img.read(0, MiB) == b"z" * MiB
    assert not (tmp_path / "bs").exists()
