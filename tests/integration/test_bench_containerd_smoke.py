"""
A short run of the containerd benchmark (C{bench/containerd.py --quick}:
busybox, one repetition, two runs, both systems, and the rbd two-node pull
on its own dev cluster) so that it never rots.  Its numbers are not checked
against the issue's targets: that is the benchmark's job, run by hand
(docs/performance.md).
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
from dockerd import loop_devices_under, mounts_under

from txgraph.testing.ceph import DevCluster

pytestmark = [pytest.mark.containerd, pytest.mark.ceph, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_quick_containerd_run() -> None:
    """
    C{--quick} times every row on both systems and the rbd pulls on two
    nodes, writes them as JSON, and leaves no mount, loop device or file of
    its own behind.
    """
    if not os.access("/usr/bin/containerd", os.X_OK):
        pytest.skip("containerd is not installed")
    if not DevCluster.available():
        pytest.skip("Ceph is not installed (ceph-mon, ceph-osd)")
    # UNIX socket paths (txgraph's sockets) must stay short.
    work = Path(tempfile.mkdtemp(prefix="tg-ctrd-smoke-"))
    out = Path(tempfile.mkdtemp(prefix="tg-ctrd-out-")) / "containerd.json"
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "containerd.py"), "--quick", "--out",
             str(out), "--workdir", str(work)],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        report = json.loads(out.read_text())
        for system in ("overlayfs", "txgraph"):
            rows = report["samples"][system]
            assert [len(rows[r]) for r in ("import", "run_rm", "concurrent10")] == [1, 2, 1]
            assert all(v > 0 for values in rows.values() for v in values), report
        assert set(report["ratio"]) == {"import", "run_rm", "concurrent10"}
        (pull,) = report["rbd"]["samples"]
        assert pull["first"] > 0 and pull["second"] > 0, report
        # Node B took the layer from the pool: it wrote (almost) nothing.
        assert pull["second_written"] < pull["first_written"], report
        assert "rbd pull, node A / node B" in result.stdout
        assert mounts_under(work) == [] and loop_devices_under(work) == []
        assert list(work.iterdir()) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)
