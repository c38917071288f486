"""
A short run of the thin-image benchmark (C{bench/thin.py --quick}: the
busybox image, one repetition, on its own dev cluster and two nodes) so
that it never rots.  Its numbers are not checked against the issue's
targets: that is the benchmark's job, run by hand (docs/performance.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from dockerd import mounts_under

from txgraph.testing.ceph import DevCluster

pytestmark = [pytest.mark.dockerd, pytest.mark.ceph, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_quick_thin_run(tmp_path: Path) -> None:
    """
    C{--quick} times both paths and counts the cluster's bytes, writes them
    as JSON, and leaves nothing of its own behind.
    """
    if not DevCluster.available():
        pytest.skip("Ceph is not installed (ceph-mon, ceph-osd)")
    out = tmp_path / "thin.json"
    # UNIX socket paths (txgraph's admin socket) must stay short.
    work = Path(tempfile.mkdtemp(prefix="tg-thin-smoke-"))
    try:
        _run_quick(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_quick(out: Path, work: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "thin.py"), "--quick", "--out", str(out),
         "--workdir", str(work)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    for kind in ("thin", "full"):
        (sample,) = report["samples"][kind]
        assert sample["seconds"] >= sample["load"] > 0, report
        assert sample["read"] >= 0 and sample["written"] >= 0, report
    # The thin path writes no layer data: only the descriptor and copy-ups.
    assert report["median"]["thin"]["written"] < report["median"]["full"]["written"], report
    assert report["image_bytes"] > 0 and report["speedup"] > 0
    assert "time to first output" in result.stdout
    assert mounts_under(work) == []
    assert list(work.iterdir()) == []
