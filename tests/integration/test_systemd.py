"""
txgraph under systemd socket activation (issue 19), with Debian's
C{systemd-socket-activate} making and holding the plugin socket as
C{txgraph.socket} does: txgraph serves the socket systemd made without
changing its mode, keeps it (same file, same inode) across a stop and a
kill, refuses one wider than 0660, and dockerd finds the plugin through it.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest
from conftest import Components
from txgraphd import ActivatedTxgraphd


def _activated(components: Components, mode: int = 0o660) -> ActivatedTxgraphd:
    """
    A socket-activated txgraph (not started), cleaned up with the others.
    """
    workdir = components.base / f"txgraph-{len(components.made)}"
    workdir.mkdir(parents=True, exist_ok=True)
    from conftest import plugin_name

    daemon = ActivatedTxgraphd(workdir, plugin_name())
    daemon.socket_mode = mode
    components.made.append(daemon)
    return daemon


def _wait_for_new_pid(daemon: ActivatedTxgraphd, old: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pid = daemon.txgraph_pid
        except (FileNotFoundError, ValueError):
            pid = old
        if pid != old:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"txgraph was not started again:\n{daemon.log_tail()}")


def test_socket_activated_plugin_keeps_its_socket(components: Components) -> None:
    """
    The first call (Plugin.Activate, as dockerd's) starts txgraph on the
    socket systemd made and is answered; the socket stays 0660 root:root
    (Twisted's own systemd endpoint would make it 0666, and remove it at
    stop); after a SIGTERM stop and after a SIGKILL, txgraph started again
    on the same socket (same inode) answers the calls that waited for it.
    """
    daemon = _activated(components)
    daemon.launch()
    before = os.stat(daemon.socket)
    status, reply = daemon.call("Plugin.Activate", None, timeout=30)
    assert (status, reply) == (200, {"Implements": ["GraphDriver"]}), daemon.log_tail()
    first = daemon.txgraph_pid
    st = os.stat(daemon.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, 0)
    assert "listening on" in daemon.log_tail()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        pid = daemon.txgraph_pid
        os.kill(pid, signum)
        _wait_for_new_pid(daemon, pid)
        status, reply = daemon.call("Plugin.Activate", None, timeout=30)
        assert status == 200, daemon.log_tail()
        st = os.stat(daemon.socket)
        assert (st.st_ino, stat.S_IMODE(st.st_mode)) == (before.st_ino, 0o660)
    assert daemon.txgraph_pid != first
    assert daemon.stop() == 0
    assert "(UNIX Port" in daemon.log_tail()  # it did stop listening, leaving the file


@pytest.mark.parametrize("mode", [0o666, 0o664])
def test_wider_socket_is_refused(components: Components, mode: int) -> None:
    """
    A socket systemd made wider than 0660 (a unit without SocketMode=0660)
    is not served: txgraph exits 1 naming the socket, its mode and the unit
    setting to fix, and leaves the mode as it found it.
    """
    daemon = _activated(components, mode)
    daemon.launch()
    with pytest.raises(OSError):
        daemon.call("Plugin.Activate", None, timeout=30)
    assert daemon.process is not None and daemon.process.wait(30) == 1
    log = daemon.log_tail()
    assert f"the socket {daemon.socket} systemd passed is mode {mode:04o}" in log
    assert "set SocketMode=0660" in log
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == mode


@pytest.mark.dockerd
def test_dockerd_finds_the_socket_activated_plugin(
    components: Components, busybox_image: Path
) -> None:
    """
    dockerd started while only the socket exists (txgraph not running yet)
    activates txgraph with its first call and uses it: docker load and
    docker run work.
    """
    daemon = _activated(components)
    daemon.launch()
    assert not (daemon.workdir / "txgraph.pid").exists()
    dockerd = components.dockerd(daemon.name)
    dockerd.docker("load", "-i", str(busybox_image))
    out = dockerd.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "hi").stdout
    assert out.strip() == "hi"
    assert f"Storage Driver: {daemon.name}" in dockerd.docker("info").stdout
