"""
The metrics front end (C{--metrics-listen}): Prometheus's text exposition
of L{txgraph.metrics} at C{/metrics}, plus what the daemon holds in memory
(L{StateCollector}).

Serving a scrape never blocks the reactor: on the reactor it only counts
the in-memory layer and snapshot registries (one pass over their rows, no
database query, no backend call) into a snapshot; the text is rendered
(every collector, including the process collector's C{/proc} reads) in a
thread, from that snapshot.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txgraph.metrics import Metrics
from txgraph.store import LAYER_STATES

log = Logger()

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Runs a function in a thread: C{run_in_thread(f)} is a Deferred of C{f()}.
RunInThread = Callable[[Callable[[], bytes]], "Deferred[bytes]"]


class StateCollector:
    """
    Gauges of what the daemon holds in memory: layers by state,
    references, mounts, mapped devices, containerd snapshots by kind, the
    worst reactor lag.  L{snapshot} (reactor thread) counts; L{collect}
    (any thread, when the registry renders) reports the last count.

    With C{cluster_reads} (the rbd backend's synchronous
    L{Backend.cluster_reads}), L{collect} also asks each mounted layer's
    mapping what it read from the cluster (its rbd-fuse's admin socket:
    local, but a call per mounted layer, so only in the render thread)
    and counts what was read since the last scrape into two counters:
    the bytes that thin layers (and every clone) fetch lazily.

    @ivar cluster_reads: C{cluster_reads(sizes=False)}, or None.
    """

    def __init__(
        self,
        driver: Any,
        snapshotter: Any = None,
        cluster_reads: Callable[..., dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.driver = driver
        self.snapshotter = snapshotter
        self.cluster_reads = cluster_reads
        self._last: dict[str, Any] = {}
        self._reads_lock = threading.Lock()
        # Per mounted layer, its mapping's counters at the last scrape.
        self._seen: dict[str, tuple[int, int]] = {}
        self._read_bytes = 0
        self._reads = 0

    def _count_cluster_reads(self) -> tuple[int, int] | None:
        """
        (Render thread.)  Add what each mounted layer's mapping read since
        the last scrape to the totals; return the totals.  A mapping whose
        counters went down is a new one (the layer was mapped again): all
        it read is new.  Reads of a mapping that ended between two scrapes
        after the first are not seen.
        """
        assert self.cluster_reads is not None
        try:
            reads = self.cluster_reads(sizes=False)
        except Exception:
            log.failure("cannot read the mappings' cluster reads")
            return None
        with self._reads_lock:
            seen: dict[str, tuple[int, int]] = {}
            for layer, r in reads.items():
                now = (int(r["bytes_read"]), int(r["reads"]))
                before = self._seen.get(layer, (0, 0))
                if now[0] < before[0] or now[1] < before[1]:
                    before = (0, 0)
                self._read_bytes += now[0] - before[0]
                self._reads += now[1] - before[1]
                seen[layer] = now
            self._seen = seen
            return self._read_bytes, self._reads

    def snapshot(self) -> None:
        """
        (Reactor.)  Count the registries' rows: O(layers), in memory.
        """
        rows = self.driver.registry.rows()
        states = Counter(r.state for r in rows)
        kinds: Counter[str] = Counter()
        if self.snapshotter is not None:
            kinds.update(s.kind for s in self.snapshotter.rows())
        self._last = {
            "states": states,
            "references": sum(r.refcount for r in rows),
            "mounts": sum(1 for r in rows if r.mountpoint),
            "mapped": sum(1 for r in rows if r.mapping),
            "snapshots": kinds,
            "max_lag": self.driver.max_lag,
        }

    def collect(self) -> Iterator[Any]:
        """
        The gauges of the last L{snapshot} (Prometheus's collector protocol).
        """
        from prometheus_client.core import GaugeMetricFamily

        last = self._last
        if not last:
            return
        layers = GaugeMetricFamily("txgraph_layers", "Layers by state.", labels=["state"])
        for state in LAYER_STATES:
            layers.add_metric([state], last["states"].get(state, 0))
        yield layers
        yield GaugeMetricFamily(
            "txgraph_references", "References held on layers (Get without Put).",
            value=last["references"],
        )
        yield GaugeMetricFamily("txgraph_mounts", "Layers mounted.", value=last["mounts"])
        yield GaugeMetricFamily(
            "txgraph_mapped_devices", "Layers with a block device mapped.", value=last["mapped"]
        )
        snapshots = GaugeMetricFamily(
            "txgraph_snapshots", "containerd snapshots by kind.", labels=["kind"]
        )
        for kind, n in sorted(last["snapshots"].items()):
            snapshots.add_metric([kind], n)
        yield snapshots
        yield GaugeMetricFamily(
            "txgraph_reactor_max_lag_seconds", "The worst reactor lag since start.",
            value=last["max_lag"],
        )
        if self.cluster_reads is not None:
            totals = self._count_cluster_reads()
            if totals is not None:
                from prometheus_client.core import CounterMetricFamily

                yield CounterMetricFamily(
                    "txgraph_cluster_read_bytes",
                    "Bytes the mounted layers' mappings read from the cluster (a thin "
                    "image's data, fetched lazily), sampled at each scrape.",
                    value=totals[0],
                )
                yield CounterMetricFamily(
                    "txgraph_cluster_reads",
                    "Reads the mounted layers' mappings made of the cluster, sampled at "
                    "each scrape.",
                    value=totals[1],
                )


def render(metrics: Metrics, collector: StateCollector, run_in_thread: RunInThread) -> Deferred[bytes]:
    """
    (Reactor.)  Count the in-memory state, then render every metric in a
    thread.
    """
    collector.snapshot()
    return run_in_thread(metrics.render)


class MetricsResource(Resource):
    """
    C{GET /metrics}: the text exposition.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, collector: StateCollector, run_in_thread: RunInThread) -> None:
        super().__init__()
        self.metrics = metrics
        self.collector = collector
        self.run_in_thread = run_in_thread

    def render_GET(self, request: Request) -> Any:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"txgraph serves its metrics at /metrics\n"
        d = render(self.metrics, self.collector, self.run_in_thread)

        def send(body: bytes) -> None:
            request.setHeader(b"Content-Type", CONTENT_TYPE)
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("cannot render the metrics", failure)
            request.setResponseCode(500)
            request.finish()

        d.addCallbacks(send, failed)
        return NOT_DONE_YET


def metrics_site(metrics: Metrics, collector: StateCollector, run_in_thread: RunInThread) -> Site:
    """
    The web site of C{--metrics-listen}: C{/metrics} only.
    """
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics, collector, run_in_thread))
    return Site(root)
