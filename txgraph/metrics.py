"""
txgraph's Prometheus metrics: what each layer of the daemon counts, and
the cheap hooks it counts with.

Metrics are off unless C{twistd txgraph --metrics-listen} turns them on
(L{enable}); while off, L{current} is None, C{prometheus_client} is not
even imported, and each instrumented point costs one module-global lookup.
While on, each point is one or two C{observe()}/C{inc()} calls on label
children cached per label set (L{Metrics.request}): a few microseconds,
measured by C{bench/micro.py metrics} (docs/performance.md).

Each front end records its calls at one choke point, its dispatch
(L{timed}); the database thread times its commits and group sizes, the
reactor-lag watch its lag, the rbd cluster link its calls.  What the
daemon holds in memory (layers by state, references, mounts, mapped
devices) is not counted here but read when scraped
(L{txgraph.api.metrics.StateCollector}).

Labels are low-cardinality by construction: a front end, a method name of
the protocol, a status code, an error class, a durability, an rbd
operation's name, a gc finding's kind.  Never a layer ID, snapshot key or
image name.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred

#: The recorder while metrics are on, else None.
current: Metrics | None = None

#: Request latency buckets, in seconds: from an Exists (tens of
#: microseconds) to an ApplyDiff of a large layer (minutes).
REQUEST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
#: Reactor lag buckets, in seconds (the watch ticks every 0.1 s).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Database commit buckets, in seconds (a FULL commit is an fsync).
COMMIT_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
#: Write group sizes (writes committed in one transaction).
GROUP_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
#: Cluster call buckets, in seconds.
CLUSTER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: A request's outcome: its status code and, for an error, its kind.
Classify = Callable[[Any], "tuple[str, str | None]"]


class Metrics:
    """
    The daemon's metrics, in a registry of their own (L{registry}), which
    the metrics endpoint and the admin socket render.
    """

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )
        from prometheus_client.process_collector import ProcessCollector

        # No C{_created} series: txgraph owns its process.
        disable_created_metrics()

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.request_duration = Histogram(
            "txgraph_request_duration_seconds",
            "Time to answer a front-end call, by front end and method.",
            ["frontend", "method"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "txgraph_requests",
            "Front-end calls answered, by front end, method and status code.",
            ["frontend", "method", "code"], registry=r,
        )
        self.errors = Counter(
            "txgraph_request_errors",
            "Front-end calls that failed, by front end, method and kind of error.",
            ["frontend", "method", "kind"], registry=r,
        )
        self.applied_bytes = Counter(
            "txgraph_applied_bytes", "Layer tar bytes received by ApplyDiff.", registry=r
        )
        self.diffed_bytes = Counter(
            "txgraph_diffed_bytes", "Layer tar bytes sent by Diff.", registry=r
        )
        self.reactor_lag = Histogram(
            "txgraph_reactor_lag_seconds",
            "How late the reactor ran a 0.1 s timer (time it spent busy).",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.db_commit = Histogram(
            "txgraph_db_commit_duration_seconds",
            "Time of a database commit, by durability (FULL: fsynced, NORMAL: not).",
            ["durability"], buckets=COMMIT_BUCKETS, registry=r,
        )
        self.db_group = Histogram(
            "txgraph_db_write_group_size",
            "Writes committed together in one database transaction.",
            buckets=GROUP_BUCKETS, registry=r,
        )
        self.cluster_duration = Histogram(
            "txgraph_cluster_call_duration_seconds",
            "Time of an rbd backend operation on the cluster, by operation.",
            ["op"], buckets=CLUSTER_BUCKETS, registry=r,
        )
        self.cluster_timeouts = Counter(
            "txgraph_cluster_timeouts",
            "rbd backend operations that timed out waiting for the cluster, by operation.",
            ["op"], registry=r,
        )
        self.trash_waiting = Gauge(
            "txgraph_rbd_trash_waiting_images",
            "Removed images the last rbd trash purge could not purge yet.",
            registry=r,
        )
        self.gc_findings = Counter(
            "txgraph_gc_findings",
            "Orphans found by gc runs (dry or --apply), by kind.",
            ["kind"], registry=r,
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def request(
        self, frontend: str, method: str, seconds: float | None, code: str, kind: str | None = None
    ) -> None:
        """
        Count one answered call; C{seconds} None counts it without timing
        it (a call to no method).
        """
        if seconds is None:
            self.requests.labels(frontend, method, code).inc()
        else:
            key = (frontend, method, code)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    self.request_duration.labels(frontend, method),
                    self.requests.labels(frontend, method, code),
                )
            children[0].observe(seconds)
            children[1].inc()
        if kind is not None:
            self.errors.labels(frontend, method, kind).inc()

    def commit(self, durability: str | None, seconds: float) -> None:
        """
        Time one database commit.
        """
        self.db_commit.labels(durability or "default").observe(seconds)

    def cluster_call(self, op: str, seconds: float, timed_out: bool) -> None:
        """
        Time one rbd operation.
        """
        self.cluster_duration.labels(op).observe(seconds)
        if timed_out:
            self.cluster_timeouts.labels(op).inc()

    def render(self) -> bytes:
        """
        The text exposition of every metric (call it off the reactor).
        """
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def enable() -> Metrics:
    """
    Turn metrics on (once per process; again returns the same).
    """
    global current
    if current is None:
        current = Metrics()
    return current


def disable() -> None:
    """
    Turn metrics off (tests).
    """
    global current
    current = None


def timed(frontend: str, method: str, run: Callable[[], Deferred[Any]], classify: Classify) -> Deferred[Any]:
    """
    A front end's choke point: C{run()} the call and, if metrics are on,
    count its time and outcome (C{classify(result)}: the status code and,
    for an error, its kind).  The result passes through unchanged.
    """
    m = current
    if m is None:
        return run()
    start = perf_counter()
    d = run()

    def record(result: Any) -> Any:
        code, kind = classify(result)
        m.request(frontend, method, perf_counter() - start, code, kind)
        return result

    return d.addBoth(record)
