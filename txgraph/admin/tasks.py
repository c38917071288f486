"""
What the admin commands do on a driver: the status report, the layer
list, gc, and storing an image's layers as shared layers (make-thin).  The
daemon runs them for its admin socket (L{txgraph.admin.service}), the
command line on a stopped daemon's state (L{txgraph.admin.client}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from txgraph import gc, thin
from txgraph.errors import BadRequest
from txgraph.store import states_in


def status_report(
    driver: Any,
    status_lines: list[tuple[str, str]],
    cluster_reads: dict[str, dict[str, Any]] | None = None,
    snapshotter: Any = None,
) -> dict[str, Any]:
    """
    Layers by state, mounts, mapped devices, backend health, what each
    mounted layer read lazily from the cluster, and containerd's snapshots
    by kind.
    """
    rows = driver.registry.rows()
    snapshots = snapshotter.rows() if snapshotter is not None else []
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
        "snapshots": len(snapshots),
        "snapshot_kinds": {
            kind: sum(1 for r in snapshots if r.kind == kind)
            for kind in sorted({r.kind for r in snapshots})
        },
    }


def layer_list(driver: Any, snapshotter: Any = None) -> list[dict[str, Any]]:
    """
    Every layer with parent, kind, state, references and size, and the
    containerd snapshot it holds (key and kind), if any.
    """
    snapshots = {r.layer_id: r for r in snapshotter.rows()} if snapshotter is not None else {}
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
            "snapshot": (
                {"key": snapshots[r.id].key, "kind": snapshots[r.id].kind}
                if r.id in snapshots
                else None
            ),
        }
        for r in driver.registry.rows()
    ]


def _check_shares_layers(driver: Any) -> None:
    if not driver.backend.shares_layers:
        raise BadRequest(
            f"thin images need the rbd backend; this txgraph runs the {driver.backend.name} backend"
        )


async def thin_info(driver: Any) -> dict[str, str]:
    """
    Where this node's shared layers live (what a thin descriptor records).
    """
    _check_shares_layers(driver)
    return await driver.backend.shared_info()  # type: ignore[no-any-return]


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
    _check_shares_layers(driver)
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
    snapshotter: Any = None,
) -> list[gc.Finding]:
    """
    Collect orphans, emit each, repair them if asked (emitting progress),
    and emit the final report.
    """
    findings = await gc.collect(driver, docker_home, min_age, snapshotter)
    for finding in findings:
        emit({"event": "finding", **finding.to_json()})
    if apply and findings:
        await gc.repair(
            driver,
            findings,
            snapshotter,
            lambda i, n, f: emit({"event": "progress", "done": i, "total": n, "id": f.id}),
        )
    emit({"event": "done", "findings": [f.to_json() for f in findings]})
    return findings
