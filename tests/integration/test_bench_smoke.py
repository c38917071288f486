"""
A short run of the benchmark (C{bench/run.py --quick}: one repetition,
busybox only, a tiny commit) so that it never rots.  The numbers are not
checked against the issue's targets: that is the benchmark's job, run by
hand (docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dockerd import loop_devices_under, mounts_under

pytestmark = [pytest.mark.dockerd, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

#: Every row of a --quick run, and whether the built-in driver has it too.
QUICK_ROWS = {
    "load_busybox": True,
    "run_rm": True,
    "run_rm_p90": True,
    "create": True,
    "rm": True,
    "create_rm": True,
    "commit": True,
    "diff": True,
    "save": True,
    "concurrent10": True,
    "socket_exists": False,
    "socket_get": False,
    "socket_put": False,
    "socket_capabilities": False,
    "socket_get_unmounted": False,
    "socket_put_last": False,
    "socket_create_rw": False,
    "socket_remove": False,
    "socket_applydiff": False,
    "rss": False,
}


def test_quick_run(tmp_path: Path) -> None:
    """
    C{--quick} measures every row on both systems, writes them as JSON with
    positive numbers and ratios, and leaves no mount or loop device behind.
    """
    out = tmp_path / "quick.json"
    work = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "run.py"),
            "--quick", "--out", str(out), "--workdir", str(work),
        ],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == set(QUICK_ROWS)
    for name, on_builtin in QUICK_ROWS.items():
        row = rows[name]
        assert row["values"]["txgraph"] > 0, row
        if on_builtin:
            assert row["values"]["builtin"] > 0, row
            assert row["ratios"]["txgraph"] > 0, row
        else:
            assert row["values"]["builtin"] is None, row
    # The table is printed with every row.
    for name in QUICK_ROWS:
        assert f"\n{name} " in result.stdout
    assert report["command"] and report["machine"]["nproc"] >= 1
    # Nothing left: no mount, no loop device on our sparse files, no files.
    assert mounts_under(work) == []
    assert loop_devices_under(work) == []
    assert list(work.iterdir()) == []
