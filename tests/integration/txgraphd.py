"""
A real C{twistd -n txgraph} process for integration tests: started on its
own plugin socket (a unique plugin name, so parallel runs never collide)
and state directory, spoken to over the UNIX socket exactly as dockerd
does, killed or stopped by PID.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import txgraph
from txgraph.engine import UnixHTTPConnection

if TYPE_CHECKING:
    from txgraph.testing.ceph import DevCluster

PLUGIN_DIR = Path("/run/docker/plugins")
REPO = Path(txgraph.__file__).resolve().parent.parent


class Txgraphd:
    """
    One txgraph daemon.

    @ivar name: the plugin name (dockerd's C{-s NAME}).
    """

    def __init__(self, workdir: Path, name: str, *extra: str) -> None:
        self.workdir = workdir
        self.name = name
        self.state_dir = workdir / "state"
        self.socket = PLUGIN_DIR / f"{name}.sock"
        self.log_path = workdir / "txgraph.log"
        self.extra = list(extra)
        #: The containerd snapshotter socket, if it serves one (L{serve_containerd}).
        self.containerd_socket: Path | None = None
        self.env: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None

    def serve_containerd(self) -> Path:
        """
        Serve containerd's snapshotter protocol too (--containerd-listen), on
        C{snapshotter.sock} in the daemon's directory; returns that socket.
        """
        self.containerd_socket = self.workdir / "snapshotter.sock"
        self.extra += ["--containerd-listen", f"unix:{self.containerd_socket}"]
        return self.containerd_socket

    @property
    def twistd(self) -> str:
        """
        The twistd of the environment running the tests.
        """
        return str(Path(sys.executable).parent / "twistd")

    def command(self) -> list[str]:
        """
        The command line that starts the daemon.
        """
        return [
            self.twistd,
            "-n",
            "--pidfile=",
            "txgraph",
            "--listen",
            f"unix:{self.socket}:mode=660:lockfile=1",
            "--state-dir",
            str(self.state_dir),
            *self.extra,
        ]

    def start(self, timeout: float = 30) -> None:
        """
        Start the daemon and wait until it answers the handshake.
        """
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """
        Start the daemon's process, without waiting for it.
        """
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            # The code under test, with the installed twistd drop-in.
            "PYTHONPATH": str(REPO),
            **self.env,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.workdir,
        )
        log.close()

    def wait_ready(self, timeout: float = 30) -> None:
        """
        Wait until the daemon answers the handshake; a L{RuntimeError} with
        its log's tail if it exits or does not answer within C{timeout}.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"txgraph exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                status, reply = self.call("GraphDriver.Status", {}, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"txgraph did not become ready:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        """
        The end of the daemon's log.
        """
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def call(
        self, method: str, body: Any, timeout: float = 120
    ) -> tuple[int, Any]:
        """
        POST a JSON call as dockerd does; return the status and decoded reply.
        """
        conn = UnixHTTPConnection(str(self.socket), timeout=timeout)
        try:
            data = b"" if body is None else json.dumps(body).encode() + b"\n"
            conn.request(
                "POST",
                f"/{method}",
                body=data,
                headers={"Accept": "application/vnd.docker.plugins.v1.2+json"},
            )
            response = conn.getresponse()
            raw = response.read()
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, raw
        finally:
            conn.close()

    def raw(
        self, method: str, body: bytes, query: str = "", chunked: bool = False
    ) -> tuple[int, bytes]:
        """
        POST raw bytes (ApplyDiff's tar, or malformed JSON).
        """
        status, reply, _ = self.send(method, body, query, chunked)
        return status, reply

    def send(
        self,
        method: str,
        body: bytes,
        query: str = "",
        chunked: bool = False,
        verb: str = "POST",
        timeout: float = 3600,
    ) -> tuple[int, bytes, str]:
        """
        Send raw bytes with any verb, chunked or with a Content-Length;
        return the status, the reply and its Content-Type.
        """
        conn = UnixHTTPConnection(str(self.socket), timeout=timeout)
        try:
            path = f"/{method}" + (f"?{query}" if query else "")
            conn.putrequest(verb, path)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for i in range(0, len(body), 65536):
                    chunk = body[i : i + 65536]
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                conn.send(b"0\r\n\r\n")
            else:
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                conn.send(body)
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Content-Type") or ""
        finally:
            conn.close()

    @property
    def pid(self) -> int:
        """
        The daemon's PID.
        """
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 30) -> int:
        """
        SIGTERM, and wait; SIGKILL if it does not stop.  Returns the exit
        code.
        """
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        """
        SIGKILL, as a crash.
        """
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        """
        Stop, then start again.
        """
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """
        Stop the daemon, unmount whatever is left under its directory (a
        failed test may leave planted or layer mounts), and remove its
        socket and lock.
        """
        self.stop()
        prefix = str(self.workdir)
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted(
            (p for p in points if p == prefix or p.startswith(prefix + "/")),
            key=lambda p: -p.count("/"),
        ):
            subprocess.run(["umount", "-l", point], check=False)
        for path in (self.socket, Path(f"{self.socket}.lock")):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def admin(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """
    Run txgraph-admin (the installed script, on the code under test) on a
    state directory: through the admin socket while the daemon runs.
    """
    return subprocess.run(
        [str(Path(sys.executable).parent / "txgraph-admin"), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


class ActivatedTxgraphd(Txgraphd):
    """
    txgraph socket-activated as under C{txgraph.socket}: Debian's
    C{systemd-socket-activate} makes the plugin socket (the harness's
    unique plugin name) and holds it; L{socket_holder} runs txgraph on it
    with C{--listen systemd:domain=UNIX:index=0} from the first connection
    on, and again after txgraph is killed.

    @ivar socket_mode: the mode given to the socket before anything
        connects (the unit's C{SocketMode=}: C{systemd-socket-activate}
        has no such option and makes it 0644).
    """

    socket_mode = 0o660

    def command(self) -> list[str]:
        """
        systemd-socket-activate, the holder, and twistd on the inherited socket.
        """
        env = {"PYTHONPATH": str(REPO), **self.env}
        return [
            "systemd-socket-activate",
            "--fdname=txgraph",
            *(f"--setenv={key}={value}" for key, value in env.items()),
            "-l",
            str(self.socket),
            sys.executable,
            str(Path(__file__).with_name("socket_holder.py")),
            str(self.workdir / "txgraph.pid"),
            self.twistd,
            "-n",
            "--pidfile=",
            "txgraph",
            "--listen",
            "systemd:domain=UNIX:index=0",
            "--state-dir",
            str(self.state_dir),
            *self.extra,
        ]

    def launch(self) -> None:
        """
        Start systemd-socket-activate, and give its socket L{socket_mode}
        before anything connects (which starts txgraph).
        """
        super().launch()
        assert self.process is not None
        deadline = time.monotonic() + 10
        while not self.socket.is_socket():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-socket-activate made no socket:\n{self.log_tail()}")
            time.sleep(0.02)
        os.chmod(self.socket, self.socket_mode)

    @property
    def txgraph_pid(self) -> int:
        """
        The PID of the txgraph the holder runs now.
        """
        return int((self.workdir / "txgraph.pid").read_text())


_namespaces = itertools.count()


def rbd_namespace(cluster: DevCluster, prefix: str = "t") -> str:
    """
    A new, empty RBD namespace in the cluster's pool.
    """
    name = f"{prefix}{os.getpid()}-{next(_namespaces)}"
    subprocess.run(
        ["rbd", "-c", cluster.conf, "--keyring", cluster.keyring, "namespace", "create",
         f"{cluster.pool}/{name}"],
        check=True, capture_output=True, timeout=60,
    )
    return name


def rbd_flags(
    cluster: DevCluster, namespace: str, node: str = "node-a", base_size: str = "2G"
) -> list[str]:
    """
    txgraph's command line for the rbd backend on the dev cluster, as the
    restricted client, in a namespace of its own.
    """
    return [
        "--backend", "rbd",
        "--rbd-conf", cluster.conf,
        "--rbd-client", cluster.client_id,
        "--rbd-keyring", cluster.client_keyring,
        "--rbd-pool", cluster.pool,
        "--rbd-namespace", namespace,
        "--rbd-base-size", base_size,
        "--rbd-node-id", node,
    ]
