#!/usr/bin/env python3
"""
One rbd layer's life, in-process, step by step: a chain of ``N`` layers
(``N`` env, default 20) driven as the layer machines drive moby's
DeepLayerRead (unmap the parent, commit it, clone and premap the child,
mount, write, unmount), on a throwaway Ceph dev cluster (memstore), with
every backend, mapper and cluster call of interest timed.

    N=128 python bench/rbd_layer_profile.py
    N=20 python bench/rbd_layer_profile.py --old /tmp/old-checkout --reps 3

Prints the median of each step and, per call, its median, total and
count (nested calls are counted in their callers too).  With ``--old
DIR``, runs this checkout's backend and DIR's in turns (``--reps`` each,
each run a process and a dev cluster of its own) and prints the median
of each step per tree and their ratio (new / old).  Layers are made with
``commit_expected`` where the backend knows it (issue 18: the image is
opened for the commit while the layer is mapped).  Run as root.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

if "--tree" in sys.argv:
    TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
else:
    TREE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TREE))

from txgraph import mounts  # noqa: E402
from txgraph.backends import LayerInfo, parse_options  # noqa: E402
from txgraph.backends.rbd import (  # noqa: E402
    RBDBackend,  # noqa: E402
    clones,
    cluster,
    devices,
    trash,
)
from txgraph.backends.rbd.mappers import fuse  # noqa: E402
from txgraph.testing.ceph import DevCluster  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(owner: Any, name: str, label: str) -> None:
    """
    Replace C{owner.name} by a wrapper recording its wall time.
    """
    function = getattr(owner, name, None)
    if function is None:
        return

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def instrument() -> None:
    """
    Time the calls a layer's life makes.
    """
    for cls, names in [
        (RBDBackend, ["prepare", "commit", "map", "unmap", "mount", "unmount", "remove"]),
        (devices.Devices, ["release", "mappings", "mount_layer", "unmount"]),
        (fuse.FuseMapper, ["start", "map", "unmap", "_stop_fuse", "_wait_exit", "find"]),
        (clones.Clones, ["clone", "fresh_clone", "destroy"]),
        (cluster.Cluster, ["snapshot", "set_meta", "inspect", "clear_stale_clients", "image"]),
        (trash.Trash, ["move"]),
    ]:
        for name in names:
            timed(cls, name, f"{cls.__name__}.{name}")
    run = fuse.run

    def timed_run(command: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(command, *args, **kwargs)
        finally:
            TIMES[f"run {command[0]}"].append(time.perf_counter() - start)

    fuse.run = timed_run  # type: ignore[assignment]
    with contextlib.suppress(ImportError):
        from txgraph.backends.rbd import handles

        timed(handles.Handles, "_open", "Handles._open (background)")
        timed(handles.Handles, "take", "Handles.take")
    timed(mounts, "mount", "mount(2)")
    timed(mounts, "unmount", "umount(2)")


def start_backend(dev: DevCluster, state_dir: str, **options: str) -> RBDBackend:
    """
    An rbd backend on the dev cluster, in a namespace of its own, with its
    state in C{state_dir}; C{options} add to or replace the defaults (32M
    base).
    """
    import rados
    import rbd

    conn = rados.Rados(conffile=dev.conf)
    conn.connect(timeout=30)
    ioctx = conn.open_ioctx(dev.pool)
    namespace = f"p{uuid.uuid4().hex[:8]}"
    rbd.RBD().namespace_create(ioctx, namespace)
    ioctx.close()
    conn.shutdown()
    parsed = parse_options(RBDBackend, {
        "conf": dev.conf, "client": DevCluster.client_id, "keyring": dev.client_keyring,
        "pool": dev.pool, "namespace": namespace, "base_size": "32M",
        "node_id": "node-a", "timeout": "20", **options,
    })
    backend = RBDBackend(state_dir, parsed)
    backend.start()
    return backend


@contextlib.contextmanager
def dev_cluster_and_state(name: str) -> Iterator[tuple[DevCluster, str]]:
    """
    A throwaway dev cluster and a state directory; afterwards, whatever
    happened, the cluster is down and the directory unmounted and gone.
    """
    dev = DevCluster(tempfile.mkdtemp(prefix=f"txgraph-{name}-ceph-"))
    state = tempfile.mkdtemp(prefix=f"txgraph-{name}-state-")
    dev.up()
    try:
        yield dev, state
    finally:
        # The cluster's teardown releases every rbd-fuse started with its
        # conf and the loop devices and mounts on them; then what is left.
        dev.down()
        for point in sorted(mounts.mounted_under(state), key=len, reverse=True):
            mounts.unmount(point)
        shutil.rmtree(state, ignore_errors=True)


def compare(old: str, reps: int, variants: list[str]) -> int:
    """
    This checkout and C{old} in turns (and this checkout with the
    environment of each variant, C{LABEL:NAME=VALUE}), C{reps} runs each;
    the medians of each run's step medians, and each / old.
    """
    script = str(Path(__file__).resolve())
    trees = {"old": str(Path(old).resolve()), "new": str(TREE)}
    envs: dict[str, dict[str, str]] = {"old": {}, "new": {}}
    for variant in variants:
        label, _, assignment = variant.partition(":")
        key, _, value = assignment.partition("=")
        trees[label], envs[label] = str(TREE), {key: value}
    labels = list(trees)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for rep in range(reps):
        for label in labels if rep % 2 == 0 else list(reversed(labels)):
            out = subprocess.run(
                [sys.executable, script, "--tree", trees[label], "--json"],
                check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, **envs[label]},
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[label].append(result)
            print(f"rep {rep + 1} {label}: {result['per_layer_ms']:.0f} ms/layer, "
                  f"commit {result['steps']['2 commit the parent']:.1f} ms, "
                  f"prepare {result['steps']['3 prepare (clone, premap)']:.1f} ms, "
                  f"handles {result.get('handles')}", flush=True)
    print(f"median over runs (ms): {', '.join(labels)}; each / old")
    keys = ["per_layer_ms"] + [f"steps/{k}" for k in sorted(runs["new"][0]["steps"])]
    calls = sorted(set().union(*(r[0]["calls"] for r in runs.values())))
    keys += [f"calls/{k}" for k in calls]
    fmt = lambda v: f"{v:8.1f}" if v is not None else "       -"  # noqa: E731
    for key in keys:
        values = {}
        for label in labels:
            got = []
            for r in runs[label]:
                v: Any = r
                for part in key.split("/", 1):
                    v = v.get(part) if isinstance(v, dict) else None
                if v is not None:
                    got.append(v)
            values[label] = statistics.median(got) if got else None
        o = values["old"]
        ratios = " ".join(
            f"{values[label] / o:.2f}" if o and values[label] is not None else "-"
            for label in labels[1:]
        )
        print(f"  {key:40s} {' '.join(fmt(values[label]) for label in labels)}  {ratios}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--old", help="an older checkout, run in turns with this one")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE",
                        help="this checkout again, with NAME=VALUE in its environment")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    if args.old:
        return compare(args.old, args.reps, args.variant)
    count = int(os.environ.get("N", "20"))
    expect = (
        {"commit_expected": True}
        if "commit_expected" in {f.name for f in dataclasses.fields(LayerInfo)}
        else {}
    )
    instrument()
    with dev_cluster_and_state("profile") as (dev, state):
        backend = start_backend(dev, state)
        infos: dict[str, LayerInfo] = {}
        steps: dict[str, list[float]] = collections.defaultdict(list)

        def step(name: str, work: Any, *args: Any) -> Any:
            start = time.perf_counter()
            result = work(*args)
            steps[name].append(time.perf_counter() - start)
            return result

        last: str | None = None
        began = time.perf_counter()
        for i in range(count + 1):
            layer_id = uuid.uuid4().hex
            if last is not None:
                parent = infos[last]
                if parent.mapping is not None:
                    step("1 unmap the parent", backend.unmap, parent)
                    parent = replace(parent, mapping=None)
                step("2 commit the parent", backend.commit, parent)
                infos[last] = replace(parent, committed=True)
            info = LayerInfo(id=layer_id, parent=last, readwrite=True, **expect)
            mapping = step("3 prepare (clone, premap)", backend.prepare, info)
            info = infos[layer_id] = replace(info, mapping=mapping)
            root = step("4 mount", backend.mount, info, [])

            def write(root: str, i: int, layer_id: str) -> None:
                os.makedirs(os.path.join(root, f"layer-{i}"), exist_ok=True)
                for name in ("top-id", f"layer-{i}/layer-id", f"layer-{i}/parent-id"):
                    with open(os.path.join(root, name), "w") as f:
                        f.write(layer_id)

            step("5 write", write, root, i, layer_id)
            step("6 unmount", backend.unmount, info)
            last = layer_id
        total = time.perf_counter() - began
        handles = getattr(backend.cluster, "handles", None)
        held = None if handles is None else {"opened": handles.opened, "taken": handles.taken}
        if args.json:
            for layer_id in reversed(list(infos)):
                backend.remove(infos[layer_id])
            backend.settle_trash()
            backend.stop()
            print(json.dumps({
                "per_layer_ms": total / (count + 1) * 1000,
                "steps": {k: statistics.median(v) * 1000 for k, v in steps.items()},
                "calls": {k: statistics.median(v) * 1000 for k, v in TIMES.items()},
                "handles": held,
            }))
            return 0
        print(f"chain of {count + 1}: {total:.2f} s, {total / (count + 1) * 1000:.0f} ms/layer")
        if held is not None:
            print(f"handles opened ahead of the commit: {held['opened']}, taken by it: {held['taken']}")
        for name in sorted(steps):
            print(f"  {name:28s} median {statistics.median(steps[name]) * 1000:7.1f} ms")
        print("calls: median ms, total s, count")
        for name in sorted(TIMES, key=lambda k: -sum(TIMES[k])):
            t = TIMES[name]
            print(f"  {name:32s} {statistics.median(t) * 1000:7.1f} {sum(t):7.2f} {len(t):5d}")
        for layer_id in reversed(list(infos)):
            backend.remove(infos[layer_id])
        backend.settle_trash()
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
