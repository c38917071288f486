"""
Tests for what keeps the daemon's memory down: modules that only some
set-ups need are imported only by those set-ups.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from txgraph.store import SCHEMA_HEAD

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


def test_a_new_database_does_not_bring_alembic_in(tmp_path: Path) -> None:
    """
    Creating a new database (a daemon's first start) or upgrading one runs
    the migrations in a child process: Alembic, Mako and Pygments (about
    9 MB) never enter the daemon, which would keep them for its life.
    """
    path = tmp_path / "txgraph.db"
    modules = _modules_after(
        "from txgraph.store import Store\n"
        f"Store({str(path)!r}).open_thd(migrate_in_child=True)"
    )
    assert "sqlalchemy" in modules
    assert not modules & {"alembic", "mako", "pygments"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (SCHEMA_HEAD,)
        ]
