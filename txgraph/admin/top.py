"""
C{txgraph-admin top}: a Grafana-free quick look at the running daemon's
busiest operations, from its metrics (L{txgraph.metrics}).

It reads the metrics through the admin socket (C{POST /metrics}), not
C{--metrics-listen}'s endpoint: the admin socket is found from
C{--state-dir} alone, is root's only, and answers whatever endpoint (or
firewall) the metrics were given.  The daemon must count, though: it does
so only when started with C{--metrics-listen}.

Each refresh takes two samples C{--interval} apart and shows, per front
end and method, the calls per second between them, the calls since start,
the errors, and the latency: mean, and p50/p90 estimated from the
histogram's buckets as Prometheus's C{histogram_quantile} does (linear
within a bucket), over the interval, or since start (marked C{*}) for a
method that had no call in it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from txgraph.admin.client import Daemon
from txgraph.errors import TxgraphError

Key = tuple[str, str]


@dataclass
class Histogram:
    """
    One method's latency histogram: count, sum, and the cumulative
    buckets C{(le, count)} in increasing C{le} (the last is +Inf).
    """

    count: float = 0.0
    total: float = 0.0
    buckets: list[tuple[float, float]] = field(default_factory=list)

    def minus(self, before: Histogram | None) -> Histogram:
        """
        What was observed since C{before}.
        """
        if before is None:
            return self
        old = dict(before.buckets)
        return Histogram(
            self.count - before.count,
            self.total - before.total,
            [(le, n - old.get(le, 0.0)) for le, n in self.buckets],
        )

    def quantile(self, q: float) -> float | None:
        """
        The C{q}-quantile, interpolated within its bucket (None if empty);
        in the +Inf bucket, the highest finite bound.
        """
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower
                if n == below:
                    return le
                return lower + (le - lower) * (rank - below) / (n - below)
            lower, below = le, n
        return lower


@dataclass
class Sample:
    """
    What one scrape says: per (front end, method), the latency histogram
    and the errors; and a few gauges.
    """

    histograms: dict[Key, Histogram] = field(default_factory=dict)
    errors: dict[Key, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)


def parse(text: str) -> Sample:
    """
    A L{Sample} of a text exposition.
    """
    from prometheus_client.parser import text_string_to_metric_families

    sample = Sample()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            key = (labels.get("frontend", ""), labels.get("method", ""))
            if s.name.startswith("txgraph_request_duration_seconds"):
                h = sample.histograms.setdefault(key, Histogram())
                if s.name.endswith("_count"):
                    h.count = s.value
                elif s.name.endswith("_sum"):
                    h.total = s.value
                elif s.name.endswith("_bucket"):
                    h.buckets.append((float(labels["le"]), s.value))
            elif s.name == "txgraph_request_errors_total":
                sample.errors[key] = sample.errors.get(key, 0.0) + s.value
            elif s.name == "txgraph_layers":
                sample.gauges["layers"] = sample.gauges.get("layers", 0.0) + s.value
            elif s.name in ("txgraph_mounts", "txgraph_references", "process_resident_memory_bytes"):
                sample.gauges[s.name] = s.value
    for h in sample.histograms.values():
        h.buckets.sort()
    return sample


@dataclass
class Row:
    """
    One line of C{top}.
    """

    frontend: str
    method: str
    rate: float
    total: float
    errors: float
    mean: float | None
    p50: float | None
    p90: float | None
    since_start: bool


def rows(now: Sample, before: Sample | None, interval: float) -> list[Row]:
    """
    Every method seen, busiest (by rate over the interval) first, then
    by calls since start.
    """
    result = []
    for key, h in now.histograms.items():
        if h.count <= 0:
            continue
        delta = h.minus(before.histograms.get(key) if before is not None else None)
        since_start = before is None or delta.count <= 0
        window = h if since_start else delta
        rate = 0.0 if before is None or interval <= 0 else delta.count / interval
        result.append(
            Row(
                key[0], key[1], rate, h.count, now.errors.get(key, 0.0),
                window.total / window.count, window.quantile(0.5), window.quantile(0.9),
                since_start,
            )
        )
    result.sort(key=lambda r: (-r.rate, -r.total, r.frontend, r.method))
    return result


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.2f}"


def render(now: Sample, table: list[Row], interval: float, limit: int) -> str:
    """
    The screen: a summary line and the table.
    """
    g = now.gauges
    rss = g.get("process_resident_memory_bytes")
    lines = [
        f"txgraph top: every {interval:g} s; layers {g.get('layers', 0):.0f}, mounts "
        f"{g.get('txgraph_mounts', 0):.0f}, references {g.get('txgraph_references', 0):.0f}"
        + (f", RSS {rss / 2**20:.1f} MiB" if rss is not None else ""),
        f"{'FRONTEND':<12} {'METHOD':<28} {'CALLS/S':>8} {'CALLS':>9} {'ERRORS':>7} "
        f"{'MEAN ms':>9} {'P50 ms':>9} {'P90 ms':>9}",
    ]
    for r in table[:limit]:
        mark = "*" if r.since_start else " "
        lines.append(
            f"{r.frontend:<12} {r.method:<28} {r.rate:>8.1f} {r.total:>9.0f} {r.errors:>7.0f} "
            f"{_ms(r.mean):>9}{mark}{_ms(r.p50):>9} {_ms(r.p90):>9}"
        )
    if not table:
        lines.append("(no calls yet)")
    lines.append("* latency since start: no call in the interval")
    return "\n".join(lines) + "\n"


def scrape(daemon: Daemon) -> Sample:
    """
    The running daemon's metrics, through its admin socket.
    """
    return parse(b"".join(daemon.stream("/metrics")).decode())


def cmd_top(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """
    Refresh the table every C{--interval} seconds, C{--iterations} times
    (C{--once}: one), or until interrupted.
    """
    if args.interval <= 0:
        raise TxgraphError("--interval must be positive")
    daemon = Daemon(args.state_dir)
    if not daemon.available():
        raise TxgraphError(
            f"no txgraph answers on {daemon.path}: top needs the running daemon "
            "(started with --metrics-listen)"
        )
    iterations = 1 if args.once else args.iterations
    clear = out.isatty()
    before = scrape(daemon)
    done = 0
    try:
        while iterations is None or done < iterations:
            time.sleep(args.interval)
            now = scrape(daemon)
            screen = render(now, rows(now, before, args.interval), args.interval, args.limit)
            out.write(("\x1b[H\x1b[2J" if clear else "") + screen)
            out.flush()
            before = now
            done += 1
    except KeyboardInterrupt:
        pass
    return 0
