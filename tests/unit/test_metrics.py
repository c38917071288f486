"""
Tests for the metrics (L{txgraph.metrics}, L{txgraph.api.metrics}): off,
nothing is counted and C{prometheus_client} is not imported; on, each
front end's dispatch counts its calls (method, status, error kind; never a
layer ID), the database its commits and groups, the lag watch its lag, the
rbd cluster link its calls and timeouts; the in-memory gauges are counted
on the calling (reactor) thread and the text rendered in another.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_api import A, FakeDriver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

from txgraph import metrics
from txgraph.api.containerd.server import MetricsInterceptor
from txgraph.api.metrics import MetricsResource, StateCollector
from txgraph.backends.rbd.cluster import Cluster, timed_out
from txgraph.driver import watch_reactor_lag
from txgraph.errors import BackendError
from txgraph.store import LayerRow, Store, _update
from txgraph.tap import Options
from txgraph.testing.stub_client import Client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def recorder() -> Iterator[metrics.Metrics]:
    """
    Metrics on for one test.
    """
    m = metrics.enable()
    yield m
    metrics.disable()


def samples(m: metrics.Metrics) -> Samples:
    """
    Every sample of a rendered registry, parsed back, by name and labels.
    """
    out: Samples = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: metrics.Metrics, name: str, **labels: str) -> float:
    return samples(m).get((name, tuple(sorted(labels.items()))), 0.0)


def test_off_imports_and_counts_nothing() -> None:
    """
    Without --metrics-listen, the daemon's modules do not import
    prometheus_client, and the dispatch runs the call as it is.
    """
    code = (
        "import sys, txgraph.tap, txgraph.api.graphdriver, txgraph.store; "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert metrics.current is None
    d: Deferred[int] = succeed(1)
    assert metrics.timed("x", "y", lambda: d, lambda r: ("200", None)) is d


def test_graphdriver_calls_counted(recorder: metrics.Metrics) -> None:
    """
    Each graph driver call is counted and timed by method and status; a
    failed one by its error's class too; a call to no method as
    C{unknown}; no label holds a layer ID.
    """
    driver = FakeDriver()
    client = Client(driver)  # type: ignore[arg-type]
    for _ in range(3):
        assert client.post("GraphDriver.Exists", {"ID": A})[0] == 200
    driver.error = BackendError("boom")
    assert client.post("GraphDriver.Remove", {"ID": A})[0] == 500
    assert client.post("GraphDriver.Nope", {"ID": A})[0] == 404
    assert client.post("GraphDriver.Get", {"ID": "../x"})[0] == 400
    g = "graphdriver"
    assert value(recorder, "txgraph_requests_total", frontend=g, method="GraphDriver.Exists", code="200") == 3
    assert value(recorder, "txgraph_request_duration_seconds_count", frontend=g,
                 method="GraphDriver.Exists") == 3
    assert value(recorder, "txgraph_request_errors_total", frontend=g, method="GraphDriver.Remove",
                 kind="BackendError") == 1
    assert value(recorder, "txgraph_request_errors_total", frontend=g, method="GraphDriver.Get",
                 kind="BadRequest") == 1
    assert value(recorder, "txgraph_requests_total", frontend=g, method="unknown", code="404") == 1
    for _name, labels in samples(recorder):
        for _, v in labels:
            assert A not in v and "../x" not in v and "Nope" not in v


def test_diff_bytes_counted(recorder: metrics.Metrics) -> None:
    """
    Diff counts the bytes it sent.
    """
    driver = FakeDriver()
    driver.diff_data = b"t" * 2500
    status, _, body = Client(driver).post("GraphDriver.Diff", {"ID": A})  # type: ignore[arg-type]
    assert (status, len(body)) == (200, 2500)
    assert value(recorder, "txgraph_diffed_bytes_total") == 2500
    assert value(recorder, "txgraph_requests_total", frontend="graphdriver",
                 method="GraphDriver.Diff", code="200") == 1


def test_histograms_are_sane(recorder: metrics.Metrics) -> None:
    """
    Buckets are cumulative and end with +Inf equal to the count.
    """
    for seconds in (0.00005, 0.003, 0.2, 500.0):
        recorder.request("containerd", "Stat", seconds, "OK")
    s = samples(recorder)
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in s.items()
        if name == "txgraph_request_duration_seconds_bucket" and dict(labels)["method"] == "Stat"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), 4.0)
    assert buckets[0] == (0.0001, 1.0)


def test_store_commits_and_groups(recorder: metrics.Metrics, tmp_path: Any) -> None:
    """
    Each commit is timed by its durability; each group's size is observed.
    """
    store = Store(str(tmp_path / "t.db"))
    store.open_thd()
    row = LayerRow(id="x", parent=None, kind="ro", state="created")
    store.insert_layer_thd(row)
    assert store.write_group_thd([_update(row, False), _update(row, False)]) == [None, None]
    assert value(recorder, "txgraph_db_commit_duration_seconds_count", durability="FULL") == 1
    assert value(recorder, "txgraph_db_commit_duration_seconds_count", durability="NORMAL") == 1
    assert value(recorder, "txgraph_db_write_group_size_count") == 1
    assert value(recorder, "txgraph_db_write_group_size_sum") == 2


def test_reactor_lag_observed(recorder: metrics.Metrics) -> None:
    """
    The lag watch observes each tick's lateness.
    """
    clock = Clock()
    driver: Any = type("D", (), {"max_lag": 0.0})()
    stop = watch_reactor_lag(driver, clock)
    clock.advance(0.35)  # one tick, 0.25 s late
    stop()
    assert value(recorder, "txgraph_reactor_lag_seconds_count") == 1
    assert value(recorder, "txgraph_reactor_lag_seconds_bucket", le="0.25") == 1
    assert value(recorder, "txgraph_reactor_lag_seconds_bucket", le="0.1") == 0


class TimedOut(Exception):
    """
    Named as librados's timeout error.
    """


def test_cluster_calls_and_timeouts(recorder: metrics.Metrics) -> None:
    """
    An rbd operation is timed by its (fixed) name; one that timed out is
    counted as such, also when wrapped.
    """
    cluster = Cluster(None, None)  # type: ignore[arg-type]
    with cluster.op("look up", "a" * 64):
        pass
    with pytest.raises(BackendError), cluster.op("map", "a" * 64):
        raise TimedOut("too slow")
    assert value(recorder, "txgraph_cluster_call_duration_seconds_count", op="look up") == 1
    assert value(recorder, "txgraph_cluster_timeouts_total", op="map") == 1
    assert value(recorder, "txgraph_cluster_timeouts_total", op="look up") == 0
    wrapped = BackendError("x")
    wrapped.__cause__ = OSError(110, "ETIMEDOUT")
    assert timed_out(wrapped) and not timed_out(BackendError("y"))


@dataclass
class Row:
    state: str
    refcount: int = 0
    mountpoint: str | None = None
    mapping: dict[str, str] | None = None


@dataclass
class Snap:
    kind: str


@dataclass
class FakeState:
    rows_: list[Row] = field(default_factory=list)
    max_lag: float = 0.02

    @property
    def registry(self) -> Any:
        return self

    def rows(self) -> list[Row]:
        return self.rows_


def in_thread(f: Any) -> Deferred[bytes]:
    """
    Run C{f} in a thread named C{render}, and wait for it.
    """
    result: list[bytes] = []
    worker = threading.Thread(target=lambda: result.append(f()), name="render")
    worker.start()
    worker.join()
    return succeed(result[0])


def test_state_gauges_counted_on_caller_rendered_in_thread(recorder: metrics.Metrics) -> None:
    """
    A scrape counts the in-memory registries on the calling (reactor)
    thread, and renders every collector in another thread: the reactor
    never waits for the render.
    """
    state = FakeState([Row("mounted", 2, "/m", {"device": "/dev/loop1"}), Row("created"), Row("faulty")])
    snapshotter = FakeState([Snap("committed"), Snap("active")])  # type: ignore[list-item]
    snapshotter.rows_ = [Snap("committed"), Snap("active"), Snap("committed")]  # type: ignore[list-item]
    collector = StateCollector(state, snapshotter)
    threads: dict[str, str] = {}
    original_snapshot, original_collect = collector.snapshot, collector.collect

    def snapshot() -> None:
        threads["snapshot"] = threading.current_thread().name
        original_snapshot()

    def collect() -> Any:
        threads["collect"] = threading.current_thread().name
        return original_collect()

    collector.snapshot = snapshot  # type: ignore[method-assign]
    collector.collect = collect  # type: ignore[method-assign]
    recorder.registry.register(collector)  # type: ignore[arg-type]

    try:
        request = DummyRequest([b""])
        MetricsResource(recorder, collector, in_thread).render_GET(request)  # type: ignore[arg-type]
    finally:
        recorder.registry.unregister(collector)  # type: ignore[arg-type]
    assert threads == {"snapshot": threading.current_thread().name, "collect": "render"}
    text = b"".join(request.written).decode()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert found[("txgraph_layers", (("state", "mounted"),))] == 1
    assert found[("txgraph_layers", (("state", "applying"),))] == 0
    assert found[("txgraph_references", ())] == 2
    assert found[("txgraph_mounts", ())] == 1
    assert found[("txgraph_mapped_devices", ())] == 1
    assert found[("txgraph_snapshots", (("kind", "committed"),))] == 2
    assert found[("txgraph_reactor_max_lag_seconds", ())] == 0.02
    assert ("process_resident_memory_bytes", ()) in found


class Context:
    """
    A gRPC servicer context's status code.
    """

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self._code = code
        raise Exception(message)


def test_containerd_calls_counted(recorder: metrics.Metrics) -> None:
    """
    The gRPC interceptor counts each call by method and code (its error
    kind: what containerd sees of it), streaming ones included.
    """
    def stat(request: Any, context: Context) -> str:
        if request == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "snapshot missing not found")
        return "info"

    def listing(request: Any, context: Context) -> Iterator[str]:
        yield from ("a", "b")

    details = type("Details", (), {"method": "/containerd.services.snapshots.v1.Snapshots/Stat"})()
    handler = MetricsInterceptor().intercept_service(
        lambda d: grpc.unary_unary_rpc_method_handler(stat), details
    )
    assert handler.unary_unary("k", Context()) == "info"
    with pytest.raises(Exception, match="not found"):
        handler.unary_unary("missing", Context())
    details.method = "/containerd.services.snapshots.v1.Snapshots/List"
    handler = MetricsInterceptor().intercept_service(
        lambda d: grpc.unary_stream_rpc_method_handler(listing), details
    )
    assert list(handler.unary_stream(None, Context())) == ["a", "b"]
    c = "containerd"
    assert value(recorder, "txgraph_requests_total", frontend=c, method="Stat", code="OK") == 1
    assert value(recorder, "txgraph_requests_total", frontend=c, method="Stat", code="NOT_FOUND") == 1
    assert value(recorder, "txgraph_request_errors_total", frontend=c, method="Stat", kind="NOT_FOUND") == 1
    assert value(recorder, "txgraph_request_duration_seconds_count", frontend=c, method="List") == 1


def test_bad_metrics_listen_is_refused() -> None:
    """
    A --metrics-listen that is not a Twisted endpoint is refused at option
    parsing, naming the option and the value.
    """
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--listen", "unix:/tmp/x.sock", "--metrics-listen", "bogus:9495"])
    assert "invalid --metrics-listen 'bogus:9495'" in str(e.value)
    assert "Unknown endpoint type" in str(e.value)


def test_trash_waiting_gauge(recorder: metrics.Metrics) -> None:
    """
    A purge pass sets the gauge to the removed images it could not purge.
    """
    from txgraph.backends.rbd.trash import Trash

    entries = [{"id": "1", "name": "txgraph.x1"}, {"id": "2", "name": "txgraph.x2"}]
    rbd = type("RBDModule", (), {"RBD": lambda self: type("R", (), {"trash_list": lambda s, io: entries})()})()
    cluster: Any = type("C", (), {"rbd": rbd, "ioctx": None, "lock": threading.Lock()})()
    names: Any = type("N", (), {"stem": "txgraph.", "base_image": "txgraph.base",
                                "spec": lambda self, n: n})()
    trash = Trash(None, names, cluster, None)  # type: ignore[arg-type]
    trash.purge_one = lambda image_id, name: "busy" if image_id == "2" else None  # type: ignore[method-assign]
    assert trash.purge() is True
    assert value(recorder, "txgraph_rbd_trash_waiting_images") == 1
    trash.purge_one = lambda image_id, name: None  # type: ignore[method-assign]
    assert trash.purge() is False
    assert value(recorder, "txgraph_rbd_trash_waiting_images") == 0


def test_cluster_reads_counted_in_the_render_thread(recorder: metrics.Metrics) -> None:
    """
    The mappings' cluster reads (what thin layers fetch lazily) are asked
    for in the render thread, without the image sizes (no cluster call),
    and counted as totals: what each mounted layer's mapping read since
    the last scrape; a mapping whose counters went down is a new one; a
    layer unmounted keeps what it read counted; a failing read leaves the
    counters out of that scrape, not the scrape.
    """
    answers: list[Any] = [
        {"a": {"bytes_read": 100, "reads": 2}},
        {"a": {"bytes_read": 150, "reads": 3}, "b": {"bytes_read": 10, "reads": 1}},
        {"a": {"bytes_read": 40, "reads": 1}},  # a mapped again; b unmounted
        OSError("admin socket gone"),
        {},
        {"b": {"bytes_read": 5, "reads": 1}},  # b mounted again
    ]
    asked: list[tuple[str, bool]] = []

    def cluster_reads(sizes: bool = True) -> dict[str, dict[str, Any]]:
        asked.append((threading.current_thread().name, sizes))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    collector = StateCollector(FakeState([Row("mounted", 1, "/m")]), None, cluster_reads)
    recorder.registry.register(collector)  # type: ignore[arg-type]

    def scrape() -> dict[str, float]:
        request = DummyRequest([b""])
        MetricsResource(recorder, collector, in_thread).render_GET(request)  # type: ignore[arg-type]
        text = b"".join(request.written).decode()
        return {
            s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("txgraph_cluster_read")
        }

    try:
        seen = [scrape() for _ in range(6)]
    finally:
        recorder.registry.unregister(collector)  # type: ignore[arg-type]
    assert asked == [("render", False)] * 6
    bytes_total = [s.get("txgraph_cluster_read_bytes_total") for s in seen]
    reads_total = [s.get("txgraph_cluster_reads_total") for s in seen]
    assert bytes_total == [100, 160, 200, None, 200, 205]
    assert reads_total == [2, 4, 5, None, 5, 6]
