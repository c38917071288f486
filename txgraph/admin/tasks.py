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
