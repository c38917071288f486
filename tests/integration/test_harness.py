"""Prove the integration harness itself, on dockerd's built-in overlay2 driver.

These tests need root, ``/usr/sbin/dockerd`` (Debian's docker.io 20.10),
busybox-static and debootstrap (and the Debian mirror, once), but not txgraph: if they fail, the harness
(or the machine) is broken, not the plugin.  Images are cached in
:func:`images.default_cache_dir`, so only the first run pays for debootstrap.
"""

from __future__ import annotations

import json
import lzma
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import images
import pytest
from dockerd import Dockerd, DockerdError, ProcessHandle, mounts_under


@pytest.fixture
def overlay2(tmp_path: Path) -> Iterator[Dockerd]:
    """A started Dockerd on the built-in overlay2 driver, always cleaned up."""
    daemon = Dockerd(tmp_path / "dockerd", driver="overlay2")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


def test_busybox_rootfs_is_deterministic(tmp_path: Path) -> None:
    """Two cold builds of the busybox rootfs are byte-identical and follow the recipe."""
    first = images.busybox_rootfs(tmp_path / "a")
    second = images.busybox_rootfs(tmp_path / "b")
    assert images.sha256_file(first) == images.sha256_file(second)
    with tarfile.open(first) as archive:
        members = {m.name: m for m in archive.getmembers()}
    applets = [m for m in members.values() if m.issym() and m.linkname == "busybox"]
    assert len(applets) == len(images._busybox_applets(images.BUSYBOX))
    assert members["./tmp"].mode == 0o1777
    assert members["./bin/busybox"].mode == 0o755
    assert {"./etc/passwd", "./etc/group"} <= members.keys()
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}
    assert {m.mtime for m in members.values()} == {1704067200}


def test_save_tarball_is_a_loadable_single_layer_image(tmp_path: Path) -> None:
    """save_tarball writes manifest, config (diffID, arch, os, Cmd, Env), layer and repositories."""
    rootfs = images.busybox_rootfs(images.default_cache_dir())
    config = {"Cmd": ["/bin/sh"], "Env": ["A=b"]}
    out = images.save_tarball(rootfs, "example.com:5000/bb:t1", config, tmp_path / "a.tar")
    again = images.save_tarball(rootfs, "example.com:5000/bb:t1", config, tmp_path / "b.tar")
    assert images.sha256_file(out) == images.sha256_file(again)
    with tarfile.open(out) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        [entry] = manifest
        image = json.load(archive.extractfile(entry["Config"]))  # type: ignore[arg-type]
        layer = archive.getmember(entry["Layers"][0])
        repositories = json.load(archive.extractfile("repositories"))  # type: ignore[arg-type]
    assert entry["RepoTags"] == ["example.com:5000/bb:t1"]
    assert image["rootfs"] == {
        "type": "layers", "diff_ids": ["sha256:" + images.sha256_file(rootfs)],
    }
    assert (image["architecture"], image["os"]) == ("amd64", "linux")
    assert image["config"] == config
    assert layer.size == rootfs.stat().st_size
    assert repositories == {"example.com:5000/bb": {"t1": entry["Layers"][0].split("/")[0]}}


def test_extract_single_layer_round_trips_a_saved_image(tmp_path: Path) -> None:
    """extract_single_layer gets back the exact layer tar from an xz-compressed save tarball."""
    rootfs = images.busybox_rootfs(images.default_cache_dir())
    saved = images.save_tarball(rootfs, "bb:x", images.BUSYBOX_CONFIG, tmp_path / "bb.tar")
    compressed = tmp_path / "bb.tar.xz"
    compressed.write_bytes(lzma.compress(saved.read_bytes(), preset=0))
    layer = images.extract_single_layer(compressed, tmp_path / "layer.tar")
    assert images.sha256_file(layer) == images.sha256_file(rootfs)


@pytest.mark.dockerd
def test_overlay2_load_import_run_and_clean_stop(tmp_path: Path) -> None:
    """On overlay2, load/import/run work and a stop leaves no mount and no process behind."""
    cache = images.default_cache_dir()
    rootfs = images.busybox_rootfs(cache)
    daemon = Dockerd(tmp_path / "dockerd", driver="overlay2")
    try:
        daemon.start()
        assert daemon.docker("info", "--format", "{{.Driver}}").stdout.strip() == "overlay2"
        loaded = daemon.docker("load", "-i", images.busybox_image(cache))
        assert "Loaded image: busybox:local" in loaded.stdout
        layers = daemon.docker(
            "image", "inspect", "--format", "{{json .RootFS.Layers}}", "busybox:local"
        ).stdout
        assert json.loads(layers) == ["sha256:" + images.sha256_file(rootfs)]
        daemon.docker("import", "-c", 'CMD ["/bin/sh"]', rootfs, "bb:imported")
        run = daemon.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "hi")
        assert run.stdout == "hi\n"
        run = daemon.docker("run", "--rm", "--network", "none", "bb:imported", "cat", "/etc/group")
        assert run.stdout.startswith("root:x:0:")
        processes = daemon.processes()
        assert daemon.pid in [p.pid for p in processes] and len(processes) >= 2
        run_dir = daemon.run_dir
        assert run_dir is not None

        daemon.stop()

        assert not daemon.running()
        assert not [p for p in processes if p.alive()]
        assert mounts_under(tmp_path, run_dir) == []
    finally:
        daemon.cleanup()
    assert not daemon.data_root.exists() and not run_dir.exists()
    assert daemon.log_path.exists()


@pytest.mark.dockerd
def test_kill_then_restart_recovers(overlay2: Dockerd) -> None:
    """kill() takes down dockerd, containerd, shims and containers; a restart then works."""
    overlay2.docker("load", "-i", images.busybox_image(images.default_cache_dir()))
    overlay2.docker(
        "run", "-d", "--name", "sleeper", "--network", "none", "busybox:local", "sleep", "600"
    )
    shims = overlay2.shims()
    assert len(shims) == 1
    before = overlay2.processes()

    overlay2.kill()

    assert not [p for p in before if p.alive()]
    assert overlay2.processes() == []
    overlay2.start()
    state = overlay2.docker("inspect", "--format", "{{.State.Running}}", "sleeper").stdout
    assert state.strip() == "false"
    overlay2.docker("start", "sleeper")
    assert overlay2.docker("exec", "sleeper", "echo", "alive").stdout == "alive\n"
    overlay2.docker("rm", "-f", "sleeper")


@pytest.mark.dockerd
def test_debian_image_loads_and_runs(overlay2: Dockerd) -> None:
    """The debian:local save tarball loads into dockerd and runs bash on Debian 12."""
    overlay2.docker("load", "-i", images.debian_image(images.default_cache_dir()), timeout=300)
    run = overlay2.docker(
        "run", "--rm", "--network", "none", "debian:local",
        "bash", "-c", "cat /etc/debian_version; id -u",
    )
    assert run.stdout.startswith("12.") and run.stdout.endswith("\n0\n")


@pytest.mark.dockerd
def test_two_daemons_run_side_by_side(tmp_path: Path) -> None:
    """Two Dockerd instances run at once, and stopping one leaves the other serving."""
    first = Dockerd(tmp_path / "one", driver="overlay2")
    second = Dockerd(tmp_path / "two", driver="overlay2")
    try:
        first.start()
        second.start()
        assert first.socket_path != second.socket_path
        first.docker("load", "-i", images.busybox_image(images.default_cache_dir()))
        assert second.docker("images", "-q").stdout == ""
        first.stop()
        assert second.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    finally:
        first.cleanup()
        second.cleanup()


@pytest.mark.dockerd
def test_failed_start_raises_with_log_and_cleanup_unmounts(tmp_path: Path) -> None:
    """A failed start raises with dockerd's error lines; cleanup removes the bind mount left."""
    daemon = Dockerd(
        tmp_path / "dockerd", driver="overlay2", extra_args=["--storage-opt", "overlay2.bogus=1"]
    )
    try:
        with pytest.raises(DockerdError, match="unknown option overlay2.bogus"):
            daemon.start(timeout=30)
        assert not daemon.running()
        # dockerd bind-mounts its data-root onto itself before it fails.
        assert mounts_under(daemon.data_root) == [str(daemon.data_root)]
    finally:
        daemon.cleanup()
    assert mounts_under(tmp_path) == []
    assert not daemon.data_root.exists()


def test_process_handle_ignores_a_recycled_pid() -> None:
    """A ProcessHandle whose start time does not match the live PID is treated as gone."""
    me = ProcessHandle.of(os.getpid())
    assert me is not None and me.alive()
    assert not ProcessHandle(me.pid, me.start_time + 1).alive()


@pytest.mark.slow
def test_debian_rootfs_by_debootstrap() -> None:
    """debootstrap builds (once, then cached) a bookworm minbase tar with /etc/debian_version."""
    rootfs = images.debian_rootfs(images.default_cache_dir(), prebuilt=None)
    assert rootfs.name.endswith("-debootstrap.tar")
    with tarfile.open(rootfs) as archive:
        version = archive.extractfile("./etc/debian_version")
        assert version is not None
        assert version.read().decode().startswith("12.")
        archive.getmember("./usr/bin/apt-get")
        assert archive.getmember("./dev").isdir()
