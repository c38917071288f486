"""
A short run of the thin-image benchmark (C{bench/thin.py --quick
--size-mib 4}: the busybox image and a 4 MiB image built by the benchmark,
one repetition each, on its own dev cluster and two nodes) so that it
never rots.  Its numbers are not checked against the issue's
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
    C{--quick --size-mib 4} times both paths for both images and counts
    the cluster's bytes, writes them as JSON, and leaves nothing of its own
    behind.
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
        [sys.executable, str(REPO / "bench" / "thin.py"), "--quick", "--size-mib", "4", "--out",
         str(out), "--workdir", str(work)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    busybox, sized = report["images"]
    assert busybox["image"] == "busybox:local", report
    # --size-mib 4: a sized image built here, of 4 MiB of random data.
    assert sized["image"] == "bench/sized:4mib", report
    assert sized["image_bytes"] > (4 << 20) + (1 << 20), report  # and busybox
    for image in (busybox, sized):
        for kind in ("thin", "full"):
            (sample,) = image["samples"][kind]
            assert sample["seconds"] >= sample["load"] > 0, report
            assert sample["read"] >= 0 and sample["written"] >= 0, report
        # The thin path writes no layer data: only the descriptor and copy-ups.
        assert image["median"]["thin"]["written"] < image["median"]["full"]["written"], report
        assert image["image_bytes"] > 0 and image["speedup"] > 0
    # The full load writes the random data into the cluster.
    assert sized["median"]["full"]["written"] > 4 << 20, report
    assert result.stdout.count("time to first output") == 2
    assert mounts_under(work) == []
    assert list(work.iterdir()) == []
