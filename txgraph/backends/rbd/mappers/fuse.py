"""
rbd-fuse and a loop device (L{FuseMapper}): one C{rbd-fuse -r IMAGE} per
mapping, so that every unmap releases its image (see the package's
docstring for why), and C{losetup} on the file it exposes.  Needs only FUSE
and loop devices.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time

from txgraph import mounts
from txgraph.backends.rbd.mappers.base import (
    ClusterAccess,
    Mapper,
    Mapping,
    admin_socket_command,
    device_readonly,
    run,
    unmount_device,
    wait_for_device,
)
from txgraph.errors import BackendError

#: ioctl(2) request that detaches a loop device (linux/loop.h).
LOOP_CLR_FD = 0x4C01

#: Where rbd-fuse processes of layer mappings keep their admin sockets.
ASOK_ROOT = "/run/txgraph/asok"
#: the largest write request libfuse 2 (rbd-fuse's) negotiates with the kernel
FUSE_MAX_WRITE = 128 << 10



def _process_args(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # A zombie has exited: it holds nothing any more.
    if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X"):
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def _process_start(pid: int) -> int | None:
    """
    When a process started (clock ticks after boot, field 22 of
    C{/proc/<pid>/stat}): with the pid, it names one process for good.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def detach_loop(device: str) -> None:
    """
    Detach a loop device (LOOP_CLR_FD); one that is already free is fine.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise BackendError(f"detach loop device {device}: {e.strerror}") from None
    finally:
        os.close(fd)


class FuseMapper(Mapper):
    """
    One C{rbd-fuse -r IMAGE} per mapping, mounted at C{<workdir>/fuse/<tag>},
    and a loop device on the file it exposes.  The tag directory is how
    mappings are found again after a crash: a loop device whose backing
    file is C{<workdir>/fuse/<tag>/<image>} belongs to that mapping.
    """

    name = "fuse"

    def __init__(self, access: ClusterAccess, workdir: str) -> None:
        super().__init__(access, workdir)
        self.fuse_root = os.path.join(workdir, "fuse")
        self.log_root = os.path.join(workdir, "log")
        # <pid_root>/<tag>: "<pid> <start time>" of the rbd-fuse serving
        # that tag, so that finding it needs no pass over /proc.
        self.pid_root = os.path.join(workdir, "pid")
        # rbd-fuse processes this process started, so that they are reaped.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def unavailable(self) -> str | None:
        for tool, package in (("rbd-fuse", "rbd-fuse"), ("losetup", "util-linux")):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (install {package})"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing (no FUSE in this kernel or container)"
        if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
            return "there are no loop devices (/dev/loop-control is missing)"
        return None

    def _dir(self, tag: str) -> str:
        if not tag or "/" in tag or tag in (".", ".."):
            raise BackendError(f"bad mapping tag {tag!r}")
        return os.path.join(self.fuse_root, tag)

    def _fuse_processes(self) -> dict[str, list[int]]:
        """
        Live rbd-fuse processes serving a directory of ours, by directory
        (one pass over /proc, reading only the short C{comm} of others).
        """
        found: dict[str, list[int]] = {}
        prefix = self.fuse_root + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() != b"rbd-fuse":
                        continue
            except OSError:
                continue
            args = _process_args(int(entry))
            if not args:
                continue
            for arg in args:
                if arg.startswith(prefix):
                    found.setdefault(arg, []).append(int(entry))
        return found

    def _fuse_pids(self, directory: str) -> list[int]:
        """
        Live rbd-fuse processes serving C{directory}: the one its pid
        record names, if that one still runs; else, if the directory is
        mounted (by an rbd-fuse that has no record: a crash between its
        start and the record), whatever a pass over /proc finds; else none.
        A pass over /proc reads every process's name (~1.5 ms with 80
        processes, tens of ms on a busy host), and a docker run used to
        make 15 of them.
        """
        recorded = self._recorded_pid(directory)
        if recorded is not None:
            return [recorded]
        if not mounts.is_mountpoint(directory):
            return []
        return self._fuse_processes().get(directory, [])

    def _mapping_dir(self, mapping: Mapping) -> str | None:
        """
        The FUSE directory of a mapping: recorded, or named by its tag.
        """
        directory: str | None = mapping.get("fuse_dir")
        if directory:
            return directory
        return self._dir(mapping["tag"]) if mapping.get("tag") else None

    def _pid_file(self, directory: str) -> str:
        return os.path.join(self.pid_root, os.path.basename(directory))

    def _record_pid(self, directory: str, pid: int) -> None:
        start = _process_start(pid)
        if start is None:
            return
        os.makedirs(self.pid_root, mode=0o700, exist_ok=True)
        path = self._pid_file(directory)
        with open(path + ".tmp", "w") as f:
            f.write(f"{pid} {start}\n")
        os.replace(path + ".tmp", path)

    def _recorded_pid(self, directory: str) -> int | None:
        """
        The pid its record names, if that process (the same one: its start
        time matches) is a live rbd-fuse serving C{directory}.
        """
        try:
            with open(self._pid_file(directory)) as f:
                pid_text, start_text = f.read().split()
            pid, start = int(pid_text), int(start_text)
        except (OSError, ValueError):
            return None
        if _process_start(pid) != start or directory not in (_process_args(pid) or []):
            return None
        return pid

    def start(self, image: str, *, tag: str) -> Mapping:
        """
        Start the mapping's rbd-fuse (it opens its image only when losetup
        opens the file, so the image need not exist yet).
        """
        what = f"map {self.access.image_spec(image)} with rbd-fuse"
        directory = self._dir(tag)
        # Leftovers of an earlier attempt with this tag go first.
        for old in self.find(image, tag):
            self.unmap(old)
        if mounts.is_mountpoint(directory):
            self._stop_fuse(directory, None, what)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.makedirs(self.log_root, mode=0o700, exist_ok=True)
        command = [
            "rbd-fuse",
            *self.access.cli_args(),
            # Fail, rather than retry for 5 minutes, if the cluster is down.
            "--client_mount_timeout",
            str(max(1, int(self.access.timeout))),
            "-p",
            self.access.pool,
        ]
        if self.access.namespace:
            command += ["-s", self.access.namespace]
        if not tag.startswith("."):
            # A layer's own mapping keeps an admin socket, for its librbd
            # performance counters (bytes read: see read_counters).
            asok = self.admin_socket(directory)
            os.makedirs(os.path.dirname(asok), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(asok)
            command += ["--admin_socket", asok]
        # FUSE requests of up to 128 KiB (libfuse 2's largest) rather than
        # a page each.
        command += ["-o", f"big_writes,max_write={FUSE_MAX_WRITE}"]
        command += ["-r", image, directory, "-f"]
        with open(self._log_path(tag), "wb") as log:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: it must outlive a txgraph restart
                    # (mounted containers depend on it) and not get the
                    # terminal's signals.
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise BackendError(f"{what}: cannot start rbd-fuse: {e.strerror}") from None
        with self._lock:
            self._children[proc.pid] = proc
        mapping: Mapping = {
            "mapper": self.name,
            "device": None,
            "image": image,
            "readonly": False,
            "tag": tag,
            "fuse_dir": directory,
            "pid": proc.pid,
        }
        try:
            self._record_pid(directory, proc.pid)
        except BaseException:
            self.unmap(mapping)
            raise
        return mapping

    def _log_path(self, tag: str) -> str:
        return os.path.join(self.log_root, f"{tag}.log")

    def map(
        self,
        image: str,
        *,
        readonly: bool,
        tag: str,
        bulk_write: bool = False,
        started: Mapping | None = None,
    ) -> Mapping:
        mapping = started if started is not None else self.start(image, tag=tag)
        what = f"map {self.access.image_spec(image)} with rbd-fuse"
        log_path = self._log_path(tag)
        with self._lock:
            proc = self._children.get(mapping["pid"])
        mapping = {**mapping, "readonly": readonly}
        try:
            if proc is None:
                raise BackendError(f"{what}: rbd-fuse exited: {self._log_tail(log_path)}")
            directory = mapping["fuse_dir"]
            path = os.path.join(directory, image)
            deadline = time.monotonic() + self.access.timeout
            # Wait for the mount in the mount table, never by looking into
            # it: a FUSE request blocks until rbd-fuse answers, and it may
            # never answer if the cluster is down.  losetup's open below
            # waits for rbd-fuse to connect, under a timeout (and can be
            # killed).  Woken by the table's change; the timer only checks
            # that rbd-fuse still runs.
            with mounts.MountWatch() as watch:
                while not mounts.is_mountpoint(directory):
                    if proc.poll() is not None:
                        raise BackendError(
                            f"{what}: rbd-fuse exited (status {proc.returncode}): "
                            f"{self._log_tail(log_path)}"
                        )
                    if time.monotonic() > deadline:
                        raise BackendError(
                            f"{what}: rbd-fuse did not mount within "
                            f"{self.access.timeout:g} s: {self._log_tail(log_path)}"
                        )
                    watch.wait(0.05)
            args = ["losetup", "--find", "--show"]
            if bulk_write:
                # Direct I/O to the FUSE file: a block reaches librbd in one
                # request rather than through a second page cache (measured:
                # buffered 1 MiB writes + fsync 230 -> 446 MB/s).  Reads lose
                # the FUSE file's readahead that way (reading a tree took
                # twice as long), so only extractions get it.
                args.append("--direct-io=on")
            if readonly:
                args.append("--read-only")
            try:
                device = run([*args, "--", path], what, self.access.timeout).strip()
            except BackendError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.5)
                if proc.returncode is not None:
                    raise BackendError(
                        f"{what}: rbd-fuse exited (status {proc.returncode}): "
                        f"{self._log_tail(log_path)}"
                    ) from None
                raise
            mapping["device"] = device
            wait_for_device(device, self.access.timeout, what)
        except BaseException:
            self.unmap(mapping)
            raise
        return mapping

    @staticmethod
    def admin_socket(directory: str) -> str:
        """
        The admin socket of the rbd-fuse serving C{directory}: under
        C{/run/txgraph/asok/}, named by a hash of the directory (a UNIX
        socket path must stay under 108 bytes; state directories may not).
        """
        digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:24]
        return os.path.join(ASOK_ROOT, f"{digest}.asok")

    def read_counters(self, mapping: Mapping) -> dict[str, int] | None:
        """
        librbd's counters of the mapped image, from its rbd-fuse's admin
        socket: C{rd_bytes} (bytes read through librbd, from the image's
        own objects or its parents') and C{rd} (reads); None if the
        mapping has no admin socket (temporary, or made by an older
        txgraph) or does not answer.
        """
        directory = self._mapping_dir(mapping)
        image = mapping.get("image")
        if not directory or not image:
            return None
        try:
            dump = admin_socket_command(self.admin_socket(directory), {"prefix": "perf dump"})
        except (OSError, ValueError):
            return None
        for key, values in dump.items() if isinstance(dump, dict) else ():
            if key.startswith("librbd-") and key.endswith(f"-{image}") and isinstance(values, dict):
                return {"rd_bytes": int(values.get("rd_bytes", 0)), "rd": int(values.get("rd", 0))}
        return None

    def _log_tail(self, path: str) -> str:
        try:
            with open(path, "rb") as f:
                lines = [
                    ln.strip()
                    for ln in f.read()[-4096:].decode("utf-8", "replace").splitlines()
                    if ln.strip()
                ]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log output"

    def unmap(self, mapping: Mapping) -> None:
        image = mapping.get("image", "")
        directory = self._mapping_dir(mapping)
        if directory is None:
            return
        what = f"unmap {self.access.image_spec(image)} ({directory})"
        path = os.path.join(directory, image)
        # Only loop devices that really are backed by this mapping's file:
        # a recorded device number may belong to someone else by now.
        for device, backing in mounts.loop_backing_files().items():
            if backing == path:
                unmount_device(device)
                detach_loop(device)
        if not self._stop_fuse(directory, mapping.get("pid"), what):
            self.dead(image)
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise BackendError(f"{what}: cannot remove {directory}: {e.strerror}") from None
        tag = os.path.basename(directory)
        for leftover in (
            os.path.join(self.log_root, f"{tag}.log"),
            self.admin_socket(directory),
            self._pid_file(directory),
        ):
            with contextlib.suppress(OSError):
                os.unlink(leftover)

    def _stop_fuse(self, directory: str, pid: int | None, what: str) -> bool:
        """
        Unmount the FUSE mount (rbd-fuse then closes its image and exits)
        and wait for its process to be gone.  False if the process had
        died before, or had to be killed: it may have left its lock.
        """
        pids = set(self._fuse_pids(directory))
        with self._lock:
            child = self._children.get(pid) if pid is not None else None
        clean = True
        if child is not None:
            if child.poll() is None:
                pids.add(child.pid)
            else:
                clean = False
                with self._lock:
                    self._children.pop(child.pid, None)
        mounted = mounts.is_mountpoint(directory)
        if mounted and not pids:
            clean = False
        deadline = time.monotonic() + self.access.timeout
        if mounted:
            # Retries while a loop device detached a moment ago still holds
            # the file, then detaches lazily as a last resort.
            mounts.unmount(directory)
        elif child is not None and child.poll() is None:
            # Started and not mounted yet (a mapping given up while rbd-fuse
            # starts): it has not opened its image; stop it.
            child.terminate()
        for p in pids:
            clean = self._wait_exit(p, deadline, what) and clean
        if mounts.is_mountpoint(directory):
            # It mounted meanwhile, and its end left the mount behind.
            mounts.unmount(directory)
        return clean

    def _wait_exit(self, pid: int, deadline: float, what: str) -> bool:
        """
        Wait for a process to exit; kill it if it does not in time (then
        False).
        """
        with self._lock:
            child = self._children.get(pid)
        signalled = False
        # A pidfd becomes readable when the process exits: sleep until then
        # rather than polling on a timer.
        exits = select.poll()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # Gone already, or a kernel without pidfds: the timer it is.
            pidfd = -1
        else:
            exits.register(pidfd, select.POLLIN)
        try:
            while True:
                if child is not None:
                    if child.poll() is not None:
                        with self._lock:
                            self._children.pop(pid, None)
                        return not signalled
                elif _process_args(pid) is None:
                    return not signalled
                if time.monotonic() > deadline:
                    if signalled:
                        raise BackendError(f"{what}: rbd-fuse (pid {pid}) does not exit")
                    # It should have exited once unmounted; make sure it does.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    signalled = True
                    deadline = time.monotonic() + 5
                if pidfd >= 0:
                    # Exited (readable), or the timer to check the deadline.
                    exits.poll(50)
                else:
                    time.sleep(0.005)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def find(self, image: str, tag: str | None = None) -> list[Mapping]:
        if tag is not None:
            directories = [self._dir(tag)]
        else:
            try:
                directories = [
                    os.path.join(self.fuse_root, n) for n in sorted(os.listdir(self.fuse_root))
                ]
            except FileNotFoundError:
                directories = []
        loops = mounts.loop_backing_files()
        # One pass over /proc when looking at every tag (gc, start); one
        # tag's process is found from its record.
        processes = self._fuse_processes() if tag is None else None
        found = []
        for directory in directories:
            path = os.path.join(directory, image)
            devices = sorted(d for d, b in loops.items() if b == path)
            pids = (
                processes.get(directory, []) if processes is not None
                else self._fuse_pids(directory)
            )
            if not devices and not pids:
                if tag is None or not mounts.is_mountpoint(directory):
                    continue
            # Another image's mapping under the same tag is not this one.
            if not devices and pids and not self._serves(pids[0], image):
                continue
            candidates: list[str | None] = [*devices] or [None]
            for device in candidates:
                found.append(
                    {
                        "mapper": self.name,
                        "device": device,
                        "image": image,
                        "readonly": device_readonly(device) if device else True,
                        "tag": os.path.basename(directory),
                        "fuse_dir": directory,
                        "pid": pids[0] if pids else None,
                        "alive": bool(device and pids),
                    }
                )
        return found

    def _serves(self, pid: int, image: str) -> bool:
        args = _process_args(pid) or []
        return any(a == "-r" and i + 1 < len(args) and args[i + 1] == image for i, a in enumerate(args))

    def alive(self, mapping: Mapping) -> bool:
        directory = mapping.get("fuse_dir")
        device = mapping.get("device")
        if not directory or not device:
            return False
        path = os.path.join(directory, mapping.get("image", ""))
        return mounts.loop_backing_file(device) == path and bool(self._fuse_pids(directory))

    def cleanup_tags(self, prefix: str) -> None:
        try:
            names = os.listdir(self.fuse_root)
        except FileNotFoundError:
            return
        loops = mounts.loop_backing_files()
        for name in names:
            if not name.startswith(prefix):
                continue
            directory = os.path.join(self.fuse_root, name)
            for device, backing in loops.items():
                if os.path.dirname(backing) == directory:
                    unmount_device(device)
                    detach_loop(device)
            self._stop_fuse(directory, None, f"clean up mapping {directory}")
            try:
                os.rmdir(directory)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.unlink(self._pid_file(directory))

    def reap(self) -> None:
        """
        Collect rbd-fuse children that have exited.
        """
        with self._lock:
            for pid, child in list(self._children.items()):
                if child.poll() is not None:
                    del self._children[pid]
