#!/usr/bin/env python3
"""
What txgraph's metrics (C{--metrics-listen}, L{txgraph.metrics}) cost a
call, measured three ways, always with and without metrics alternately in
one run (rounds of each in turn; the median of the rounds' results):

 - ``dispatch``: the front ends' choke point, L{txgraph.metrics.timed},
   around an already-fired Deferred, in-process: what the instrumentation
   adds to every call (off: one global lookup; on: two clock reads, a
   callback, one histogram observe and one counter inc; per round, the
   best of 3 runs);
 - ``exists``: C{GraphDriver.Exists} over the plugin socket (one kept-alive
   connection, as dockerd's) to two real daemons started side by side, one
   with C{--metrics-listen tcp:0:interface=127.0.0.1}, one without;
 - ``rss``: each daemon's resident memory (VmRSS) once ready, and after
   the calls.

    python bench/metrics.py [--calls 2000] [--rounds 8] [--out FILE.json]

Run as root (the daemons are txgraph's; their state is in a temporary
directory, removed at the end, and they are stopped by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from twisted.internet.defer import succeed  # noqa: E402

from txgraph import metrics  # noqa: E402
from txgraph.engine import UnixHTTPConnection  # noqa: E402


def per_call_ns(fn: Callable[[], object], n: int) -> float:
    """
    ns per call of C{fn}: the best of 3 runs of C{n} calls (the machine is
    shared; the best run is the one least disturbed).
    """
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e9


def dispatch(rounds: int, n: int) -> dict[str, list[float]]:
    """
    ns per L{metrics.timed} call, metrics off and on, alternately.
    """
    def classify(result: Any) -> tuple[str, str | None]:
        return "200", None

    def call() -> None:
        metrics.timed("graphdriver", "GraphDriver.Exists", lambda: succeed(None), classify)

    out: dict[str, list[float]] = {"dispatch_off_ns": [], "dispatch_on_ns": []}
    for _ in range(rounds):
        metrics.disable()
        out["dispatch_off_ns"].append(per_call_ns(call, n))
        metrics.enable()
        out["dispatch_on_ns"].append(per_call_ns(call, n))
    metrics.disable()
    return out


class Daemon:
    """
    A txgraph daemon of the benchmark's own.
    """

    def __init__(self, work: Path, name: str, *extra: str) -> None:
        self.dir = work / name
        self.dir.mkdir()
        self.socket = self.dir / "plugin.sock"
        self.log = self.dir / "txgraph.log"
        twistd = str(Path(sys.executable).parent / "twistd")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "txgraph", "--listen", f"unix:{self.socket}:mode=660",
                 "--state-dir", str(self.dir / "state"), *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        deadline = time.monotonic() + 60
        while not self.socket.exists() or not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"txgraph did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.conn = UnixHTTPConnection(str(self.socket))

    def _answers(self) -> bool:
        try:
            conn = UnixHTTPConnection(str(self.socket), timeout=5)
            conn.request("POST", "/GraphDriver.Status", body=b"{}")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def exists(self) -> None:
        self.conn.request("POST", "/GraphDriver.Exists", body=b'{"ID": "' + b"a" * 64 + b'"}\n')
        response = self.conn.getresponse()
        response.read()
        assert response.status == 200

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1))

    def stop(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def over_socket(rounds: int, n: int) -> dict[str, Any]:
    """
    Exists over the socket to a daemon with and one without metrics,
    alternately; and their RSS.
    """
    work = Path(tempfile.mkdtemp(prefix="txgraph-bench-metrics-"))
    daemons: dict[str, Daemon] = {}
    try:
        daemons["off"] = Daemon(work, "off")
        daemons["on"] = Daemon(work, "on", "--metrics-listen", "tcp:0:interface=127.0.0.1")
        result: dict[str, Any] = {
            "rss_ready_kib": {k: d.rss_kib() for k, d in daemons.items()},
            "exists_off_us": [], "exists_on_us": [],
        }
        for d in daemons.values():  # warm up
            for _ in range(200):
                d.exists()
        for _ in range(rounds):
            for key in ("off", "on"):
                d = daemons[key]
                samples = []
                for _ in range(n):
                    start = time.perf_counter_ns()
                    d.exists()
                    samples.append((time.perf_counter_ns() - start) / 1000)
                result[f"exists_{key}_us"].append(statistics.median(samples))
        result["rss_after_kib"] = {k: d.rss_kib() for k, d in daemons.items()}
        return result
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default 8)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/metrics.py needs root", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    results.update(dispatch(args.rounds, args.calls * 25))
    results.update(over_socket(args.rounds, args.calls))
    summary = {
        "dispatch_off_ns": statistics.median(results["dispatch_off_ns"]),
        "dispatch_on_ns": statistics.median(results["dispatch_on_ns"]),
        "exists_off_us": statistics.median(results["exists_off_us"]),
        "exists_on_us": statistics.median(results["exists_on_us"]),
        "rss_ready_kib": results["rss_ready_kib"],
        "rss_after_kib": results["rss_after_kib"],
    }
    summary["dispatch_added_ns"] = summary["dispatch_on_ns"] - summary["dispatch_off_ns"]
    summary["exists_ratio_on_off"] = summary["exists_on_us"] / summary["exists_off_us"]
    print(f"dispatch (metrics.timed)  off {summary['dispatch_off_ns']:8.0f} ns   "
          f"on {summary['dispatch_on_ns']:8.0f} ns   added {summary['dispatch_added_ns']:.0f} ns")
    print(f"Exists over the socket    off {summary['exists_off_us']:8.1f} us   "
          f"on {summary['exists_on_us']:8.1f} us   ratio {summary['exists_ratio_on_off']:.3f}")
    print(f"per-round Exists medians  off {[round(x, 1) for x in results['exists_off_us']]}")
    print(f"                          on  {[round(x, 1) for x in results['exists_on_us']]}")
    for when in ("rss_ready_kib", "rss_after_kib"):
        r = summary[when]
        print(f"{when:<25} off {r['off'] / 1024:6.1f} MiB   on {r['on'] / 1024:6.1f} MiB   "
              f"added {(r['on'] - r['off']) / 1024:.1f} MiB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rounds": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
