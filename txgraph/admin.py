"""
C{txgraph-admin}: the administrator's view of a txgraph state directory,
and garbage collection after an incident.

While txgraph runs, the commands ask it through its admin socket
(C{<state-dir>/admin.sock}, mode 0600, root only), so the database keeps
one writer.  When it is stopped, C{txgraph-admin} takes the state
directory's lock, opens the database and the backend itself, recovers
what was in flight exactly as the daemon would at start, and works on
that.

This module holds both ends: L{AdminAPI}, the Klein resource the daemon
serves on the admin socket, and L{main}, the command line.

Exit codes: 0 clean, 1 orphans found (C{gc}), 2 error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from klein import Klein
from twisted.internet.defer import ensureDeferred
from twisted.web.iweb import IRequest

from txgraph import __version__, gc
from txgraph.errors import TxgraphError
from txgraph.store import Store, states_in

DEFAULT_STATE_DIR = "/var/lib/txgraph"


# -- the daemon's side -----------------------------------------------------


def status_report(driver: Any, status_lines: list[tuple[str, str]]) -> dict[str, Any]:
    """
    Layers by state, mounts, mapped devices and backend health.
    """
    rows = driver.registry.rows()
    counts = states_in(rows)
    return {
        "state_dir": driver.state_dir,
        "backend": driver.backend.name,
        "layers": len(rows),
        "states": counts,
        "mounted": counts.get("mounted", 0),
        "references": sum(r.refcount for r in rows),
        "mapped": [
            {"id": r.id, "mapping": r.mapping} for r in rows if r.mapping is not None
        ],
        "faulty": [{"id": r.id, "error": r.error} for r in rows if r.state == "faulty"],
        "docker_home": driver.init_args.home if driver.init_args else None,
        "health": dict(status_lines),
        "recovered_at_start": driver.recovered,
    }


def layer_list(driver: Any) -> list[dict[str, Any]]:
    """
    Every layer with parent, kind, state, references and size.
    """
    return [
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
        for r in driver.registry.rows()
    ]


async def run_gc(
    driver: Any,
    apply: bool,
    docker_home: str | None,
    min_age: float,
    emit: Callable[[dict[str, Any]], None],
) -> list[gc.Finding]:
    """
    Collect orphans, emit each, repair them if asked (emitting progress),
    and emit the final report.
    """
    findings = await gc.collect(driver, docker_home, min_age)
    for finding in findings:
        emit({"event": "finding", **finding.to_json()})
    if apply and findings:
        await gc.repair(
            driver,
            findings,
            lambda i, n, f: emit({"event": "progress", "done": i, "total": n, "id": f.id}),
        )
    emit({"event": "done", "findings": [f.to_json() for f in findings]})
    return findings


class AdminAPI:
    """
    What the admin socket serves: status, ls and gc, as JSON.
    """

    app = Klein()

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def _ready(self) -> None:
        if not self.driver.ready.called:
            await self.driver.ready

    @app.route("/status", methods=["POST"])
    async def status(self, request: IRequest) -> bytes:
        """
        The status report.
        """
        await self._ready()
        lines = await self.driver.status()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(status_report(self.driver, lines)).encode()

    @app.route("/ls", methods=["POST"])
    async def ls(self, request: IRequest) -> bytes:
        """
        The layer list.
        """
        await self._ready()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(layer_list(self.driver)).encode()

    @app.route("/gc", methods=["POST"])
    async def gc(self, request: IRequest) -> bytes:
        """
        Garbage collection, streamed as JSON lines (findings, progress, the
        final report).
        """
        await self._ready()
        args = json.loads(request.content.read() or b"{}")
        request.setHeader(b"Content-Type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        await run_gc(
            self.driver,
            bool(args.get("apply")),
            args.get("docker_home"),
            float(args.get("min_age", 300)),
            emit,
        )
        return b""


# -- the command line --------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over a UNIX socket (the admin socket; the tests also speak to the
    plugin socket with it, as dockerd does).
    """

    def __init__(self, path: str, timeout: float = 3600) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Daemon:
    """
    The running daemon, asked through its admin socket.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "admin.sock")

    def available(self) -> bool:
        """
        Whether a daemon answers on the admin socket.
        """
        try:
            conn = UnixHTTPConnection(self.path)
            conn.connect()
            conn.close()
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """
        POST and decode a JSON reply.
        """
        return json.loads(b"".join(self.stream(path, body)))

    def stream(self, path: str, body: dict[str, Any] | None = None) -> Iterator[bytes]:
        """
        POST and yield the reply's lines as they come.
        """
        conn = UnixHTTPConnection(self.path)
        conn.request("POST", path, body=json.dumps(body or {}).encode())
        response = conn.getresponse()
        if response.status != 200:
            raise TxgraphError(
                f"txgraph's admin socket answered {response.status}: "
                f"{response.read().decode(errors='replace')[:500]}"
            )
        while line := response.readline():
            yield line
        conn.close()


def _offline(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    """
    Run C{work(driver)} on a stopped daemon's state: take the lock, open the
    database and backend, recover, then work, then close everything.
    """
    from twisted.internet import reactor
    from twisted.internet.task import react
    from twisted.python.threadpool import ThreadPool

    from txgraph.store import DatabaseThread
    from txgraph.tap import StateDirLock, open_driver

    path = os.path.join(args.state_dir, "txgraph.db")
    if not os.path.exists(path):
        raise TxgraphError(f"no txgraph state database at {path} (is --state-dir right?)")
    config = Store(path).get_config_thd()
    backend = config.get("backend") or "overlay"
    options = config.get("backend_options") or {}
    result: dict[str, Any] = {}

    async def main(_reactor: Any) -> None:
        lock = StateDirLock(args.state_dir)
        pool = ThreadPool(minthreads=0, maxthreads=4, name="txgraph-backend")
        dbthread = DatabaseThread(reactor)  # type: ignore[arg-type]
        try:
            driver = open_driver(reactor, args.state_dir, backend, options, lock, pool, dbthread)
        except TxgraphError as e:
            lock.release()
            result["error"] = e.message
            return
        try:
            await driver.start()
            result["value"] = await work(driver)
        except TxgraphError as e:
            result["error"] = e.message
        finally:
            dbthread.stop()
            pool.stop()
            driver.backend.sync.stop()
            lock.release()

    try:
        react(lambda r: ensureDeferred(main(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise TxgraphError(result.get("error", "the offline run failed")) from None
    if "error" in result:
        raise TxgraphError(result["error"])
    return result.get("value")


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
        async def work(driver: Any) -> dict[str, Any]:
            return status_report(driver, await driver.status())

        report = _offline(args, work)
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
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """
    One line per layer: ID, parent, kind, state, references, size.
    """
    daemon = Daemon(args.state_dir)
    if daemon.available():
        rows = daemon.call("/ls")
    else:
        async def work(driver: Any) -> list[dict[str, Any]]:
            return layer_list(driver)

        rows = _offline(args, work)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'LAYER':<14} {'PARENT':<14} {'KIND':<5} {'STATE':<11} {'REFS':>4} {'SIZE':>12}")
    for r in rows:
        size = "" if r["size"] is None else r["size"]
        print(
            f"{r['id'][:12]:<14} {(r['parent'] or '-')[:12]:<14} {r['kind']:<5} "
            f"{r['state']:<11} {r['refcount']:>4} {size:>12}"
        )
    return 0


class Progress:
    """
    A one-line progress display on a terminal (nothing otherwise).
    """

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def show(self, done: int, total: int, what: str) -> None:
        """
        Redraw the line.
        """
        if not self.tty or not total:
            return
        width = 30
        filled = width * done // total
        self.stream.write(
            f"\rgc: [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what[:40]:<40}"
        )
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


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
        async def work(driver: Any) -> None:
            await run_gc(driver, args.apply, body["docker_home"], args.min_age, handle)

        _offline(args, work)
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
        "(mount, device, object, row, faulty, unknown).",
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
