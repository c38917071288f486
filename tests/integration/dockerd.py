"""Run a real, isolated ``/usr/sbin/dockerd`` for the integration tests.

:class:`Dockerd` starts Debian's dockerd 20.10 with everything that could
collide with another daemon on the machine made private: ``--data-root``,
``--exec-root``, the API socket (``-H unix://...``), ``--pidfile`` and an empty
``--config-file``; the no-network flags of
``shared/reference/dockerd-graphdriver-trace.md`` §1 keep it from touching
the host's bridges, sysctls and iptables.  Two instances can run at once.

Every process is handled by PID (checked against its start time, so a reused
PID is never signalled): dockerd itself, the containerd it starts as its
child, and the containerd shims, which detach from containerd and are found
by the containerd socket path on their command line (unique to the
instance).  Teardown unmounts what dockerd leaves behind — notably the
data-root bind mount that survives a failed start — deepest first, and only
then removes the directories.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, overload

DOCKERD: Final = "/usr/sbin/dockerd"
#: Debian's 20.10 CLI.  ``/usr/local/bin/docker`` (28.x) is first in PATH here.
DOCKER_CLI: Final = "/usr/bin/docker"

#: Flags that keep dockerd off the host network configuration.
NO_NETWORK_FLAGS: Final = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--bridge=none",
)

#: dockerd finds containerd, runc and docker-init through PATH; keep it to
#: Debian's directories so nothing in /usr/local or a user's PATH shadows them.
DAEMON_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"

#: containerd 1.6 puts every shim's socket here, whatever its own root is.
SHIM_SOCKET_DIR: Final = Path("/run/containerd/s")

_MNT_DETACH: Final = 2


class DockerdError(RuntimeError):
    """dockerd failed to start or stop; the message carries its log tail."""


class DockerCommandError(subprocess.CalledProcessError):
    """A ``docker`` CLI command failed; ``str()`` shows its stdout and stderr."""

    def __str__(self) -> str:
        def show(data: str | bytes | None) -> str:
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            return (data or "").strip()[-4000:]

        return (
            f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"--- stdout ---\n{show(self.stdout)}\n--- stderr ---\n{show(self.stderr)}"
        )


@dataclass(frozen=True)
class ProcessHandle:
    """A PID pinned to its start time, so a recycled PID is never mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessHandle | None:
        """Return a handle on the live process ``pid``, or None."""
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat.start_time)

    def alive(self) -> bool:
        """True while the process exists and has not exited (zombies count as gone)."""
        stat = _read_stat(self.pid)
        return stat is not None and stat.start_time == self.start_time and stat.state not in "ZX"

    def signal(self, signum: int) -> None:
        """Send ``signum`` if this very process is still alive."""
        if self.alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


@dataclass(frozen=True)
class _Stat:
    ppid: int
    state: str
    start_time: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) is in parentheses and may contain spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return _Stat(ppid=int(fields[1]), state=fields[0], start_time=int(fields[19]))


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _descendants(roots: Iterable[int]) -> list[int]:
    """PIDs of every live descendant of ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _read_stat(pid)
        if stat is not None:
            children.setdefault(stat.ppid, []).append(pid)
    found: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _wait_gone(handles: Iterable[ProcessHandle], timeout: float) -> list[ProcessHandle]:
    """Wait up to ``timeout`` s for the processes to exit; return the survivors."""
    deadline = time.monotonic() + timeout
    left = [h for h in handles if h.alive()]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [h for h in left if h.alive()]
    return left


def mounts_under(*roots: Path | str) -> list[str]:
    """Mount points at or below any of ``roots`` in /proc/self/mountinfo, in mount order.

    A path mounted several times (stacked mounts) appears once per mount.
    """
    prefixes = [os.path.realpath(root) for root in roots]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(
                r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]
            )
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.append(point)
    return found


def loop_devices_under(*roots: Path | str) -> list[str]:
    """Loop devices whose backing file is at or below any of ``roots``, as
    ``/dev/loopN on FILE``."""
    prefixes = [os.path.realpath(root).rstrip("/") + "/" for root in roots]
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if any(backing.startswith(p) for p in prefixes):
            found.append(f"/dev/{name} on {backing}")
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    stat = _read_stat(pid)
    return stat is not None and stat.state not in "ZX"


def rbd_fuse_processes(text: str) -> list[str]:
    """Live (not zombie) rbd-fuse processes with ``text`` in an argument, as
    ``PID: COMMAND LINE``."""
    found = []
    for pid in _all_pids():
        args = _cmdline(pid)
        if not args or not args[0].endswith("rbd-fuse"):
            continue
        if any(text in a for a in args) and pid_alive(pid):
            found.append(f"{pid}: {' '.join(args)}")
    return found


def host_leftovers(root: Path | str) -> list[str]:
    """Mounts, loop devices and rbd-fuse processes that belong to ``root``
    (a txgraph state directory, or a test's directory holding one)."""
    return (
        [f"mount {p}" for p in mounts_under(root)]
        + [f"loop device {d}" for d in loop_devices_under(root)]
        + [f"rbd-fuse process {p}" for p in rbd_fuse_processes(os.path.realpath(root))]
    )


_libc: ctypes.CDLL | None = None


def _umount(path: str, flags: int = 0) -> int:
    """umount2(2); returns 0 or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def unmount_under(*roots: Path | str, attempts: int = 20) -> None:
    """Unmount everything at or below ``roots``, deepest mount points first.

    Busy mounts are retried, then detached (``MNT_DETACH``).  Raises
    :class:`DockerdError` if anything is still mounted afterwards.
    """
    for attempt in range(attempts):
        points = mounts_under(*roots)
        if not points:
            return
        lazy = attempt >= attempts // 2
        # Deepest first; for stacked mounts on one path the last-mounted
        # (last in mountinfo) comes first.
        order = sorted(
            enumerate(points), key=lambda item: (item[1].count("/"), item[0]), reverse=True
        )
        for _, point in order:
            err = _umount(point, _MNT_DETACH if lazy else 0)
            if err not in (0, errno.EINVAL, errno.ENOENT, errno.EBUSY):
                raise DockerdError(f"umount {point}: {os.strerror(err)}")
        if not lazy:
            time.sleep(0.05 * attempt)
    left = mounts_under(*roots)
    if left:
        raise DockerdError(f"still mounted after {attempts} attempts: {left}")


class Dockerd:
    """One isolated dockerd (and its containerd) for a test, driven by PID.

    ``base_dir`` holds the data-root (``base_dir/data-root``) and the log
    (``base_dir/dockerd.log``, kept after :meth:`cleanup` for post-mortems).
    The exec-root, API socket, pidfile and CLI config live in a private
    directory under ``/run`` (short, because containerd's socket path inside
    the exec-root must fit in a unix socket address).

    ``driver`` is a graph driver plugin name (``txgraph-test-1234``; the plugin
    must serve ``/run/docker/plugins/<name>.sock``) or a built-in driver such as
    ``overlay2``.  ``extra_args`` go to dockerd verbatim (``--storage-opt``,
    ``--userns-remap``...).
    """

    def __init__(
        self,
        base_dir: Path | str,
        driver: str = "overlay2",
        *,
        extra_args: Sequence[str] = (),
        debug: bool = False,
        run_parent: Path | str = "/run",
        dockerd: str = DOCKERD,
        docker_cli: str = DOCKER_CLI,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.driver = driver
        self.extra_args = tuple(extra_args)
        self.debug = debug
        self.dockerd_binary = dockerd
        self.docker_cli = docker_cli
        self.extra_env = dict(env or {})
        self.data_root = self.base_dir / "data-root"
        self.log_path = self.base_dir / "dockerd.log"
        self._run_parent = Path(run_parent)
        self.run_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._dockerd: ProcessHandle | None = None
        self._containerd: set[ProcessHandle] = set()
        self._log_offset = 0

    # -- paths -------------------------------------------------------------

    def _require_run_dir(self) -> Path:
        if self.run_dir is None:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir = Path(tempfile.mkdtemp(prefix="txgd-", dir=self._run_parent))
        return self.run_dir

    @property
    def exec_root(self) -> Path:
        """dockerd's ``--exec-root`` (containerd's socket and state live below it)."""
        return self._require_run_dir() / "exec"

    @property
    def socket_path(self) -> Path:
        """The daemon's API socket."""
        return self._require_run_dir() / "docker.sock"

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` value for this daemon."""
        return f"unix://{self.socket_path}"

    @property
    def pidfile(self) -> Path:
        """dockerd's ``--pidfile``."""
        return self._require_run_dir() / "docker.pid"

    @property
    def containerd_socket(self) -> Path:
        """The managed containerd's socket; shims carry it on their command line."""
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def pid(self) -> int | None:
        """dockerd's PID while it runs, else None."""
        return self._dockerd.pid if self._dockerd and self._dockerd.alive() else None

    def running(self) -> bool:
        """True while the dockerd process started by :meth:`start` is alive."""
        return self.pid is not None

    def argv(self) -> list[str]:
        """The dockerd command line :meth:`start` runs."""
        run_dir = self._require_run_dir()
        args = [
            self.dockerd_binary,
            "--experimental",
            "--storage-driver", self.driver,
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--host", self.host,
            "--pidfile", str(self.pidfile),
            "--config-file", str(run_dir / "daemon.json"),
            *NO_NETWORK_FLAGS,
        ]
        if self.debug:
            args.append("--debug")
        args.extend(self.extra_args)
        return args

    # -- processes -----------------------------------------------------------

    def _child_containerds(self) -> set[ProcessHandle]:
        if self._dockerd is None:
            return set()
        found = set()
        for pid in _all_pids():
            stat = _read_stat(pid)
            if stat is not None and stat.ppid == self._dockerd.pid:
                argv = _cmdline(pid)
                if argv and os.path.basename(argv[0]) == "containerd":
                    handle = ProcessHandle.of(pid)
                    if handle is not None:
                        found.add(handle)
        return found

    def shims(self) -> list[ProcessHandle]:
        """Live containerd shims of this instance's containerd.

        A shim detaches from containerd, so it is found by the instance's
        containerd socket path (``-address <exec-root>/...``) in its argv.
        """
        address = str(self.containerd_socket)
        found = []
        for pid in _all_pids():
            argv = _cmdline(pid)
            if argv and "containerd-shim" in os.path.basename(argv[0]) and address in argv:
                handle = ProcessHandle.of(pid)
                if handle is not None:
                    found.append(handle)
        return found

    def processes(self) -> list[ProcessHandle]:
        """dockerd, its containerd(s) and the shims, while alive (for assertions)."""
        handles = [self._dockerd] if self._dockerd else []
        handles += [*self._containerd, *self._child_containerds(), *self.shims()]
        return [h for h in dict.fromkeys(handles) if h.alive()]

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd and wait until ``docker info`` answers with our driver.

        On failure (dockerd exited, or no answer in ``timeout`` s) the daemon
        is stopped and :class:`DockerdError` raised with the log's tail.
        Plugin drivers need up to ~15 s when the plugin is slow to appear.
        """
        if self.running():
            raise DockerdError(f"dockerd already running as PID {self.pid}")
        run_dir = self._require_run_dir()
        (run_dir / "daemon.json").write_text("{}\n")
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER")},
            "PATH": DAEMON_PATH,
            **self.extra_env,
        }
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(self.argv())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._dockerd = ProcessHandle.of(self._process.pid) or ProcessHandle(self._process.pid, -1)
        self._containerd = set()
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._containerd |= self._child_containerds()
                if self._process.poll() is not None:
                    raise DockerdError(
                        f"dockerd exited with {self._process.returncode} during start"
                    )
                if self._ping():
                    break
                if time.monotonic() > deadline:
                    raise DockerdError(f"dockerd did not answer within {timeout:.0f} s")
                time.sleep(0.1)
            result = self.docker(
                "info", "--format", "{{json .Driver}}",
                check=False, timeout=max(10.0, deadline - time.monotonic()),
            )
            if result.returncode != 0:
                raise DockerdError(f"docker info failed: {result.stderr.strip()}")
            reported = json.loads(result.stdout)
            if reported != self.driver:
                raise DockerdError(
                    f"docker info reports driver {reported!r}, wanted {self.driver!r}"
                )
            self._containerd |= self._child_containerds()
        except BaseException as error:
            try:
                self.stop(timeout=15)
            except Exception:
                self.kill()
            tail = self.log_tail()
            if isinstance(error, DockerdError):
                raise DockerdError(
                    f"{error}\n--- errors in {self.log_path} ---\n{self.log_errors()}"
                    f"\n--- {self.log_path} (tail) ---\n{tail}"
                ) from None
            raise

    def _ping(self) -> bool:
        """True if the API socket answers ``GET /_ping`` with 200 OK."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]

    def log_tail(self, size: int = 6000) -> str:
        """The end of the log written since the last :meth:`start`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(self._log_offset, end - size))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_errors(self, limit: int = 15) -> str:
        """The last ``limit`` error-level lines logged since the last :meth:`start`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        errors = [
            line for line in lines
            if "level=error" in line or "level=fatal" in line or line.startswith("failed to start")
        ]
        return "\n".join(errors[-limit:])

    @overload
    def docker(
        self,
        *args: str | os.PathLike[str],
        input: str | bytes | None = ...,
        check: bool = ...,
        timeout: float = ...,
        text: Literal[True] = ...,
        env: Mapping[str, str] | None = ...,
    ) -> subprocess.CompletedProcess[str]: ...

    @overload
    def docker(
        self,
        *args: str | os.PathLike[str],
        input: str | bytes | None = ...,
        check: bool = ...,
        timeout: float = ...,
        text: Literal[False],
        env: Mapping[str, str] | None = ...,
    ) -> subprocess.CompletedProcess[bytes]: ...

    def docker(
        self,
        *args: str | os.PathLike[str],
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 120.0,
        text: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run the 20.10 ``docker`` CLI against this daemon and capture its output.

        ``text=False`` keeps stdout/stderr (and ``input``) as bytes.  With
        ``check`` a non-zero exit raises :class:`DockerCommandError`, whose
        message includes stdout and stderr.
        """
        run_dir = self._require_run_dir()
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER")},
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(run_dir / "cli"),
            **(env or {}),
        }
        argv = [self.docker_cli, *(os.fspath(arg) for arg in args)]
        if isinstance(input, str) and not text:
            input = input.encode()
        elif isinstance(input, bytes) and text:
            input = input.decode()
        result = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=text,
            timeout=timeout,
            env=full_env,
        )
        if check and result.returncode != 0:
            raise DockerCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def stop(self, timeout: float = 30.0) -> None:
        """Stop dockerd with SIGTERM (SIGKILL after ``timeout`` s) and wait for it.

        dockerd stops its containers and containerd on SIGTERM; any containerd
        or shim of this instance still alive 10 s later is SIGKILLed.  Does
        not unmount or remove anything: see :meth:`cleanup`.
        """
        if self._dockerd is None:
            return
        self._containerd |= self._child_containerds()
        if self._dockerd.alive():
            self._dockerd.signal(signal.SIGTERM)
            if _wait_gone([self._dockerd], timeout):
                self._dockerd.signal(signal.SIGKILL)
                _wait_gone([self._dockerd], 10)
        self._reap()
        leftovers = _wait_gone([*self._containerd, *self.shims()], 10)
        if leftovers:
            self._kill_all(leftovers)
        self._dockerd = None
        self._remove_stale_pidfiles()

    def kill(self) -> None:
        """SIGKILL dockerd, as a crash would, and clear what would block a restart.

        The managed containerd (dockerd's child, which would otherwise be
        adopted again by the next dockerd), the shims and the container
        processes under them are killed too, and the stale pidfiles removed,
        so :meth:`start` can run again on the same data-root.  Mounts are
        left as the crash left them.
        """
        if self._dockerd is None:
            return
        containerds = self._containerd | self._child_containerds()
        self._dockerd.signal(signal.SIGKILL)
        _wait_gone([self._dockerd], 10)
        self._reap()
        self._kill_all([*containerds, *self.shims()])
        self._dockerd = None
        self._remove_stale_pidfiles()

    def _remove_stale_pidfiles(self) -> None:
        """Drop dockerd's and containerd's pidfiles once their processes are gone.

        After a SIGKILL they stay behind, and the next dockerd would trust a
        recycled PID in them (refusing to start, or adopting a stranger as
        its containerd).
        """
        if self.run_dir is not None:
            self.pidfile.unlink(missing_ok=True)
            (self.exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)

    def _shim_socket(self, shim: ProcessHandle) -> Path | None:
        """The socket a shim serves: containerd 1.6 names it
        ``/run/containerd/s/<sha256(<containerd socket>/<namespace>/<id>)>``.
        """
        argv = _cmdline(shim.pid)
        try:
            namespace = argv[argv.index("-namespace") + 1]
            container = argv[argv.index("-id") + 1]
        except (ValueError, IndexError):
            return None
        digest = hashlib.sha256(
            f"{self.containerd_socket}/{namespace}/{container}".encode()
        ).hexdigest()
        return SHIM_SOCKET_DIR / digest

    def _kill_all(self, handles: Sequence[ProcessHandle]) -> None:
        """SIGKILL ``handles`` and all their descendants (container processes).

        A killed shim cannot remove its socket from the shared
        ``/run/containerd/s``, so that is done here.
        """
        shims = set(self.shims())
        sockets = [self._shim_socket(h) for h in handles if h in shims]
        tree = [*handles]
        for pid in _descendants(h.pid for h in handles if h.alive()):
            handle = ProcessHandle.of(pid)
            if handle is not None:
                tree.append(handle)
        for handle in tree:
            handle.signal(signal.SIGKILL)
        survivors = _wait_gone(tree, 10)
        for path in sockets:
            if path is not None:
                path.unlink(missing_ok=True)
        if survivors:
            raise DockerdError(f"processes survived SIGKILL: {[h.pid for h in survivors]}")

    def restart(self, timeout: float = 60.0) -> None:
        """Stop dockerd cleanly (if running) and start it again on the same dirs."""
        self.stop()
        self.start(timeout)

    def cleanup(self, *, keep_log: bool = True) -> None:
        """Stop dockerd if needed, unmount everything it left, remove its directories.

        Mounts under the data-root and the private run directory (including
        the data-root's own bind mount) are unmounted deepest first.  The
        directories are removed only once nothing is mounted below them.
        The log in ``base_dir`` is kept unless ``keep_log`` is false.
        """
        try:
            self.stop()
        except DockerdError:
            self.kill()
        roots = [self.data_root] + ([self.run_dir] if self.run_dir else [])
        unmount_under(*roots)
        for root in roots:
            if mounts_under(root):
                raise DockerdError(f"refusing to remove {root}: still mounted")
            if root.exists():
                shutil.rmtree(root)
        self.run_dir = None
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
