"""
Short runs of issue 18's rbd benchmarks (C{bench/rbd_layer_profile.py},
C{bench/rbd_depth_read.py} and C{bench/rbd_docker.py}, each on its own dev
cluster) so that they never rot.  Their numbers are not checked: that is the benchmarks' job, run
by hand (docs/performance.md, "rbd: the cost of one layer").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from dockerd import host_leftovers

from txgraph.testing.ceph import DevCluster

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, work: Path, *args: str, **env: str) -> str:
    """
    Run a benchmark with its temporary directories in C{work} (short: the
    dev cluster's admin sockets live there); it must leave nothing.
    """
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, **env, "TMPDIR": str(work)},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert host_leftovers(work) == []
    assert [p.name for p in work.iterdir()] == [], "temporary directories left"
    return result.stdout


def test_profile_and_depth_read(tmp_path: Path) -> None:
    """
    The profile times each step of a short chain; the depth read reports
    each depth's open, small-file and large-file figures, as JSON too.
    """
    if not DevCluster.available():
        pytest.skip("Ceph is not installed (ceph-mon, ceph-osd)")
    work = Path(tempfile.mkdtemp(prefix="tg-rbdl-"))
    try:
        out = _run("rbd_layer_profile.py", work, N="2")
        assert "chain of 3:" in out and "commit the parent" in out, out
        report = tmp_path / "depth.json"
        out = _run("rbd_depth_read.py", work, DEPTH="2", REPS="1", BIG_MIB="2", OUT=str(report))
        assert "ancestors" in out, out
        medians = json.loads(report.read_text())["medians"]
        assert sorted(medians) == ["1", "2", "3"], medians
        for row in medians.values():
            assert row["prepare_mount_ms"] > 0 and row["small_ms"] > 0 and row["big_mb_s"] > 0, row
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.dockerd
def test_rbd_docker(tmp_path: Path) -> None:
    """
    The container rows on built-in, overlay, rbd and an "older" rbd (this
    same tree, through --old), each rbd also with local container layers
    (--local), and the two-images row on those (--pair): every system
    measured, the ratios reported.
    """
    if not DevCluster.available():
        pytest.skip("Ceph is not installed (ceph-mon, ceph-osd)")
    work = Path(tempfile.mkdtemp(prefix="tg-rbdd-"))
    try:
        report = tmp_path / "docker.json"
        out = _run(
            "rbd_docker.py", work, "--runs", "1", "--fs-size", "1G", "--old", str(REPO),
            "--local", "--pair", "1", "--workdir", str(work), "--out", str(report),
        )
        assert "rbd / rbd-old:" in out and "rbd-local / rbd-local-old:" in out, out
        medians = json.loads(report.read_text())["medians_ms"]
        local = ["rbd-local", "rbd-local-old"]
        assert sorted(medians) == ["builtin", "overlay", "rbd", *local, "rbd-old"], medians
        for key, rows in medians.items():
            expected = ["create", "pair_create", "rm", "run_rm"] if key in local else [
                "create", "rm", "run_rm"]
            assert sorted(rows) == expected and min(rows.values()) > 0, (key, rows)
        means = json.loads(report.read_text())["call_means_ms_count"]
        assert sorted(means) == ["overlay", "rbd", *local, "rbd-old"], means
        assert means["rbd"]["calls"]["GraphDriver.CreateReadWrite"][1] >= 6, means
        assert means["rbd"]["cluster"]["prepare"][0] > 0, means
    finally:
        shutil.rmtree(work, ignore_errors=True)
