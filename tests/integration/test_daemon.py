"""
The txgraph daemon itself (C{twistd -n txgraph}) on a real socket, spoken
to as dockerd speaks: permissions, the state directory lock, stale sockets,
options and Init's storage options, restart without Init, bad requests,
failed Create and ApplyDiff, concurrent streaming, and the reactor staying
responsive while a large layer is applied.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Components
from txgraphd import Txgraphd, UnixHTTPConnection

from txgraph.testing.tars import files_tar

A = "a" * 64
B = "b" * 64
C = "c" * 64
D = "d" * 64


def _ok(daemon: Txgraphd, method: str, body: object) -> object:
    status, reply = daemon.call(method, body)
    assert status == 200, (method, body, reply)
    return reply


def _err(daemon: Txgraphd, method: str, body: object, status: int) -> str:
    code, reply = daemon.call(method, body)
    assert code == status, (method, body, code, reply)
    assert isinstance(reply, dict) and reply["Err"]
    return str(reply["Err"])


def test_permissions(components: Components) -> None:
    """
    The plugin socket is 0660 and root-owned; the state directory is 0700
    and the database 0600.
    """
    daemon = components.txgraph()
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(os.stat(daemon.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.state_dir / "txgraph.db").st_mode) == 0o600


def test_one_daemon_per_state_dir(components: Components) -> None:
    """
    A second txgraph on the same state directory refuses to start, saying
    which process holds it.
    """
    first = components.txgraph()
    second = components.txgraph(start=False)
    second.state_dir = first.state_dir
    with pytest.raises(RuntimeError) as e:
        second.start()
    assert f"another txgraph (pid {first.pid})" in str(e.value)


def test_stale_socket_after_crash(components: Components) -> None:
    """
    After SIGKILL the socket file and its lock remain; a new txgraph takes
    them over.
    """
    daemon = components.txgraph()
    daemon.kill()
    assert daemon.socket.exists()
    daemon.start()
    _ok(daemon, "Plugin.Activate", None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "unknown backend 'nope'"),
        (["--overlay-mountopt", "upperdir=/x"], "upperdir is set by txgraph itself"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--listen", "bogus:endpoint"], "bogus"),
    ],
)
def test_bad_command_line(components: Components, args: list[str], message: str) -> None:
    """
    A bad option stops txgraph with a message naming it.
    """
    daemon = components.txgraph(*args, start=False)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        daemon.start(timeout=20)
    assert "txgraph exited with" in str(e.value), "txgraph did not exit"
    assert time.monotonic() - started < 10
    assert message in str(e.value)


def test_disk_full_during_apply(components: Components) -> None:
    """
    A full disk during ApplyDiff is a clear error naming the operation and
    the layer, and leaves the layer empty.
    """
    daemon = components.txgraph(start=False)
    daemon.state_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "small", str(daemon.state_dir)], check=True)
    daemon.start()
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    tar = files_tar({f"f{i}": os.urandom(1 << 20) for i in range(4)})
    code, body = daemon.raw("GraphDriver.ApplyDiff", tar, query=f"id={A}&parent=", chunked=True)
    message = json.loads(body)["Err"]
    assert code == 500
    assert "apply of layer " + A in message and "No space left on device" in message
    assert os.listdir(daemon.state_dir / "overlay" / A / "diff") == []
    daemon.stop()
    subprocess.run(["umount", str(daemon.state_dir)], check=True)


def test_init_storage_opts(components: Components) -> None:
    """
    Init accepts txgraph.<backend>.* keys and refuses others, naming them.
    """
    daemon = components.txgraph()
    init = {"Home": "/var/lib/docker/x", "UIDMaps": None, "GIDMaps": None}
    assert "'txgraph.bogus'" in _err(daemon, "GraphDriver.Init", {**init, "Opts": ["txgraph.bogus=1"]}, 400)
    assert "'size'" in _err(daemon, "GraphDriver.Init", {**init, "Opts": ["size=5G"]}, 400)
    assert "txgraph.overlay.nope" in _err(
        daemon, "GraphDriver.Init", {**init, "Opts": ["txgraph.overlay.nope=1"]}, 400
    )
    _ok(daemon, "GraphDriver.Init", {**init, "Opts": ["txgraph.overlay.mountopt=uuid=off"]})


def test_restart_without_init(components: Components) -> None:
    """
    Init's options and home survive a restart without a new Init: the
    restarted daemon mounts with the options dockerd gave.
    """
    daemon = components.txgraph()
    _ok(daemon, "GraphDriver.Init", {
        "Home": "/var/lib/docker-x/txgraph", "Opts": ["txgraph.overlay.mountopt=uuid=off"],
        "UIDMaps": None, "GIDMaps": None,
    })
    daemon.restart()
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    _ok(daemon, "GraphDriver.CreateReadWrite", {"ID": B, "Parent": A})
    directory = _ok(daemon, "GraphDriver.Get", {"ID": B})["Dir"]  # type: ignore[index]
    with open("/proc/self/mountinfo") as f:
        [line] = [line for line in f if line.split()[4] == directory]
    assert "uuid=off" in line
    _ok(daemon, "GraphDriver.Put", {"ID": B})
    admin = subprocess.run(
        [str(Path(sys.executable).parent / "txgraph-admin"), "--state-dir", str(daemon.state_dir),
         "status", "--json"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    report = json.loads(admin.stdout)
    assert report["docker_home"] == "/var/lib/docker-x/txgraph"
    assert report["layers"] == 2


def test_bad_requests(components: Components) -> None:
    """
    Bad requests over the real socket get {"Err": ...} with a non-200
    status naming the problem, and change nothing.
    """
    daemon = components.txgraph()
    code, body = daemon.raw("GraphDriver.Get", b"{oops")
    assert code == 400 and b"malformed JSON" in body
    assert "missing ID" in _err(daemon, "GraphDriver.Create", {}, 400)
    assert "invalid ID" in _err(daemon, "GraphDriver.Create", {"ID": "../../etc"}, 400)
    assert "unknown layer" in _err(daemon, "GraphDriver.Get", {"ID": A}, 404)
    assert "does not exist" in _err(daemon, "GraphDriver.Create", {"ID": B, "Parent": A}, 404)
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    _ok(daemon, "GraphDriver.CreateReadWrite", {"ID": B, "Parent": A})
    assert "Put without Get" in _err(daemon, "GraphDriver.Put", {"ID": B}, 409)
    _ok(daemon, "GraphDriver.Get", {"ID": B})
    assert "mounted" in _err(daemon, "GraphDriver.Remove", {"ID": B}, 409)
    assert "parent of 1" in _err(daemon, "GraphDriver.Remove", {"ID": A}, 409)
    _ok(daemon, "GraphDriver.Put", {"ID": B})
    _ok(daemon, "GraphDriver.Remove", {"ID": B})
    _ok(daemon, "GraphDriver.Remove", {"ID": A})
    _ok(daemon, "GraphDriver.Remove", {"ID": A})
    assert list((daemon.state_dir / "overlay").glob("?" * 64)) == []


def test_failed_create_leaves_nothing(components: Components) -> None:
    """
    A Create the backend refuses (a size too small for the layer's own
    filesystem, made and then rolled back) leaves no row, no directory and
    no mount.
    """
    daemon = components.txgraph()
    message = _err(daemon, "GraphDriver.CreateReadWrite", {"ID": A, "StorageOpt": {"size": "16K"}}, 400)
    assert message == "Filesystem does not support, or has not enabled quotas"
    assert _ok(daemon, "GraphDriver.Exists", {"ID": A}) == {"Exists": False}
    assert list((daemon.state_dir / "overlay").glob("?" * 64)) == []
    assert os.listdir(daemon.state_dir / "overlay" / ".tmp") == []


def test_failed_apply_leaves_nothing_half_made(components: Components) -> None:
    """
    An ApplyDiff of a broken tar fails, leaves the layer empty (dockerd
    then Removes it, or retries), and a retry with a good tar works.
    """
    daemon = components.txgraph()
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    good = files_tar({"a": b"1" * 5000, "b": b"2" * 5000})
    code, body = daemon.raw("GraphDriver.ApplyDiff", good[:3000], query=f"id={A}&parent=", chunked=True)
    assert code == 400, body
    assert os.listdir(daemon.state_dir / "overlay" / A / "diff") == []
    code, body = daemon.raw("GraphDriver.ApplyDiff", good, query=f"id={A}&parent=", chunked=True)
    assert code == 200 and json.loads(body) == {"Size": 10000}
    _ok(daemon, "GraphDriver.Remove", {"ID": A})
    assert not (daemon.state_dir / "overlay" / A).exists()


def test_diff_streamed_into_apply(components: Components) -> None:
    """
    A Diff response can be streamed into an ApplyDiff at the same moment:
    requests are served concurrently.
    """
    daemon = components.txgraph()
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    files = {f"file-{i}": os.urandom(64 * 1024) for i in range(64)}
    code, _ = daemon.raw("GraphDriver.ApplyDiff", files_tar(files), query=f"id={A}&parent=", chunked=True)
    assert code == 200
    _ok(daemon, "GraphDriver.Create", {"ID": B})
    diff = UnixHTTPConnection(str(daemon.socket))
    diff.request("POST", "/GraphDriver.Diff", body=json.dumps({"ID": A}).encode())
    response = diff.getresponse()
    assert response.status == 200
    apply = UnixHTTPConnection(str(daemon.socket))
    apply.putrequest("POST", f"/GraphDriver.ApplyDiff?id={B}&parent=")
    apply.putheader("Transfer-Encoding", "chunked")
    apply.endheaders()
    while chunk := response.read(32 * 1024):
        apply.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    apply.send(b"0\r\n\r\n")
    result = apply.getresponse()
    assert result.status == 200 and json.loads(result.read()) == {"Size": 64 * 64 * 1024}
    directory = Path(_ok(daemon, "GraphDriver.Get", {"ID": B})["Dir"])  # type: ignore[index]
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
    _ok(daemon, "GraphDriver.Put", {"ID": B})


def test_reactor_stays_responsive(components: Components, debian_rootfs: Path) -> None:
    """
    While a 127 MB layer is being applied, other calls are answered at
    once: extraction and disk work never run on the reactor thread.
    """
    daemon = components.txgraph()
    _ok(daemon, "GraphDriver.Create", {"ID": A})
    result: dict[str, object] = {}

    def apply() -> None:
        result["apply"] = daemon.raw(
            "GraphDriver.ApplyDiff", debian_rootfs.read_bytes(), query=f"id={A}&parent=", chunked=True
        )

    thread = threading.Thread(target=apply)
    thread.start()
    latencies = []
    while thread.is_alive():
        start = time.monotonic()
        _ok(daemon, "GraphDriver.Exists", {"ID": B})
        latencies.append(time.monotonic() - start)
        time.sleep(0.01)
    thread.join()
    code, body = result["apply"]  # type: ignore[misc]
    assert code == 200, body
    assert len(latencies) >= 5
    assert max(latencies) < 0.5, f"a call waited {max(latencies):.3f} s during ApplyDiff"
    status = {k: v for k, v in _ok(daemon, "GraphDriver.Status", {})["Status"]}  # type: ignore[index]
    assert float(status["Reactor Max Lag"].split()[0]) < 250


def test_installed_package() -> None:
    """
    The installed (non-editable) package carries the twistd drop-in, the
    migrations, and the txgraph-admin script.
    """
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(bindir / "twistd"), "--help"], capture_output=True, text=True,
                         check=True, cwd="/", env=env).stdout
    assert "txgraph" in out
    code = subprocess.run(
        [sys.executable, "-c",
         "import txgraph.store as s, sys; sys.exit(0 if (s.migrations_dir() / 'env.py').exists() "
         "and 'site-packages' in str(s.migrations_dir()) else 1)"],
        cwd="/", env=env,
    ).returncode
    assert code == 0
    help_text = subprocess.run([str(bindir / "txgraph-admin"), "--help"], capture_output=True,
                               text=True, check=True, cwd="/", env=env).stdout
    assert "status" in help_text and "ls" in help_text


@pytest.mark.dockerd
def test_dockerd_refuses_unknown_storage_opt(components: Components) -> None:
    """
    dockerd started with an unknown txgraph storage option fails at once,
    with txgraph's message naming the key in its log.
    """
    daemon = components.txgraph()
    dockerd = components.dockerd(daemon.name, extra_args=["--storage-opt", "txgraph.bogus=1"], start=False)
    with pytest.raises(Exception) as e:
        dockerd.start(timeout=30)
    assert "txgraph.bogus" in str(e.value) + dockerd.log_tail(20000)


