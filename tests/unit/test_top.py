"""
Tests for C{txgraph-admin top}'s computation (L{txgraph.admin.top}): the
quantiles estimated from histogram buckets, the rates between two
scrapes, the ordering and the screen, from a real registry's exposition.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from txgraph import metrics
from txgraph.admin.top import Histogram, cmd_top, parse, render, rows
from txgraph.errors import TxgraphError


@pytest.fixture
def recorder() -> Iterator[metrics.Metrics]:
    m = metrics.enable()
    yield m
    metrics.disable()


def test_quantile_interpolates_within_buckets() -> None:
    """
    As Prometheus's histogram_quantile: linear within the bucket holding
    the rank; the highest finite bound for the +Inf bucket; None if empty.
    """
    h = Histogram(10, 1.0, [(0.1, 0.0), (0.2, 5.0), (0.4, 10.0), (float("inf"), 10.0)])
    assert h.quantile(0.5) == pytest.approx(0.2)
    assert h.quantile(0.25) == pytest.approx(0.15)
    assert h.quantile(0.9) == pytest.approx(0.36)
    assert Histogram(2, 9.0, [(1.0, 0.0), (float("inf"), 2.0)]).quantile(0.5) == 1.0
    assert Histogram().quantile(0.5) is None


def test_rates_and_latencies_between_scrapes(recorder: metrics.Metrics) -> None:
    """
    Rates are the calls between two scrapes over the interval; latencies
    those of the interval's calls, or since start (marked) for a method
    with none in it; busiest first.
    """
    for _ in range(4):
        recorder.request("graphdriver", "GraphDriver.Get", 0.004, "200")
    recorder.request("graphdriver", "GraphDriver.Remove", 0.03, "500", "BackendError")
    before = parse(recorder.render().decode())
    for _ in range(10):
        recorder.request("graphdriver", "GraphDriver.Exists", 0.0002, "200")
    recorder.request("graphdriver", "GraphDriver.Get", 0.2, "200")
    now = parse(recorder.render().decode())
    table = rows(now, before, 2.0)
    assert [(r.method, r.rate, r.total) for r in table] == [
        ("GraphDriver.Exists", 5.0, 10),
        ("GraphDriver.Get", 0.5, 5),
        ("GraphDriver.Remove", 0.0, 1),
    ]
    exists, get, remove = table
    assert exists.mean == pytest.approx(0.0002) and not exists.since_start
    assert 0.00025 >= exists.p50 >= 0.0001  # type: ignore[operator]
    assert get.mean == pytest.approx(0.2) and not get.since_start
    assert remove.since_start and remove.errors == 1 and remove.mean == pytest.approx(0.03)
    screen = render(now, table, 2.0, 20)
    assert "GraphDriver.Exists" in screen.splitlines()[2]
    assert "GraphDriver.Remove" in screen and "*" in screen.splitlines()[4]


def test_top_needs_the_daemon(tmp_path: Path) -> None:
    """
    With no daemon on the admin socket, top says so.
    """
    args = argparse.Namespace(state_dir=str(tmp_path), interval=0.1, once=True, iterations=None, limit=5)
    with pytest.raises(TxgraphError, match="no txgraph answers on .*admin.sock"):
        cmd_top(args, io.StringIO())
