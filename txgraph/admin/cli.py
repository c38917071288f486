"""
The C{txgraph-admin} command line: C{status}, C{ls}, C{gc} and
C{make-thin} (L{txgraph.admin.make_thin}), each through the running
daemon's admin socket or on a stopped daemon's state; and
C{install-units} (L{txgraph.systemd.install}), which writes the systemd
units; and C{top} (L{txgraph.admin.top}), the running daemon's busiest
operations from its metrics.

Exit codes: 0 clean, 1 orphans found (C{gc}), 2 error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from txgraph import __version__
from txgraph.admin.client import Daemon, offline
from txgraph.admin.make_thin import cmd_make_thin
from txgraph.admin.progress import Progress
from txgraph.admin.tasks import layer_list, run_gc, status_report
from txgraph.admin.top import cmd_top
from txgraph.errors import TxgraphError
from txgraph.systemd.install import UNIT_DIR, default_twistd, install_units

DEFAULT_STATE_DIR = "/var/lib/txgraph"


def _docker_home(args: argparse.Namespace) -> str | None:
    if args.docker_root is None:
        return None
    return os.path.join(args.docker_root, args.driver)


def cmd_status(args: argparse.Namespace) -> int:
    """
    Layers by state, mounts, mapped devices, backend health.
    """
    daemon = Daemon(args.state_dir)
    if daemon.available():
        report = daemon.call("/status")
    else:
        async def work(driver: Any, snapshotter: Any) -> dict[str, Any]:
            reads = await driver.backend.cluster_reads()
            return status_report(driver, await driver.status(reads), reads, snapshotter)

        report = offline(args, work)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"state directory: {report['state_dir']}")
    print(f"backend:         {report['backend']}")
    print(f"dockerd home:    {report['docker_home'] or '(no Init yet)'}")
    print(f"layers:          {report['layers']}")
    for state, n in sorted(report["states"].items()):
        print(f"  {state:<12} {n}")
    print(f"mounted:         {report['mounted']} ({report['references']} references)")
    print(f"mapped devices:  {len(report['mapped'])}")
    for m in report["mapped"]:
        print(f"  {m['id'][:12]}  {m['mapping']}")
    for key, value in report["health"].items():
        print(f"{key + ':':<17}{value}")
    for f in report["faulty"]:
        print(f"faulty {f['id']}: {f['error']}")
    kinds = report.get("snapshot_kinds", {})
    print(
        f"containerd snapshots: {report.get('snapshots', 0)}"
        + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")" if kinds else "")
    )
    for layer_id, reads in report.get("cluster_reads", {}).items():
        print(
            f"lazy reads {layer_id[:12]}: {reads['bytes_read']} bytes from the cluster "
            f"({reads['reads']} reads; image {reads['image_size']} bytes)"
        )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """
    One line per layer: ID, parent, kind, state, references, size.
    """
    daemon = Daemon(args.state_dir)
    if daemon.available():
        rows = daemon.call("/ls")
    else:
        async def work(driver: Any, snapshotter: Any) -> list[dict[str, Any]]:
            return layer_list(driver, snapshotter)

        rows = offline(args, work)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'LAYER':<14} {'PARENT':<14} {'KIND':<5} {'STATE':<11} {'REFS':>4} {'SIZE':>12}  "
        "CONTAINERD SNAPSHOT"
    )
    for r in rows:
        size = "" if r["size"] is None else r["size"]
        snapshot = r.get("snapshot")
        held = f"{snapshot['kind']} {snapshot['key']}" if snapshot else "-"
        print(
            f"{r['id'][:12]:<14} {(r['parent'] or '-')[:12]:<14} {r['kind']:<5} "
            f"{r['state']:<11} {r['refcount']:>4} {size:>12}  {held}"
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """
    Find (and with --apply, repair) what crashes left behind.
    """
    daemon = Daemon(args.state_dir)
    progress = Progress()
    body = {"apply": args.apply, "docker_home": _docker_home(args), "min_age": args.min_age}
    final: list[dict[str, Any]] = []

    def handle(event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            progress.show(event["done"], event["total"], event["id"])
        elif event["event"] == "done":
            final.extend(event["findings"])

    if daemon.available():
        for line in daemon.stream("/gc", body):
            handle(json.loads(line))
    else:
        async def work(driver: Any, snapshotter: Any) -> None:
            await run_gc(driver, args.apply, body["docker_home"], args.min_age, handle, snapshotter)

        offline(args, work)
    if args.json:
        print(json.dumps({"applied": args.apply, "findings": final}, indent=2))
    elif not final:
        print("gc: nothing to collect")
    else:
        print(f"{'KIND':<8} {'WHAT':<66} {'RESULT':<10} DETAIL")
        for f in final:
            result = (
                "repaired" if f["repaired"] else f"FAILED: {f['error']}" if f["error"] else "found"
            )
            print(f"{f['kind']:<8} {f['id']:<66} {result:<10} {f['detail']}")
        if not args.apply:
            print(f"gc: {len(final)} orphan(s); run again with --apply to repair them")
    if any(f["error"] for f in final):
        return 2
    return 1 if final else 0


def cmd_install_units(args: argparse.Namespace) -> int:
    """
    Write txgraph's systemd units, and say how to enable them.
    """
    written = install_units(
        args.prefix,
        args.twistd or default_twistd(),
        os.path.abspath(args.state_dir),
        plain=args.plain,
        force=args.force,
    )
    for unit in written:
        print(f"{'wrote' if unit.changed else 'unchanged'} {unit.path}")
    first = "txgraph.service" if args.plain else "txgraph.socket"
    print(f"now run: systemctl daemon-reload && systemctl enable --now {first}")
    return 0


def parser() -> argparse.ArgumentParser:
    """
    The command line.
    """
    p = argparse.ArgumentParser(
        prog="txgraph-admin",
        description="Inspect and repair a txgraph state directory. While txgraph runs, "
        "commands go through its admin socket; otherwise they open the state directly.",
        epilog="Exit codes: 0 clean, 1 orphans found (gc), 2 error.",
    )
    p.add_argument("--version", action="version", version=f"txgraph {__version__}")
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"txgraph's state directory (default {DEFAULT_STATE_DIR})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    status = sub.add_parser("status", help="layers by state, mounts, mapped devices, backend health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="list layers with parent, state, refcount, size")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    collect = sub.add_parser(
        "gc",
        help="find what crashes left behind (dry run); --apply repairs it",
        description="Compare txgraph's database, its backend (this node's objects only) "
        "and, with --docker-root, dockerd's layer store; list every orphan by kind "
        "(mount, device, object, row, faulty, unknown) and, on rbd, shared layers "
        "that no node uses (shared).",
    )
    collect.add_argument("--apply", action="store_true", help="repair or remove the orphans")
    collect.add_argument("--json", action="store_true", help="machine-readable output")
    collect.add_argument(
        "--docker-root",
        help="dockerd's data root (default: from dockerd's Init, if txgraph has seen one)",
    )
    collect.add_argument(
        "--driver", default="txgraph", help="the name dockerd knows txgraph by (default txgraph)"
    )
    collect.add_argument(
        "--min-age",
        type=float,
        default=300.0,
        help="only call a layer unknown to dockerd after this many seconds at rest (default 300)",
    )
    collect.set_defaults(func=cmd_gc)
    make = sub.add_parser(
        "make-thin",
        help="make a thin image: layers stored once in the pool, an image that describes them",
        description="Store each layer of a local image once in the pool, as a protected "
        "snapshot named by its chain ID (skipping those already there), and load into "
        "dockerd a thin image whose only layer is a descriptor of them, with the original "
        "config. Needs the rbd backend.",
    )
    make.add_argument("image", help="the image (name, tag or ID) in the local dockerd")
    make.add_argument("--tag", help="name of the thin image (default: <repository>:<tag>-thin)")
    make.add_argument("--pool", help="the pool to use (must be the one txgraph uses)")
    make.add_argument(
        "--docker-host",
        help="dockerd's API socket (default: $DOCKER_HOST, else unix:///var/run/docker.sock)",
    )
    make.add_argument(
        "--tmpdir", help="where docker save's layers are kept while stored (default: $TMPDIR)"
    )
    make.add_argument("--json", action="store_true", help="machine-readable output")
    make.set_defaults(func=cmd_make_thin)
    top = sub.add_parser(
        "top",
        help="the busiest operations and their latencies, refreshed (needs --metrics-listen)",
        description="Show, per front end and method, calls per second over each interval, "
        "calls and errors since start, and latency (mean, p50, p90 from the histogram "
        "buckets), from the running daemon's metrics read through its admin socket. The "
        "daemon counts only when started with --metrics-listen.",
    )
    top.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    top.add_argument("--once", action="store_true", help="one refresh, then exit")
    top.add_argument("--iterations", type=int, help="this many refreshes, then exit")
    top.add_argument("--limit", type=int, default=20, help="rows shown (default 20)")
    top.set_defaults(func=cmd_top)
    units = sub.add_parser(
        "install-units",
        help="write txgraph's systemd units (socket-activated, or --plain)",
        description="Write txgraph.socket and txgraph.service (socket-activated: systemd "
        "makes the plugin socket) or, with --plain, a txgraph.service that makes its own "
        "socket, with this installation's twistd and --state-dir filled in. A differing "
        "unit file already there is kept unless --force.",
    )
    units.add_argument(
        "--prefix", default=UNIT_DIR, help=f"the unit directory (default {UNIT_DIR})"
    )
    units.add_argument(
        "--twistd", help=f"the twistd that runs txgraph (default: {default_twistd()})"
    )
    units.add_argument("--plain", action="store_true", help="no socket activation")
    units.add_argument("--force", action="store_true", help="replace differing unit files")
    units.set_defaults(func=cmd_install_units)
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
    except OSError as e:
        print(f"txgraph-admin: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
