"""
C{txgraph-admin}: the administrator's view of a txgraph state directory.

C{status} and C{ls} read the state database (SQLite in WAL mode, so reading
is safe while the daemon runs).  Garbage collection and repair come with
the recovery work (C{gc}), through the running daemon's admin socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from txgraph import __version__
from txgraph.errors import TxgraphError
from txgraph.store import Store, states_in
from txgraph.tap import DEFAULT_STATE_DIR


def _open(state_dir: str) -> Store:
    path = os.path.join(state_dir, "txgraph.db")
    if not os.path.exists(path):
        raise TxgraphError(
            f"no txgraph state database at {path} (is --state-dir right?)"
        )
    return Store(path)


def cmd_status(args: argparse.Namespace) -> int:
    """
    Layers by state, mounts and references.
    """
    store = _open(args.state_dir)
    rows = store.load_layers_thd()
    config = store.get_config_thd()
    counts = states_in(rows)
    report = {
        "state_dir": args.state_dir,
        "backend": config.get("backend"),
        "schema_revision": store.schema_revision_thd(),
        "layers": len(rows),
        "states": counts,
        "mounted": counts.get("mounted", 0),
        "references": sum(r.refcount for r in rows),
        "faulty": [{"id": r.id, "error": r.error} for r in rows if r.state == "faulty"],
        "docker_home": (config.get("init") or {}).get("home"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"state directory: {report['state_dir']}")
    print(f"backend:         {report['backend']}")
    print(f"schema:          {report['schema_revision']}")
    print(f"dockerd home:    {report['docker_home'] or '(no Init yet)'}")
    print(f"layers:          {report['layers']}")
    for state, n in sorted(counts.items()):
        print(f"  {state:<12} {n}")
    print(f"references:      {report['references']}")
    for f in report["faulty"]:  # type: ignore[attr-defined]
        print(f"faulty {f['id']}: {f['error']}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """
    One line per layer: ID, parent, kind, state, references, size.
    """
    rows = _open(args.state_dir).load_layers_thd()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "parent": r.parent,
                        "kind": r.kind,
                        "state": r.state,
                        "refcount": r.refcount,
                        "size": r.size,
                        "mountpoint": r.mountpoint,
                        "error": r.error,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'LAYER':<14} {'PARENT':<14} {'KIND':<5} {'STATE':<11} {'REFS':>4} {'SIZE':>12}")
    for r in rows:
        print(
            f"{r.id[:12]:<14} {(r.parent or '-')[:12]:<14} {r.kind:<5} {r.state:<11} "
            f"{r.refcount:>4} {'' if r.size is None else r.size:>12}"
        )
    return 0


def parser() -> argparse.ArgumentParser:
    """
    The command line.
    """
    p = argparse.ArgumentParser(
        prog="txgraph-admin",
        description="Inspect and repair a txgraph state directory.",
    )
    p.add_argument("--version", action="version", version=f"txgraph {__version__}")
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"txgraph's state directory (default {DEFAULT_STATE_DIR})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    status = sub.add_parser("status", help="layers by state, mounts, references")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="list layers with parent, state, refcount, size")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the C{txgraph-admin} console script.
    """
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    try:
        return int(args.func(args))
    except TxgraphError as e:
        print(f"txgraph-admin: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
