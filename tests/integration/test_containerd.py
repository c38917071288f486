"""The containerd harness (tests/integration/containerd.py) against containerd's own overlayfs.

These prove the ground the containerd front end's tests stand on: an
isolated containerd 1.6 imports the suite's images and runs a container
with its built-in overlayfs snapshotter, and a local registry takes a push
and gives the image back on a pull (the path on which containerd's unpacker
labels snapshots with ``containerd.io/snapshot.ref``).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from containerd import CRI_PLUGIN, Containerd, Registry

pytestmark = pytest.mark.containerd

_names = itertools.count()


def namespace() -> str:
    """A containerd namespace no other test uses."""
    return f"t{os.getpid()}-{next(_names)}"


def test_config_is_private(tmp_path: Path) -> None:
    """The generated config.toml points every path at the instance's own
    directories, disables CRI, and declares the proxy snapshotters given."""
    daemon = Containerd(tmp_path, proxy_plugins={"txgraph": "/run/txgraph-x/snapshotter.sock"})
    try:
        text = daemon.config_toml()
        assert "version = 2" in text
        assert f'root = "{tmp_path.resolve()}/root"' in text
        assert f'address = "{daemon.address}"' in text
        assert f'address = "{daemon.ttrpc_address}"' in text
        assert f'disabled_plugins = ["{CRI_PLUGIN}"]' in text
        assert '[proxy_plugins."txgraph"]\n  type = "snapshot"\n' in text
        assert 'address = "/run/txgraph-x/snapshotter.sock"' in text
        assert "/var/lib/containerd" not in text and "/run/containerd/" not in text
    finally:
        daemon.cleanup()


def test_import_and_run_busybox(containerd: Containerd, busybox_image: Path) -> None:
    """ctr images import of the busybox docker-save tarball, unpacked with the
    built-in overlayfs snapshotter; ctr run --rm ... echo prints through it."""
    ns = namespace()
    names = containerd.import_image(busybox_image, namespace=ns)
    assert names == ["docker.io/library/busybox:local"], names
    [line] = containerd.ctr("images", "check", namespace=ns).stdout.splitlines()[1:]
    fields = line.split()
    assert fields[0] == names[0] and fields[3] == "complete", line
    assert fields[-1] == "true", line  # the UNPACKED column
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "overlayfs", names[0], f"echo-{ns}",
        "echo", "hello from containerd", namespace=ns,
    )
    assert result.stdout.strip() == "hello from containerd"
    assert containerd.ctr("containers", "ls", "-q", namespace=ns).stdout.split() == []
    assert containerd.shims() == []


def test_push_and_pull_through_local_registry(
    containerd: Containerd, registry: Registry, busybox_image: Path
) -> None:
    """An imported image pushed with --plain-http to the local registry is
    pulled back (fetched and unpacked) into an empty namespace."""
    source, target = namespace(), namespace()
    [local] = containerd.import_image(busybox_image, namespace=source)
    remote = f"{registry.host}/txgraph-test/busybox:{source}"
    containerd.ctr("images", "tag", local, remote, namespace=source)
    containerd.ctr("images", "push", "--plain-http", remote, namespace=source)
    containerd.ctr("images", "pull", "--plain-http", remote, namespace=target)
    pushed = containerd.ctr("images", "ls", namespace=source).stdout
    pulled = containerd.ctr("images", "ls", namespace=target).stdout
    digest = next(line.split()[2] for line in pushed.splitlines() if line.startswith(remote))
    assert any(line.startswith(remote) and digest in line for line in pulled.splitlines()), pulled
    snapshots = containerd.ctr("snapshots", "--snapshotter", "overlayfs", "ls", namespace=target)
    assert "Committed" in snapshots.stdout, snapshots.stdout
