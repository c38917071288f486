"""
Garbage collection: find, and on request repair, what a crash of txgraph,
dockerd or the host left behind.

Three sources of truth are compared: txgraph's database (through the
running L{LayerRegistry}), the backend's reality (mounts, mapped devices,
directories or RBD images of this node), and, given dockerd's data root,
dockerd's own layer store (C{image/<driver>/layerdb/sha256/*/cache-id},
C{mounts/*/mount-id} and C{init-id}).  Every orphan has a kind:

 - C{mount}: something mounted under txgraph's directories that no
   mounted layer holds;
 - C{device}: a mapped block device that belongs to no layer;
 - C{object}: backend storage with no layer row;
 - C{row}: a layer row whose storage is gone;
 - C{faulty}: a layer a failed operation left faulty;
 - C{unknown}: a layer dockerd no longer knows (untouched for C{min_age}),
   e.g. after dockerd crashed between Create and recording it, or gave up
   on a Get whose answer a txgraph crash swallowed.  A layer dockerd does
   not know cannot be in use by it, so its references (if any) are
   released before it is removed;
 - C{snapshot}: a containerd snapshot whose layer is gone (gc removed a
   faulty one, say); repaired by forgetting the snapshot.  containerd's
   layers are never C{unknown}: dockerd's layer store does not know them,
   their snapshots do;
 - C{shared}: storage shared by the nodes of a pool (rbd: a layer's shared
   snapshot) that no node's layer uses any more, older than C{min_age}.
   Whether anything uses it is the cluster's to say (RBD clone children),
   not this node's database, so a gc on any node is safe.

Repairs of layers go through the layer machines (so they are write-ahead
too); mounts, devices and objects go to the backend.  gc never touches
another node's RBD images: backends list only their own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.logger import Logger

from txgraph import metrics
from txgraph.backends import LayerView, Orphan
from txgraph.layers.core import REST_STATES

log = Logger()

KINDS = ("mount", "device", "object", "row", "faulty", "unknown", "snapshot", "shared")


@dataclass
class Finding:
    """
    One orphan, and what became of it.
    """

    kind: str
    id: str
    detail: str
    repaired: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """
        A JSON-able form.
        """
        return asdict(self)


def docker_layers(home: str) -> set[str] | None:
    """
    The layer IDs dockerd knows, read from its layer store, given Init's
    C{Home} (C{<data-root>/<driver>}); None if there is no layer store.
    Entries being removed (C{*-removing}) do not count as known.
    """
    root, driver = os.path.split(home.rstrip("/"))
    layerdb = os.path.join(root, "image", driver, "layerdb")
    if not os.path.isdir(layerdb):
        return None
    known: set[str] = set()
    sha = os.path.join(layerdb, "sha256")
    for name in os.listdir(sha) if os.path.isdir(sha) else []:
        if name.endswith("-removing"):
            continue
        _read_id(os.path.join(sha, name, "cache-id"), known)
    mounts = os.path.join(layerdb, "mounts")
    for name in os.listdir(mounts) if os.path.isdir(mounts) else []:
        _read_id(os.path.join(mounts, name, "mount-id"), known)
        _read_id(os.path.join(mounts, name, "init-id"), known)
    return known


def _read_id(path: str, into: set[str]) -> None:
    try:
        with open(path) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return
    if value:
        into.add(value)


async def collect(
    driver: Any, docker_home: str | None, min_age: float = 300.0, snapshotter: Any = None
) -> list[Finding]:
    """
    Every orphan, without changing anything.
    """
    registry = driver.registry
    snapshots = snapshotter.rows() if snapshotter is not None else []
    containerd_layers = {s.layer_id for s in snapshots}
    rows = registry.rows()
    views = {
        r.id: LayerView(id=r.id, state=r.state, mountpoint=r.mountpoint, mapping=r.mapping)
        for r in rows
    }
    findings = [
        Finding(o.kind, o.id, o.detail)
        for o in await driver.backend.orphans(views)
    ]
    for row in rows:
        if row.state == "faulty":
            findings.append(Finding("faulty", row.id, row.error or "faulty"))
        elif row.state in REST_STATES and not await driver.backend.exists(registry.info(row.id)):
            findings.append(
                Finding("row", row.id, "the layer's storage is missing from the backend")
            )
    home = docker_home or (driver.init_args.home if driver.init_args else None)
    if home:
        known = await driver.backend.run(docker_layers, home)
        if known is not None:
            now = time.time()
            reported = {f.id for f in findings}
            for row in rows:
                if row.id in known or row.id in reported or row.id in containerd_layers:
                    continue
                # A layer at rest (mapped: its device kept after the last
                # Put); not one with an operation in flight.
                if row.state not in ("created", "mapped", "mounted") or (
                    row.state == "created" and row.refcount
                ):
                    continue
                if now - row.updated_at < min_age:
                    continue
                held = f", yet holds {row.refcount} reference(s)" if row.refcount else ""
                findings.append(
                    Finding("unknown", row.id, f"dockerd ({home}) no longer knows this layer{held}")
                )
    for snapshot in snapshots:
        if snapshot.layer_id not in registry:
            findings.append(
                Finding(
                    "snapshot",
                    snapshot.layer_id,
                    f"containerd snapshot {snapshot.key} ({snapshot.kind}): its layer is gone",
                )
            )
    order = {kind: i for i, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], f.id))
    # Shared storage in the order the backend gives: users before what they use.
    findings += [
        Finding(o.kind, o.id, o.detail) for o in await driver.backend.shared_orphans(min_age)
    ]
    if metrics.current is not None:
        for finding in findings:
            metrics.current.gc_findings.labels(finding.kind).inc()
    return findings


async def repair(
    driver: Any,
    findings: list[Finding],
    snapshotter: Any = None,
    progress: Callable[[int, int, Finding], None] = lambda i, n, f: None,
) -> None:
    """
    Repair every finding: unmount, unmap or delete backend leftovers;
    remove faulty, storage-less and unknown layers, children first; forget
    containerd snapshots whose layer is gone (or was removed here).
    """
    registry = driver.registry
    doomed = {f.id for f in findings if f.kind in ("faulty", "row", "unknown")}

    def depth(finding: Finding) -> int:
        if finding.id not in doomed or finding.id not in registry:
            return 0
        return -len(registry.chain(finding.id))

    ordered = sorted(findings, key=lambda f: (f.id in doomed, depth(f)))
    for i, finding in enumerate(ordered):
        progress(i, len(ordered), finding)
        try:
            if finding.kind in ("faulty", "row", "unknown"):
                if finding.id in registry and finding.kind == "unknown":
                    # References dockerd cannot hold: it does not know the layer.
                    while registry.lookup(finding.id).row.refcount > 0:
                        await registry.put(finding.id)
                if finding.id in registry:
                    await registry.remove(finding.id)
                if snapshotter is not None:
                    await snapshotter.forget_layer(finding.id)
            elif finding.kind == "snapshot":
                if snapshotter is not None:
                    await snapshotter.forget_layer(finding.id)
            else:
                await driver.backend.repair(Orphan(finding.kind, finding.id, finding.detail))
            finding.repaired = True
        except Exception as e:
            finding.error = str(e)
            log.error("gc could not repair {kind} {id}: {error}", kind=finding.kind,
                      id=finding.id, error=e)
    progress(len(ordered), len(ordered), findings[-1] if findings else Finding("", "", ""))
