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
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from klein import Klein
from twisted.internet.defer import ensureDeferred
from twisted.web.iweb import IRequest

from txgraph import __version__, gc, thin
from txgraph.engine import Engine, UnixHTTPConnection
from txgraph.errors import BadRequest, TxgraphError
from txgraph.store import Store, states_in

DEFAULT_STATE_DIR = "/var/lib/txgraph"


# -- the daemon's side -----------------------------------------------------


def status_report(
    driver: Any,
    status_lines: list[tuple[str, str]],
    cluster_reads: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """
    Layers by state, mounts, mapped devices, backend health, and what each
    mounted layer read lazily from the cluster.
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
        "cluster_reads": cluster_reads or {},
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


def _sharing_backend(driver: Any) -> Any:
    backend = driver.backend.sync
    if not hasattr(backend, "publish_layer"):
        raise BadRequest(
            f"thin images need the rbd backend; this txgraph runs the {backend.name} backend"
        )
    return backend


async def thin_info(driver: Any) -> dict[str, str]:
    """
    Where this node's shared layers live (what a thin descriptor records).
    """
    _sharing_backend(driver)
    return await driver.backend.run(driver.backend.sync.shared_info)  # type: ignore[no-any-return]


async def publish_layers(
    driver: Any,
    layers: list[dict[str, Any]],
    emit: Callable[[dict[str, Any]], None],
    progress: Callable[[Callable[[int], None]], Callable[[int], None]] = lambda f: f,
) -> list[dict[str, Any]]:
    """
    Store an image's layers, bottom up, as shared images (make-thin).

    Each of C{layers} has C{diff_id} and C{path} (a layer tar on this host,
    or None to only look whether the pool has that chain).  Emits
    C{layer} events (index, chain, whether it existed) and C{progress}
    events (bytes read); C{progress} adapts the byte callback, which is
    called in a backend thread, to the caller's thread.
    """
    _sharing_backend(driver)
    results: list[dict[str, Any]] = []
    parent = ""
    for index, layer in enumerate(layers):
        diff_id = layer.get("diff_id")
        path = layer.get("path")
        if not isinstance(diff_id, str) or not thin._DIGEST.match(diff_id):
            raise BadRequest(f"layer {index}: diff_id {diff_id!r} is not sha256:<64 hex>")
        if path is not None and (not isinstance(path, str) or not os.path.isfile(path)):
            raise BadRequest(f"layer {index}: {path!r} is not a file on the txgraph host")
        total = os.path.getsize(path) if path else 0

        def report(done: int, index: int = index, total: int = total) -> None:
            emit({"event": "progress", "index": index, "done": done, "total": total})

        result = await driver.backend.publish_layer(parent, path, diff_id, progress(report))
        result = {**result, "index": index, "diff_id": diff_id,
                  "snapshot": f"{result['image']}@txgraph", "size": total}
        emit({"event": "layer", **result})
        results.append(result)
        parent = result["chain_id"]
    return results


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
        reads = await self.driver.backend.cluster_reads()
        lines = await self.driver.status(reads)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(status_report(self.driver, lines, reads)).encode()

    @app.route("/ls", methods=["POST"])
    async def ls(self, request: IRequest) -> bytes:
        """
        The layer list.
        """
        await self._ready()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(layer_list(self.driver)).encode()

    @app.route("/thin/info", methods=["POST"])
    async def thin_info(self, request: IRequest) -> bytes:
        """
        The cluster, pool and filesystem of the shared layers.
        """
        await self._ready()
        request.setHeader(b"Content-Type", b"application/json")
        try:
            return json.dumps(await thin_info(self.driver)).encode()
        except TxgraphError as e:
            request.setResponseCode(e.status)
            return json.dumps({"Err": e.message}).encode()

    @app.route("/thin/publish", methods=["POST"])
    async def thin_publish(self, request: IRequest) -> bytes:
        """
        Store layers as shared images, streamed as JSON lines (progress,
        one event per layer, the final report or an error).
        """
        from twisted.internet import reactor

        await self._ready()
        args = json.loads(request.content.read() or b"{}")
        request.setHeader(b"Content-Type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        def from_thread(report: Callable[[int], None]) -> Callable[[int], None]:
            return lambda done: reactor.callFromThread(report, done)  # type: ignore[attr-defined]

        try:
            layers = args.get("layers") if isinstance(args, dict) else None
            if not isinstance(layers, list):
                raise BadRequest("thin/publish: 'layers' must be a list")
            results = await publish_layers(self.driver, layers, emit, from_thread)
            emit({"event": "done", "layers": results})
        except TxgraphError as e:
            emit({"event": "error", "error": e.message})
        return b""

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
            reads = await driver.backend.cluster_reads()
            return status_report(driver, await driver.status(reads), reads)

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

    def __init__(self, stream: Any = sys.stderr, label: str = "gc") -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.label = label

    def show(self, done: int, total: int, what: str) -> None:
        """
        Redraw the line.
        """
        if not self.tty or not total:
            return
        width = 30
        filled = width * done // total
        self.stream.write(
            f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what[:40]:<40}"
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


_SAVED = re.compile(r"^(?:[0-9a-f]{64}\.json|manifest\.json|[0-9a-f]{64}/layer\.tar)$")


def _save_image(engine: Engine, ref: str, directory: str, layers: bool) -> dict[str, Any]:
    """
    C{docker save REF} into C{directory}: its manifest and config, and (if
    C{layers}) every C{layer.tar}.  Returns the manifest entry, with
    C{config} (the raw config JSON), C{paths} (layer tar paths, in order)
    and C{sizes} (their sizes) added.
    """
    links: dict[str, str] = {}
    sizes: dict[str, int] = {}
    with engine.save(ref) as response, tarfile.open(fileobj=response, mode="r|") as tar:
        for member in tar:
            if not _SAVED.match(member.name):
                continue
            if member.isfile():
                sizes[member.name] = member.size
            if member.name.endswith("layer.tar") and not layers:
                continue
            target = os.path.join(directory, member.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if member.issym():
                links[member.name] = os.path.normpath(
                    os.path.join(os.path.dirname(member.name), member.linkname)
                )
                continue
            if not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            with open(target, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        entry = manifest[0]
        with open(os.path.join(directory, entry["Config"])) as f:
            config = json.load(f)
    except (OSError, ValueError, LookupError, TypeError) as e:
        raise TxgraphError(f"docker save {ref} gave no usable manifest and config: {e}") from None
    paths = []
    layer_sizes = []
    for name in entry.get("Layers", []):
        name = links.get(name, name)
        if not _SAVED.match(name) or name not in sizes:
            raise TxgraphError(f"docker save {ref}: unexpected layer path {name!r}")
        paths.append(os.path.join(directory, name))
        layer_sizes.append(sizes[name])
    return {**entry, "config": config, "paths": paths, "sizes": layer_sizes}


def _thin_tar(config: dict[str, Any], descriptor: bytes, ref: str, origin: str) -> tuple[bytes, str]:
    """
    A C{docker load} archive of the thin image: the original config with
    one layer (the descriptor's) and a history saying so.  Returns the
    archive and the thin image's ID.
    """
    layer = thin.layer_tar(descriptor)
    layer_digest = hashlib.sha256(layer).hexdigest()
    new = dict(config)
    new["rootfs"] = {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]}
    history = [
        {**h, "empty_layer": True} for h in config.get("history", []) if isinstance(h, dict)
    ]
    history.append(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": f"txgraph-admin make-thin {origin}",
            "comment": f"txgraph thin image: the layers are shared RBD snapshots ({thin.DESCRIPTOR_PATH})",
        }
    )
    new["history"] = history
    raw_config = json.dumps(new, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(raw_config).hexdigest()
    manifest = [
        {"Config": f"{config_digest}.json", "RepoTags": [ref], "Layers": [f"{layer_digest}/layer.tar"]}
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (f"{config_digest}.json", raw_config),
            (f"{layer_digest}/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), f"sha256:{config_digest}"


def _thin_ref(image: dict[str, Any], given: str) -> str:
    tags = image.get("RepoTags") or []
    source = tags[0] if tags else ""
    if not source or "@" in source:
        raise TxgraphError(f"image {given!r} has no tag to derive the thin image's name from; give --tag")
    repo, _, tag = source.rpartition(":")
    if "/" in tag or not repo:
        repo, tag = source, "latest"
    return f"{repo}:{tag}-thin"


def cmd_make_thin(args: argparse.Namespace) -> int:
    """
    Make a thin image of a local image: its layers go to the pool once (as
    shared snapshots), dockerd gets an image whose only layer describes them.
    """
    engine = Engine(args.docker_host)
    image = engine.inspect_image(args.image)
    diff_ids = list(image.get("RootFS", {}).get("Layers") or [])
    if not diff_ids:
        raise TxgraphError(f"image {args.image!r} has no layers")
    ref = args.tag or _thin_ref(image, args.image)
    daemon = Daemon(args.state_dir)
    online = daemon.available()
    progress = Progress(label="make-thin")

    def handle(event: dict[str, Any]) -> None:
        if event["event"] == "progress" and event["total"]:
            index = event["index"]
            progress.show(event["done"], event["total"], f"layer {index + 1}/{len(diff_ids)}")
        elif event["event"] == "layer" and not args.json:
            how = "already in the pool" if event["existed"] else "stored"
            print(f"layer {event['index'] + 1}/{len(diff_ids)} {event['chain_id'][7:19]}: {how}",
                  file=sys.stderr)

    def publish(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if online:
            for line in daemon.stream("/thin/publish", {"layers": layers}):
                event = json.loads(line)
                if event["event"] == "error":
                    raise TxgraphError(event["error"])
                if event["event"] == "done":
                    return list(event["layers"])
                handle(event)
            raise TxgraphError("txgraph's admin socket closed before make-thin finished")

        async def work(driver: Any) -> list[dict[str, Any]]:
            return await publish_layers(driver, layers, handle)

        return list(_offline(args, work))

    if online:
        info = daemon.call("/thin/info")
        if "Err" in info:
            raise TxgraphError(info["Err"])
    else:
        info = _offline(args, thin_info)
    if args.pool is not None and args.pool != info["pool"]:
        raise TxgraphError(
            f"--pool {args.pool}: this txgraph keeps its layers in pool {info['pool']}; "
            "make thin images with a txgraph on that pool"
        )
    present = publish([{"diff_id": d, "path": None} for d in diff_ids])
    missing = not all(r["existed"] for r in present)
    with tempfile.TemporaryDirectory(prefix="txgraph-make-thin-", dir=args.tmpdir) as tmp:
        saved = _save_image(engine, image["Id"], tmp, layers=missing)
        if len(saved["paths"]) != len(diff_ids):
            raise TxgraphError(
                f"docker save {args.image} gave {len(saved['paths'])} layers, its config {len(diff_ids)}"
            )
        if missing:
            results = publish(
                [{"diff_id": d, "path": p} for d, p in zip(diff_ids, saved["paths"])]
            )
        else:
            results = present
            for r in results:
                handle({"event": "layer", **r})
    sizes = saved["sizes"]
    results = [{**r, "size": size} for r, size in zip(results, sizes)]
    descriptor = thin.render(
        info["fsid"],
        info["pool"],
        info["namespace"],
        info["filesystem"],
        [thin.ThinLayer(r["snapshot"], r["chain_id"], r["diff_id"], s) for r, s in zip(results, sizes)],
        image["Id"],
        saved["config"],
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    archive, thin_id = _thin_tar(saved["config"], descriptor, ref, args.image)
    engine.load(archive)
    report = {
        "image": args.image,
        "image_id": image["Id"],
        "thin_image": ref,
        "thin_id": thin_id,
        "layers": results,
        "descriptor": json.loads(descriptor),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        stored = sum(1 for r in results if not r["existed"])
        where = "/".join(p for p in (info["pool"], info["namespace"]) if p)
        print(
            f"{ref} ({thin_id[7:19]}): thin image of {args.image}; {len(results)} layer(s) in "
            f"pool {where}, {stored} stored now, {len(results) - stored} already there"
        )
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
