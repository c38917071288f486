"""
txgraph's Prometheus metrics (issue 19) scraped from a real txgraph
(C{--metrics-listen tcp:0:interface=127.0.0.1}) under a real dockerd, and
read back with C{prometheus_client}'s parser: the counters move as the
scenario runs (docker load, run, rm, rmi; containerd's gRPC calls on the
same daemon), every histogram is sane, no label carries a layer ID, and
C{txgraph-admin top --once} shows the operations seen.  One txgraph and
one dockerd serve the module, in order.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import BACKENDS, Components, Stack, node_gc, rbd_flags, rbd_namespace
from prometheus_client.parser import text_string_to_metric_families
from txgraphd import admin

from txgraph.api.containerd.proto import snapshots_pb2, snapshots_pb2_grpc

pytestmark = pytest.mark.dockerd

Families = dict[str, Any]


class Scraper:
    """
    The daemon's /metrics, parsed; every label value seen is kept.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.label_values: set[str] = set()

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=30) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return response.read().decode()  # type: ignore[no-any-return]

    def __call__(self) -> Families:
        families = {f.name: f for f in text_string_to_metric_families(self.text())}
        for family in families.values():
            for s in family.samples:
                self.label_values.update(s.labels.values())
        return families


def value(families: Families, family: str, sample: str | None = None, **labels: str) -> float:
    """
    The sum of a family's samples (named C{sample}, default the family's
    own name) whose labels include C{labels}.
    """
    f = families.get(family)
    if f is None:
        return 0.0
    wanted = sample or family
    return sum(
        s.value for s in f.samples
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
    )


def calls(families: Families, method: str, frontend: str = "graphdriver") -> float:
    return value(families, "txgraph_requests", "txgraph_requests_total", frontend=frontend, method=method)


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, module_components: Components) -> Iterator[tuple[Stack, Scraper]]:
    """
    txgraph on each backend in turn with metrics on (and containerd's front
    end), and a dockerd using it.
    """
    flags: list[str] = []
    if request.param == "rbd":
        cluster = request.getfixturevalue("ceph_cluster")
        flags = rbd_flags(cluster, rbd_namespace(cluster))
    txgraph = module_components.txgraph(
        *flags, "--metrics-listen", "tcp:0:interface=127.0.0.1", containerd=True
    )
    match = re.search(r"serving metrics at (http://127\.0\.0\.1:\d+)/metrics", txgraph.log_tail(400))
    assert match, txgraph.log_tail()
    dockerd = module_components.dockerd(txgraph.name)
    stack = Stack(txgraph, dockerd)
    stack.backend = request.param
    yield stack, Scraper(match.group(1) + "/metrics")


def check_histograms(families: Families) -> int:
    """
    Every histogram's buckets are cumulative, their bounds increasing, and
    +Inf equals the count; returns how many series were checked.
    """
    checked = 0
    for family in families.values():
        if family.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for s in family.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            entry = series.setdefault(key, {"buckets": []})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                entry["count"] = s.value
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
        for key, entry in series.items():
            bounds = [le for le, _ in entry["buckets"]]
            counts = [n for _, n in entry["buckets"]]
            assert bounds == sorted(bounds) and math.isinf(bounds[-1]), (family.name, key)
            assert counts == sorted(counts), (family.name, key, counts)
            assert counts[-1] == entry["count"], (family.name, key)
            assert entry["sum"] >= 0
            checked += 1
    return checked


def test_counters_move_with_the_scenario(stack: tuple[Stack, Scraper], busybox_image: Path) -> None:
    """
    docker load counts Creates and ApplyDiffs (and the bytes applied),
    layers appear in the gauges; docker run counts CreateReadWrite, Get
    and Put with references and mounts while it runs; rm and rmi count
    Removes and the layers go; commits are timed; containerd's calls on the
    same daemon are counted with their gRPC codes; no label value holds a
    layer ID of the scenario; every histogram is sane.
    """
    s, scrape = stack
    before = scrape()
    assert value(before, "txgraph_layers") == 0

    s.docker("load", "-i", str(busybox_image))
    loaded = scrape()
    assert calls(loaded, "GraphDriver.Create") > calls(before, "GraphDriver.Create")
    assert calls(loaded, "GraphDriver.ApplyDiff") >= 1
    assert value(loaded, "txgraph_applied_bytes", "txgraph_applied_bytes_total") > 100_000
    assert value(loaded, "txgraph_layers", state="created") >= 1
    assert value(loaded, "txgraph_db_commit_duration_seconds", "txgraph_db_commit_duration_seconds_count",
                 durability="FULL") >= 1
    image_layers = s.layer_ids()
    assert image_layers

    name = f"metrics-{time.monotonic_ns()}"
    s.docker("run", "-d", "--name", name, "busybox:local", "sleep", "300")
    running = scrape()
    for method in ("GraphDriver.CreateReadWrite", "GraphDriver.Get"):
        assert calls(running, method) > calls(loaded, method), method
    assert value(running, "txgraph_references") >= 1
    assert value(running, "txgraph_mounts") >= 1
    if s.backend == "rbd":
        assert value(running, "txgraph_mapped_devices") >= 1
        ops = {
            sample.labels["op"] for sample in running["txgraph_cluster_call_duration_seconds"].samples
            if sample.name.endswith("_count") and sample.value > 0
        }
        # Read-write layers are mapped as they are prepared: no "map" here.
        assert {"prepare", "commit", "mount"} <= ops, ops
        # What the container's mapping read of its image from the cluster.
        assert value(running, "txgraph_cluster_read_bytes", "txgraph_cluster_read_bytes_total") > 0
    else:
        assert "txgraph_cluster_read_bytes" not in running
    all_layers = s.layer_ids()
    assert len(all_layers) > len(image_layers)

    s.docker("rm", "-f", name)
    s.docker("rmi", "busybox:local")
    removed = scrape()
    assert calls(removed, "GraphDriver.Put") > calls(running, "GraphDriver.Put")
    assert calls(removed, "GraphDriver.Remove") >= len(all_layers)
    assert value(removed, "txgraph_layers") == 0
    assert value(removed, "txgraph_references") == 0
    assert value(removed, "txgraph_reactor_lag_seconds", "txgraph_reactor_lag_seconds_count") > 0

    # A layer dockerd does not know: gc (through the daemon) finds it.
    orphan = f"metrics-orphan-{time.monotonic_ns()}"
    assert s.txgraph.call("GraphDriver.Create", {"ID": orphan})[0] == 200
    all_layers.add(orphan)
    code, findings = node_gc(s)
    # (On rbd, the shared images busybox left, unused since rmi, too.)
    assert code == 1 and [f["id"] for f in findings if f["kind"] == "unknown"] == [orphan]
    found = scrape()
    for kind in {f["kind"] for f in findings}:
        assert value(found, "txgraph_gc_findings", "txgraph_gc_findings_total", kind=kind) == len(
            [f for f in findings if f["kind"] == kind]
        ), kind
    assert s.txgraph.call("GraphDriver.Remove", {"ID": orphan})[0] == 200

    # containerd's front end, on the same daemon (no containerd needed to call it).
    assert s.txgraph.containerd_socket is not None
    with grpc.insecure_channel(f"unix:{s.txgraph.containerd_socket}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        list(stub.List(snapshots_pb2.ListSnapshotsRequest(snapshotter="txgraph"), timeout=30))
        with pytest.raises(grpc.RpcError) as e:
            stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter="txgraph", key="no-such-key"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape()
    assert calls(after, "List", "containerd") == 1
    assert value(after, "txgraph_requests", "txgraph_requests_total", frontend="containerd",
                 method="Stat", code="NOT_FOUND") == 1
    assert value(after, "txgraph_request_errors", "txgraph_request_errors_total", frontend="containerd",
                 method="Stat", kind="NOT_FOUND") == 1

    assert check_histograms(after) >= (12 if s.backend == "rbd" else 10)
    leaked = [
        v for v in scrape.label_values
        for layer in all_layers if layer in v or layer.removesuffix("-init")[:12] in v
    ]
    assert not leaked
    assert "no-such-key" not in scrape.label_values


def test_top_once_shows_operations(stack: tuple[Stack, Scraper]) -> None:
    """
    txgraph-admin top --once, through the admin socket, lists the
    operations the daemon served, busiest over the interval first.
    """
    s, _ = stack
    for _ in range(20):
        assert s.txgraph.call("GraphDriver.Exists", {"ID": "a" * 64})[0] == 200
    result = admin(s.txgraph.state_dir, "top", "--once", "--interval", "0.5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("txgraph top: every 0.5 s")
    table = [line.split() for line in lines[2:] if line.startswith(("graphdriver", "containerd"))]
    methods = [row[1] for row in table]
    for method in ("GraphDriver.Create", "GraphDriver.ApplyDiff", "GraphDriver.Get",
                   "GraphDriver.Remove", "GraphDriver.Exists", "Stat"):
        assert method in methods, result.stdout
    exists = table[methods.index("GraphDriver.Exists")]
    assert int(exists[3]) >= 20


def test_metrics_off_top_says_how(components: Components) -> None:
    """
    Without --metrics-listen nothing is counted, and top says how to turn
    the metrics on.
    """
    daemon = components.txgraph()
    result = admin(daemon.state_dir, "top", "--once", "--interval", "0.1")
    assert result.returncode == 2
    assert "metrics are off: start txgraph with --metrics-listen" in result.stderr


@pytest.mark.parametrize(
    "endpoint, message",
    [
        ("bogus:9495", "invalid --metrics-listen 'bogus:9495': Unknown endpoint type: 'bogus'"),
        ("tcp:{port}:interface=127.0.0.1", "txgraph cannot listen on --metrics-listen tcp:"),
    ],
)
def test_bad_metrics_listen_exits(components: Components, endpoint: str, message: str) -> None:
    """
    A --metrics-listen that is not an endpoint, or one it cannot listen on
    (the port is taken), stops txgraph with exit status 1 and a message
    naming the option.
    """
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        daemon = components.txgraph(
            "--metrics-listen", endpoint.format(port=taken.getsockname()[1]), start=False
        )
        with pytest.raises(RuntimeError) as e:
            daemon.start(timeout=30)
    finally:
        taken.close()
    assert "txgraph exited with 1" in str(e.value)
    assert message in str(e.value)
