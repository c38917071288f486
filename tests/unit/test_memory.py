"""
Tests for what keeps the daemon's memory down: modules that only some
set-ups need are imported only by those set-ups.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """
    The top-level modules a fresh interpreter holds after running C{code}
    with this checkout's txgraph.
    """
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    ).stdout
    return {name.split(".")[0] for name in out.split()}


def test_daemon_without_containerd_imports_no_grpc() -> None:
    """
    The twistd plugin's module, with its options checked (including a
    --containerd-listen value), imports neither grpcio nor protobuf (about
    12 MB of RSS): only a daemon that serves containerd needs them.
    """
    modules = _modules_after(
        "from txgraph import tap\n"
        "o = tap.Options()\n"
        "o.parseOptions(['--containerd-listen', 'unix:/run/x.sock', '--listen', 'none'])"
    )
    assert "txgraph" in modules
    assert "grpc" not in modules
    assert "google" not in modules


def test_alembic_not_imported_by_the_daemon() -> None:
    """
    Alembic (about 10 MB) is imported only when the schema must change.
    """
    assert "alembic" not in _modules_after("from txgraph import tap")
