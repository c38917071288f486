#!/usr/bin/env python3
"""
txgraph against dockerd's built-in overlay2, side by side, in one run.

    python bench/run.py --out bench/results/$(date +%F).json

Each system under test gets a fresh loop-mounted ext4 filesystem of its own
(a sparse file, ``losetup --find --show``, ``mkfs.ext4``, ``mount``), so
neither inherits a worn filesystem:

 - ``builtin``: a dockerd with its in-process overlay2, data-root on its fs;
 - ``txgraph``: a ``twistd -n txgraph`` (overlay backend, state directory on
   its fs) and a dockerd using it as its graph driver (data-root on the same
   fs);
 - ``txgraph-rbd`` (only with ``--rbd``): the same on the rbd backend, on a
   throwaway Ceph dev cluster.

Every row of issue 5 is measured on each system, alternating the systems
repetition by repetition so that background load hits both alike.  A table
of medians with the ratio txgraph/built-in is printed and the same is
written as JSON (``--out``).  Everything started is stopped by PID, and every
mount and loop device made is removed, on success, on failure and on
SIGINT/SIGTERM.

The processes, images and their caches come from the integration test
harness (``tests/integration/{dockerd,txgraphd,images}.py``), imported, not
copied.  ``--profile DIR`` records each row with py-spy (if installed) on
every txgraph process; the timings of such a run are not the benchmark's.

Run as root (mounts, loop devices, dockerd).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The code under test (this checkout), then the integration harness.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import images  # noqa: E402
from dockerd import Dockerd, mounts_under, unmount_under  # noqa: E402
from txgraphd import Txgraphd  # noqa: E402

BUSYBOX = images.BUSYBOX_TAG
DEBIAN = images.DEBIAN_TAG
RUN = ("run", "--rm", "--network", "none", BUSYBOX, "true")
WRITER = "bench-writer"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Row:
    """
    One line of the table.

    @ivar stat: how the samples become the shown number (median or p90).
    @ivar target: the issue's bound on the ratio txgraph/built-in, or None.
    @ivar bound: an absolute bound on the txgraph value (same unit), or None.
    """

    name: str
    what: str
    unit: str = "ms"
    stat: str = "median"
    target: float | None = None
    bound: float | None = None
    at_least: bool = False  # the bound is a minimum
    builtin: bool = True  # measured on the built-in driver too


def rows_for(args: argparse.Namespace) -> list[Row]:
    """
    The rows this run measures, in table order.
    """
    reps = args.reps
    save_image = "busybox" if args.skip_debian else "Debian"
    rows = [
        Row("load_busybox", f"docker load busybox (2.1 MB), median of {reps}", target=1.10),
    ]
    if not args.skip_debian:
        rows.append(
            Row("load_debian", f"docker load Debian (127 MB), median of {reps}", target=1.10)
        )
    rows += [
        Row("run_rm", f"docker run --rm busybox true, median of {args.runs}", target=1.10),
        Row("run_rm_p90", f"docker run --rm busybox true, p90 of {args.runs}", stat="p90"),
        Row("create", f"docker create, median of {args.runs}"),
        Row("rm", f"docker rm (created container), median of {args.runs}"),
        Row("create_rm", f"docker create + docker rm, median of {args.runs}"),
        Row(
            "commit",
            f"docker commit, container wrote {args.files} files, median of {reps}",
            target=1.20,
        ),
        Row("diff", f"docker diff on it ({args.files} files), median of {reps}", target=1.20),
        Row("save", f"docker save {save_image} > /dev/null, median of {reps}", target=1.10),
        Row(
            "concurrent10",
            f"10 concurrent docker run --rm (wall), median of {reps}",
            target=1.15,
        ),
        Row("socket_exists", f"Exists over the socket, median of {args.calls}",
            bound=1.0, builtin=False),
        Row("socket_get", f"Get (mounted layer) over the socket, median of {args.calls}",
            bound=1.0, builtin=False),
        Row("socket_put", f"Put (refcount > 1) over the socket, median of {args.calls}",
            bound=1.0, builtin=False),
        Row("socket_capabilities",
            f"Capabilities (no state) over the socket, median of {args.calls}",
            builtin=False),
        Row("socket_get_unmounted",
            f"Get of an unmounted layer (mounts; on rbd its device is kept after the "
            f"last Put), median of {args.mount_calls}",
            builtin=False),
        Row("socket_put_last",
            f"last Put (unmounts), median of {args.mount_calls}", builtin=False),
        Row("socket_create_rw",
            f"CreateReadWrite over the socket (rbd: maps the layer too), median of "
            f"{args.mount_calls}", builtin=False),
        Row("socket_remove",
            f"Remove over the socket, median of {args.mount_calls}", builtin=False),
    ]
    layer = "busybox" if args.skip_debian else "Debian"
    rows.append(Row("socket_applydiff", f"ApplyDiff of the {layer} layer tar straight over "
                    f"the socket, median of {reps}", unit="MB/s", builtin=False))
    if args.rbd:
        rows += [
            Row("rbd_raw_write", "raw sequential write to a mapped RBD device (O_DIRECT, "
                "4 MiB blocks), same cluster", unit="MB/s", builtin=False),
            Row("rbd_apply_fraction", "rbd ApplyDiff throughput / raw device write",
                unit="%", bound=60.0, at_least=True, builtin=False),
            Row("rbd_run_vs_overlay", "docker run --rm median, rbd / overlay backend",
                unit="x", bound=2.0, builtin=False),
        ]
    rows.append(Row("rss", "txgraph VmRSS at the end", unit="MB", bound=100.0, builtin=False))
    if args.passes > 1:
        rows.append(Row("rss_growth", f"RSS growth from pass 1 to pass {args.passes}",
                        unit="%", bound=10.0, builtin=False))
    return rows


def percentile(samples: list[float], p: float) -> float:
    """
    The p-th percentile by linear interpolation (numpy's default).
    """
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(row: Row, samples: list[float]) -> float:
    """
    The number shown for a row.
    """
    if row.stat == "p90":
        return percentile(samples, 90)
    return statistics.median(samples)


# ---------------------------------------------------------------------------
# fresh filesystems


def run_cmd(*argv: str, timeout: float = 120) -> str:
    """
    Run a command, raise with its stderr on failure, return its stdout.
    """
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


class LoopFS:
    """
    A fresh ext4 on a loop device over a sparse file, mounted.

    The loop device is whatever ``losetup --find --show`` hands out; it is
    detached on cleanup only if it still points at our file.
    """

    def __init__(self, image: Path, mountpoint: Path, size: int) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size = size
        self.device: str | None = None
        self.mounted = False

    def create(self) -> None:
        """
        Make the file, attach it, make the filesystem, mount it.
        """
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        self.device = run_cmd("losetup", "--find", "--show", str(self.image)).strip()
        # Initialise inode tables and journal now: a lazy init would run in
        # the background (ext4lazyinit) during the measurements.
        run_cmd(
            "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
            self.device, timeout=600,
        )
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        run_cmd("mount", "-t", "ext4", self.device, str(self.mountpoint))
        self.mounted = True

    def _ours(self) -> bool:
        assert self.device is not None
        backing = Path("/sys/block") / Path(self.device).name / "loop" / "backing_file"
        try:
            return os.path.samefile(backing.read_text().strip(), self.image)
        except (OSError, ValueError):
            return False

    def cleanup(self) -> None:
        """
        Unmount everything under the mount point (deepest first), detach the
        loop device, delete the file.
        """
        errors = []
        if mounts_under(self.mountpoint):
            try:
                unmount_under(self.mountpoint)
            except Exception as e:  # still try the rest
                errors.append(e)
        self.mounted = False
        if self.device is not None and not mounts_under(self.mountpoint):
            if self._ours():
                subprocess.run(["losetup", "-d", self.device], check=False)
            self.device = None
        if self.device is None:
            self.image.unlink(missing_ok=True)
        if not mounts_under(self.mountpoint) and self.mountpoint.is_dir():
            shutil.rmtree(self.mountpoint)  # what was on it is gone with it
        if errors:
            raise errors[0]

    def df(self) -> dict[str, int]:
        """
        Size and use of the filesystem, in bytes.
        """
        st = os.statvfs(self.mountpoint)
        return {
            "size": st.f_blocks * st.f_frsize,
            "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
        }


# ---------------------------------------------------------------------------
# systems under test


@dataclass
class System:
    """
    One dockerd (and, for txgraph, its plugin daemon) on its own filesystem.
    """

    key: str
    label: str
    fs: LoopFS
    dockerd: Dockerd
    txgraph: Txgraphd | None = None
    cluster: Any = None  # the Ceph dev cluster of an rbd system
    cpu_pids: list[int] = field(default_factory=list)
    rss_timeline: list[tuple[str, float]] = field(default_factory=list)

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        """
        A docker CLI command (output captured), through the harness.
        """
        return self.dockerd.docker(*args, timeout=timeout, check=check).stdout

    def timed(self, *args: str, timeout: float = 600) -> float:
        """
        Milliseconds a docker CLI command takes, its output captured.
        """
        start = time.perf_counter()
        self.dockerd.docker(*args, timeout=timeout)
        return (time.perf_counter() - start) * 1000

    def cli_env(self) -> dict[str, str]:
        """
        The CLI environment the harness's C{docker()} uses, for commands
        whose output must not be captured (docker save).
        """
        assert self.dockerd.run_dir is not None
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER")},
            "DOCKER_HOST": self.dockerd.host,
            "DOCKER_CONFIG": str(self.dockerd.run_dir / "cli"),
        }

    def find_cpu_pids(self) -> None:
        """
        The long-lived processes whose CPU time is this system's: dockerd,
        its containerd, and txgraph (not the per-container shims and runc,
        which are the same work whatever the storage driver).
        """
        shims = set(self.dockerd.shims())
        self.cpu_pids = [h.pid for h in self.dockerd.processes() if h not in shims]
        if self.txgraph is not None:
            self.cpu_pids.append(self.txgraph.pid)

    def cpu_ms(self) -> float:
        """
        User + system CPU time consumed so far by L{cpu_pids}, in ms.
        """
        total = 0
        for pid in self.cpu_pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total * 1000 / CLK_TCK

    def rss_mb(self) -> float | None:
        """
        The txgraph daemon's VmRSS in MB (10^6 bytes), or None.
        """
        if self.txgraph is None or self.txgraph.process is None:
            return None
        return vm_field(self.txgraph.pid, "VmRSS")


def vm_field(pid: int, name: str) -> float:
    """
    A kB field of /proc/PID/status, in MB (10^6 bytes).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise LookupError(f"{name} not in /proc/{pid}/status")


# ---------------------------------------------------------------------------
# profiling


class Profiler:
    """
    py-spy recording each row on every txgraph process (``--profile``).
    """

    def __init__(self, directory: Path | None, systems: list[System]) -> None:
        self.directory = directory
        self.systems = [s for s in systems if s.txgraph is not None]
        self.pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.pyspy, os.X_OK):
                raise SystemExit("--profile needs py-spy (pip install py-spy)")

    @contextlib.contextmanager
    def row(self, name: str) -> Iterator[None]:
        """
        Record while the body runs.
        """
        if self.directory is None:
            yield
            return
        procs = []
        for system in self.systems:
            assert system.txgraph is not None
            out = self.directory / f"{system.key}-{name}.txt"
            procs.append(
                subprocess.Popen(
                    [
                        self.pyspy, "record", "--pid", str(system.txgraph.pid),
                        "--rate", "250", "--idle", "--threads", "--format", "raw",
                        "--nonblocking", "-o", str(out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.directory / f"{system.key}-{name}.log", "wb"),
                    stdin=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)  # let py-spy attach
        try:
            yield
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---------------------------------------------------------------------------
# the measurements


class Bench:
    """
    Measures every row on every system.
    """

    def __init__(self, args: argparse.Namespace, systems: list[System], profiler: Profiler):
        self.args = args
        self.systems = systems
        self.profiler = profiler
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.cpu_samples: dict[str, dict[str, list[float]]] = {}
        self.notes: list[str] = []
        self.loadavg: list[tuple[str, float]] = []
        self.rss_after_pass: dict[str, list[float]] = {}
        self.layer_tar = (images.busybox_rootfs() if args.skip_debian
                          else images.debian_rootfs())

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def add(self, row: str, system: System, value: float) -> None:
        self.samples.setdefault(row, {}).setdefault(system.key, []).append(value)

    @contextlib.contextmanager
    def cpu(self, row: str, system: System) -> Iterator[None]:
        """
        Record the CPU time the system's daemons spend while the body runs.
        """
        before = system.cpu_ms()
        yield
        self.cpu_samples.setdefault(row, {}).setdefault(system.key, []).append(
            system.cpu_ms() - before
        )

    def checkpoint(self, after: str) -> None:
        self.loadavg.append((after, os.getloadavg()[0]))
        for system in self.systems:
            rss = system.rss_mb()
            if rss is not None:
                system.rss_timeline.append((after, rss))

    def alternating(self, reps: int) -> Iterator[tuple[int, System]]:
        """
        (repetition, system) pairs, the systems in turn at each repetition;
        the order flips every repetition so neither always goes first.
        """
        for rep in range(reps):
            order = self.systems if rep % 2 == 0 else list(reversed(self.systems))
            for system in order:
                yield rep, system

    # -- rows ------------------------------------------------------------------

    def load(self, row: str, image: Path, tag: str) -> None:
        self.log(f"{row}: docker load {image.name} x{self.args.reps}")
        with self.profiler.row(row):
            for _rep, system in self.alternating(self.args.reps):
                if system.docker("images", "-q", tag).strip():
                    system.docker("rmi", tag)  # a repetition or a later pass
                with self.cpu(row, system):
                    ms = system.timed("load", "-i", str(image))
                self.add(row, system, ms)
        self.checkpoint(row)

    def run_rm(self) -> None:
        self.log(f"run_rm: docker run --rm x{self.args.runs} (+1 warm-up)")
        for system in self.systems:
            system.docker(*RUN)  # warm-up: caches, first container of the daemon
        with self.profiler.row("run_rm"):
            for _, system in self.alternating(self.args.runs):
                with self.cpu("run_rm", system):
                    ms = system.timed(*RUN)
                self.add("run_rm", system, ms)
                self.add("run_rm_p90", system, ms)
        self.checkpoint("run_rm")

    def create_rm(self) -> None:
        self.log(f"create_rm: docker create + docker rm x{self.args.runs}")
        with self.profiler.row("create_rm"):
            for _, system in self.alternating(self.args.runs):
                with self.cpu("create_rm", system):
                    start = time.perf_counter()
                    cid = system.docker("create", "--network", "none", BUSYBOX, "true").strip()
                    created = time.perf_counter()
                    system.docker("rm", cid)
                    done = time.perf_counter()
                self.add("create", system, (created - start) * 1000)
                self.add("rm", system, (done - created) * 1000)
                self.add("create_rm", system, (done - start) * 1000)
        self.checkpoint("create_rm")

    def concurrent(self) -> None:
        n = 10
        self.log(f"concurrent10: {n} concurrent docker run --rm x{self.args.reps}")
        with self.profiler.row("concurrent10"):
            for _, system in self.alternating(self.args.reps):
                env = system.cli_env()
                cpu_before = system.cpu_ms()
                start = time.perf_counter()
                procs = [
                    subprocess.Popen(
                        [system.dockerd.docker_cli, *RUN],
                        env=env, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                    for _ in range(n)
                ]
                failures = []
                for proc in procs:
                    _, err = proc.communicate(timeout=600)
                    if proc.returncode != 0:
                        failures.append(err.decode(errors="replace").strip())
                elapsed = (time.perf_counter() - start) * 1000
                self.cpu_samples.setdefault("concurrent10", {}).setdefault(
                    system.key, []).append(system.cpu_ms() - cpu_before)
                if failures:
                    raise RuntimeError(
                        f"{system.key}: {len(failures)} of {n} concurrent runs failed: "
                        f"{failures[0]}"
                    )
                self.add("concurrent10", system, elapsed)
        self.checkpoint("concurrent10")

    def commit_diff(self) -> None:
        files = self.args.files
        script = (
            f"mkdir /data && cd /data && i=0 && while [ $i -lt {files} ]; "
            "do echo $i > f$i; i=$((i+1)); done"
        )
        self.log(f"commit/diff: a container writes {files} files")
        for system in self.systems:
            system.docker("run", "--name", WRITER, "--network", "none", BUSYBOX, "sh", "-c", script)
        self.log(f"commit: docker commit x{self.args.reps}")
        with self.profiler.row("commit"):
            for rep, system in self.alternating(self.args.reps):
                tag = f"bench-commit:{rep}"
                with self.cpu("commit", system):
                    ms = system.timed("commit", WRITER, tag)
                self.add("commit", system, ms)
                system.docker("rmi", tag)
        self.log(f"diff: docker diff x{self.args.reps}")
        with self.profiler.row("diff"):
            for _, system in self.alternating(self.args.reps):
                with self.cpu("diff", system):
                    start = time.perf_counter()
                    out = system.docker("diff", WRITER)
                    self.add("diff", system, (time.perf_counter() - start) * 1000)
                lines = out.count("\n")
                if lines != files + 1:  # A /data and A /data/f0...
                    note = f"{system.key}: docker diff listed {lines} changes for {files} files"
                    if note not in self.notes:
                        self.notes.append(note)
        for system in self.systems:
            system.docker("rm", WRITER)
        self.checkpoint("commit_diff")

    def save(self) -> None:
        tag = BUSYBOX if self.args.skip_debian else DEBIAN
        self.log(f"save: docker save {tag} x{self.args.reps}")
        with self.profiler.row("save"):
            for _, system in self.alternating(self.args.reps):
                with self.cpu("save", system):
                    start = time.perf_counter()
                    subprocess.run(
                        [system.dockerd.docker_cli, "save", tag],
                        env=system.cli_env(), stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
                        timeout=600,
                    )
                    self.add("save", system, (time.perf_counter() - start) * 1000)
        self.checkpoint("save")

    def socket_calls(self) -> None:
        """
        Per-call latency straight over the plugin socket, as dockerd calls
        (one connection per call), on layers made here and removed after.
        """
        for system in self.systems:
            t = system.txgraph
            if t is None:
                continue
            self.log(f"socket: {system.key}: {self.args.calls} calls each")

            def call(method: str, body: dict[str, Any], t: Any = t) -> float:
                start = time.perf_counter()
                status, reply = t.call(f"GraphDriver.{method}", body)
                elapsed = (time.perf_counter() - start) * 1000
                if status != 200 or (isinstance(reply, dict) and reply.get("Err")):
                    raise RuntimeError(f"{method} {body}: {status} {reply}")
                return elapsed

            base = secrets.token_hex(32)
            layer = secrets.token_hex(32)
            with self.profiler.row("socket"):
                call("Create", {"ID": base})
                call("CreateReadWrite", {"ID": layer, "Parent": base})
                try:
                    for _ in range(self.args.calls):
                        self.add("socket_capabilities", system, call("Capabilities", {}))
                    for _ in range(self.args.calls):
                        self.add("socket_exists", system, call("Exists", {"ID": layer}))
                    call("Get", {"ID": layer})  # mounted, refcount 1
                    for _ in range(self.args.calls):
                        self.add("socket_get", system, call("Get", {"ID": layer}))
                        self.add("socket_put", system, call("Put", {"ID": layer}))
                    call("Put", {"ID": layer})  # unmounted
                    for _ in range(self.args.mount_calls):
                        self.add("socket_get_unmounted", system, call("Get", {"ID": layer}))
                        self.add("socket_put_last", system, call("Put", {"ID": layer}))
                    for _ in range(self.args.mount_calls):
                        extra = secrets.token_hex(32)
                        self.add(
                            "socket_create_rw", system,
                            call("CreateReadWrite", {"ID": extra, "Parent": base}),
                        )
                        self.add("socket_remove", system, call("Remove", {"ID": extra}))
                finally:
                    t.call("GraphDriver.Remove", {"ID": layer})
                    t.call("GraphDriver.Remove", {"ID": base})
        self.checkpoint("socket")

    def apply_throughput(self, layer_tar: Path) -> None:
        """
        ApplyDiff of a layer tar straight over the socket (Create, chunked
        ApplyDiff as dockerd sends it, Remove), in MB/s of tar.
        """
        body = layer_tar.read_bytes()
        for _, system in self.alternating(self.args.reps):
            t = system.txgraph
            if t is None:
                continue
            layer = secrets.token_hex(32)
            status, reply = t.call("GraphDriver.Create", {"ID": layer})
            if status != 200:
                raise RuntimeError(f"Create: {status} {reply}")
            try:
                start = time.perf_counter()
                status, raw = t.raw(
                    "GraphDriver.ApplyDiff", body, query=f"id={layer}&parent=", chunked=True
                )
                elapsed = time.perf_counter() - start
                if status != 200:
                    raise RuntimeError(f"ApplyDiff: {status} {raw[:500]!r}")
            finally:
                t.call("GraphDriver.Remove", {"ID": layer})
            self.add("socket_applydiff", system, len(body) / elapsed / 1e6)

    def rbd_raw_write(self, system: System) -> None:
        """
        Sequential O_DIRECT writes to a freshly mapped RBD image of the same
        cluster, mapped the way txgraph maps a layer it extracts into (its
        own rbd-fuse mapper with C{bulk_write}: rbd-fuse, and a direct-I/O
        loop device), in MB/s.
        """
        import mmap

        from txgraph.backends.rbd.mappers.base import ClusterAccess
        from txgraph.backends.rbd.mappers.fuse import FuseMapper

        cluster = system.cluster
        assert cluster is not None
        size = (64 if self.args.quick else 512) << 20
        block = 4 << 20
        image = f"bench-raw-{os.getpid()}"
        env = cluster.process_env()
        subprocess.run(
            ["rbd", "--conf", cluster.conf, "-p", cluster.pool, "create", image,
             "--size", str(size >> 20)],
            env=env, check=True, capture_output=True, timeout=120,
        )
        try:
            mapper = FuseMapper(
                ClusterAccess(conf=cluster.conf, client="admin", keyring=cluster.keyring,
                              pool=cluster.pool, namespace=None, timeout=60),
                tempfile.mkdtemp(prefix="raw-", dir=self.args.workdir),
            )
            mapping = mapper.map(image, readonly=False, tag=".raw", bulk_write=True)
            device = mapping["device"]
            try:
                buf = mmap.mmap(-1, block)
                buf.write(os.urandom(block))
                fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
                try:
                    start = time.perf_counter()
                    for offset in range(0, size, block):
                        os.pwritev(fd, [buf], offset)
                    os.fsync(fd)
                    elapsed = time.perf_counter() - start
                finally:
                    os.close(fd)
            finally:
                mapper.unmap(mapping)
                shutil.rmtree(mapper.workdir, ignore_errors=True)
        finally:
            subprocess.run(
                ["rbd", "--conf", cluster.conf, "-p", cluster.pool, "rm", image],
                env=env, check=False, capture_output=True, timeout=120,
            )
        mbps = size / elapsed / 1e6
        self.add("rbd_raw_write", system, mbps)
        applied = self.samples.get("socket_applydiff", {}).get(system.key)
        if applied:
            self.add("rbd_apply_fraction", system, statistics.median(applied) / mbps * 100)
        overlay = self.samples.get("run_rm", {}).get("txgraph")
        mine = self.samples.get("run_rm", {}).get(system.key)
        if overlay and mine:
            self.add("rbd_run_vs_overlay", system,
                     statistics.median(mine) / statistics.median(overlay))

    def everything(self, busybox: Path, debian: Path | None) -> None:
        """
        Every row, C{--passes} times on the same daemons.  The table is the
        first pass; later passes only show whether txgraph's RSS grows.
        """
        self.checkpoint("start")
        first_pass: dict[str, dict[str, list[float]]] = {}
        first_cpu: dict[str, dict[str, list[float]]] = {}
        rss_after: dict[str, list[float]] = {}
        for n in range(self.args.passes):
            if n:
                self.log(f"pass {n + 1} of {self.args.passes} (only its RSS is kept)")
            self.samples = {}
            self.cpu_samples = {}
            self.load("load_busybox", busybox, BUSYBOX)
            if debian is not None:
                self.load("load_debian", debian, DEBIAN)
            self.run_rm()
            self.create_rm()
            self.commit_diff()
            self.save()
            self.concurrent()
            self.socket_calls()
            self.log(f"socket_applydiff: ApplyDiff over the socket x{self.args.reps}")
            with self.profiler.row("socket_applydiff"):
                self.apply_throughput(self.layer_tar)
            for system in self.systems:
                if system.cluster is not None:
                    self.log(f"rbd_raw_write: {system.key}")
                    self.rbd_raw_write(system)
            for system in self.systems:
                rss = system.rss_mb()
                if rss is not None:
                    rss_after.setdefault(system.key, []).append(rss)
            if n == 0:
                first_pass = self.samples
                first_cpu = self.cpu_samples
        self.samples = first_pass
        self.cpu_samples = first_cpu
        for system in self.systems:
            after = rss_after.get(system.key)
            if after:
                self.add("rss", system, after[-1])
                if len(after) > 1:
                    self.add("rss_growth", system, (after[-1] / after[0] - 1) * 100)
        self.rss_after_pass = rss_after


# ---------------------------------------------------------------------------
# report


def table(rows: list[Row], results: list[dict[str, Any]], systems: list[System]) -> str:
    """
    The table of medians and ratios, as text.
    """
    keys = [s.key for s in systems]
    headers = ["row", *[f"{s.label}" for s in systems], "unit"]
    ratio_keys = [k for k in keys if k != "builtin"]
    headers += [f"{k}/builtin" for k in ratio_keys] + ["target", "met"]
    lines = [headers]
    for row, result in zip(rows, results, strict=False):
        values = []
        for k in keys:
            v = result["values"].get(k)
            values.append("-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}")
        ratios = []
        for k in ratio_keys:
            r = result["ratios"].get(k)
            ratios.append("-" if r is None else f"{r:.2f}")
        if row.target is not None:
            target = f"<= {row.target:.2f}x"
        elif row.bound is not None:
            target = f"{'>=' if row.at_least else '<='} {row.bound:g} {row.unit}"
        else:
            target = ""
        met = result.get("met") or {}
        shown = ",".join("yes" if met[k] else "NO" for k in ratio_keys if k in met)
        lines.append([row.name, *values, row.unit, *ratios, target, shown])
    return _text_table(lines)


def _text_table(lines: list[list[str]]) -> str:
    """
    Rows of cells as aligned text: the first row is the header, the first
    column left-aligned, the others right-aligned.
    """
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths, strict=False))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def cpu_table(results: list[dict[str, Any]], systems: list[System]) -> str:
    """
    The CPU time of each system's daemons per operation (medians), as text.
    """
    keys = [s.key for s in systems]
    ratio_keys = [k for k in keys if k != "builtin"]
    lines = [["row (CPU ms of dockerd+containerd[+txgraph])", *[s.label for s in systems],
              *[f"{k}/builtin" for k in ratio_keys]]]
    for result in results:
        cpu = result.get("cpu_ms_median")
        if not cpu:
            continue
        base = cpu.get("builtin")
        lines.append([
            result["name"],
            *[f"{cpu[k]:.0f}" if k in cpu else "-" for k in keys],
            *[f"{cpu[k] / base:.2f}" if (k in cpu and base) else "-" for k in ratio_keys],
        ])
    return _text_table(lines)


def results_for(rows: list[Row], bench: Bench, systems: list[System]) -> list[dict[str, Any]]:
    results = []
    for row in rows:
        samples = bench.samples.get(row.name, {})
        values = {
            s.key: summarise(row, samples[s.key]) if samples.get(s.key) else None
            for s in systems
        }
        ratios: dict[str, float | None] = {}
        met: dict[str, bool] = {}
        base = values.get("builtin")
        for s in systems:
            if s.key == "builtin":
                continue
            v = values.get(s.key)
            ratio = v / base if (v is not None and base) else None
            ratios[s.key] = ratio
            if row.target is not None and ratio is not None:
                met[s.key] = ratio <= row.target
            elif row.bound is not None and v is not None:
                met[s.key] = v >= row.bound if row.at_least else v <= row.bound
        cpu = bench.cpu_samples.get(row.name, {})
        cpu_medians = {k: statistics.median(v) for k, v in cpu.items() if v}
        results.append(
            {
                "name": row.name,
                "what": row.what,
                "unit": row.unit,
                "stat": row.stat,
                "target_ratio": row.target,
                "bound": row.bound,
                "values": values,
                "ratios": ratios,
                "met": met,
                "samples": {k: v for k, v in samples.items()},
                "cpu_ms_median": cpu_medians or None,
                "cpu_ms_samples": cpu or None,
            }
        )
    return results


def machine() -> dict[str, Any]:
    """
    What the run ran on.
    """
    def first(path: str, prefix: str) -> str | None:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(prefix):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": first("/proc/cpuinfo", "model name"),
        "mem_total": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "df_root": out("df", "-h", "/"),
        "df_workdir": None,
        "python": sys.version.split()[0],
        "dockerd": out("/usr/sbin/dockerd", "--version"),
        "docker_cli": out("/usr/bin/docker", "--version"),
        "txgraph_commit": out("git", "-C", str(REPO), "rev-parse", "HEAD"),
        "txgraph_uncommitted": out(
            "git", "-C", str(REPO), "status", "--porcelain", "txgraph", "migrations"
        ).splitlines(),
    }


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="txgraph against dockerd's built-in overlay2 (run as root).",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one repetition, busybox only, tiny commit")
    parser.add_argument("--reps", type=int, help="repetitions of load/commit/diff/save/"
                        "concurrent (default 3)")
    parser.add_argument("--runs", type=int, help="docker run --rm and create/rm count "
                        "(default 30)")
    parser.add_argument("--files", type=int, help="files the committed container writes "
                        "(default 10000)")
    parser.add_argument("--calls", type=int, help="socket calls per method (default 1000)")
    parser.add_argument("--mount-calls", type=int,
                        help="socket Get/Put pairs that mount, and Create/Remove pairs "
                        "(default 200)")
    parser.add_argument("--passes", type=int,
                        help="run everything this many times on the same daemons; the "
                        "table is pass 1, the RSS growth row compares the last pass's "
                        "RSS with pass 1's (default 2, 1 with --quick)")
    parser.add_argument("--skip-debian", action="store_true",
                        help="no Debian image: no load_debian row, save busybox")
    parser.add_argument("--rbd", action="store_true",
                        help="also measure txgraph's rbd backend on a Ceph dev cluster")
    parser.add_argument("--old", type=Path,
                        help="also measure txgraph's overlay backend from this other source "
                        "tree (e.g. an extracted older commit), as the system txgraph-old, "
                        "alternating with the others: an A/B of two versions in one run")
    parser.add_argument("--threads", type=int, help="txgraph --threads (default: its own)")
    parser.add_argument("--fs-size", default=None,
                        help="size of each fresh filesystem (default 8G, 2G with --quick)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where the sparse files and logs go (default /var/tmp)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the daemons' logs (printed at the end)")
    parser.add_argument("--profile", type=Path,
                        help="record every row with py-spy into this directory "
                        "(the timings of such a run are not the benchmark's)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "reps": 1 if quick else 3,
        "runs": 3 if quick else 30,
        "files": 100 if quick else 10000,
        "calls": 50 if quick else 1000,
        "mount_calls": 10 if quick else 200,
        "passes": 1 if quick else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if quick:
        args.skip_debian = True
    if args.fs_size is None:
        args.fs_size = "2G" if quick else "8G"
    return args


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (mounts, loop devices, dockerd)", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    started = time.time()
    t0 = time.perf_counter()
    host = machine()  # before anything runs: the commit measured is this one
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="txgraph-bench-", dir=args.workdir))
    logs = work / "logs"
    logs.mkdir()
    size = parse_size(args.fs_size)
    print(f"bench: work directory {work}", flush=True)

    busybox = images.busybox_image()
    debian = None if args.skip_debian else images.debian_image()
    rows = rows_for(args)
    systems: list[System] = []
    outcome = {"ok": False}
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_work, work, logs, args, outcome)

        def fresh_fs(key: str) -> LoopFS:
            return _fresh_fs(stack, work, key, size)

        systems.append(_builtin_system(stack, fresh_fs("builtin"), logs))

        # txgraph, overlay backend (an older source tree first, for an A/B)
        if args.old is not None:
            systems.append(_txgraph_system(
                stack, fresh_fs("txgraph-old"), logs, "txgraph-old",
                f"txgraph overlay ({args.old.name})", ["--backend", "overlay"], args,
                env={"PYTHONPATH": str(args.old.resolve())}))
        systems.append(_txgraph_system(stack, fresh_fs("txgraph"), logs, "txgraph",
                                       "txgraph overlay", ["--backend", "overlay"], args))
        if args.rbd:
            systems.append(_rbd_system(stack, fresh_fs("txgraph-rbd"), logs, work, args))

        for system in systems:
            system.find_cpu_pids()
            info = system.docker("info", "--format", "{{.Driver}}").strip()
            print(f"bench: {system.key}: dockerd PID {system.dockerd.pid}, driver {info}"
                  + (f", txgraph PID {system.txgraph.pid}" if system.txgraph else ""),
                  flush=True)

        profiler = Profiler(args.profile, systems)
        bench = Bench(args, systems, profiler)
        load_before = os.getloadavg()
        bench.everything(busybox, debian)
        load_after = os.getloadavg()

        results = results_for(rows, bench, systems)
        wall = time.perf_counter() - t0
        report = {
            "command": command,
            "date": datetime.datetime.fromtimestamp(started).astimezone().isoformat(
                timespec="seconds"),
            "wall_time_s": round(wall, 1),
            "machine": {
                **host,
                "df_workdir": run_cmd("df", "-h", str(args.workdir)).strip(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "loadavg_1min_by_row": bench.loadavg,
            },
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "systems": {
                s.key: {
                    "label": s.label,
                    "filesystem": {"size_bytes": s.fs.size, **s.fs.df()},
                    "txgraph_rss_timeline_mb": s.rss_timeline or None,
                    "txgraph_vmhwm_mb": (vm_field(s.txgraph.pid, "VmHWM")
                                         if s.txgraph else None),
                    "txgraph_rss_after_each_pass_mb": bench.rss_after_pass.get(s.key),
                }
                for s in systems
            },
            "rows": results,
            "notes": bench.notes,
        }
        print()
        print(table(rows, results, systems))
        print()
        print(cpu_table(results, systems))
        for note in bench.notes:
            print(f"note: {note}")
        print(f"\nwall time {wall:.0f} s")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")
        outcome["ok"] = True
    return 0


def _fresh_fs(stack: contextlib.ExitStack, work: Path, key: str, size: int) -> LoopFS:
    """
    A fresh loop-mounted ext4 of C{size} bytes at C{work/key}, cleaned up
    with C{stack}.
    """
    fs = LoopFS(work / f"{key}.img", work / key, size)
    stack.callback(fs.cleanup)
    fs.create()
    return fs


def _builtin_system(stack: contextlib.ExitStack, fs: LoopFS, logs: Path) -> System:
    """
    dockerd with its built-in overlay2 on C{fs}, the reference system.
    """
    d = Dockerd(fs.mountpoint / "dockerd", "overlay2")
    d.log_path = logs / "dockerd-builtin.log"
    stack.callback(d.cleanup)
    d.start()
    return System("builtin", "built-in overlay2", fs, d)


def _txgraph_system(
    stack: contextlib.ExitStack, fs: LoopFS, logs: Path, key: str, label: str,
    extra: list[str], args: argparse.Namespace, env: dict[str, str] | None = None,
) -> System:
    name = f"txgraph-bench-{os.getpid()}-{key}"
    workdir = fs.mountpoint / "txgraph"
    workdir.mkdir()
    threads = ["--threads", str(args.threads)] if args.threads else []
    t = Txgraphd(workdir, name, *extra, *threads)
    t.log_path = logs / f"{key}.log"
    if env:
        t.env.update(env)
    stack.callback(t.cleanup)
    t.start()
    d = Dockerd(fs.mountpoint / "dockerd", name)
    d.log_path = logs / f"dockerd-{key}.log"
    stack.callback(d.cleanup)
    d.start()
    return System(key, label, fs, d, t)


def _rbd_system(
    stack: contextlib.ExitStack, fs: LoopFS, logs: Path, work: Path,
    args: argparse.Namespace,
) -> System:
    from txgraph.testing.ceph import DevCluster

    if not DevCluster.available():
        raise SystemExit("--rbd: Ceph is not installed (ceph-mon, ceph-osd)")
    cluster = DevCluster(work / "ceph")
    stack.callback(cluster.down)
    cluster.up()
    extra = [
        "--backend", "rbd",
        "--rbd-conf", cluster.conf,
        "--rbd-client", cluster.client_id,
        "--rbd-keyring", cluster.client_keyring,
        "--rbd-pool", cluster.pool,
    ]
    system = _txgraph_system(stack, fs, logs, "txgraph-rbd", "txgraph rbd", extra, args)
    system.cluster = cluster
    return system


def _remove_work(
    work: Path, logs: Path, args: argparse.Namespace, outcome: dict[str, bool]
) -> None:
    # Only once nothing is mounted below it (the filesystems' cleanups ran first).
    if mounts_under(work):
        print(f"bench: {work} still has mounts; left in place", file=sys.stderr)
        return
    if args.keep_logs or not outcome["ok"]:
        for path in (work).iterdir():
            if path != logs:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        print(f"bench: logs kept in {logs}")
        return
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
