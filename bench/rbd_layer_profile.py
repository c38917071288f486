#!/usr/bin/env python3
"""
One rbd layer's life, in-process, step by step: a chain of ``N`` layers
(``N`` env, default 20) driven as the layer machines drive moby's
DeepLayerRead (unmap the parent, commit it, clone and premap the child,
mount, write, unmount), on a throwaway Ceph dev cluster (memstore), with
every backend, mapper and cluster call of interest timed.

    N=128 python bench/rbd_layer_profile.py

Prints the median of each step and, per call, its median, total and
count (nested calls are counted in their callers too).  Run as root.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    function = getattr(owner, name)

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
        (cluster.Cluster, ["snapshot", "set_meta", "inspect", "clear_stale_clients"]),
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


def main() -> int:
    count = int(os.environ.get("N", "20"))
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
            info = LayerInfo(id=layer_id, parent=last, readwrite=True)
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
        print(f"chain of {count + 1}: {total:.2f} s, {total / (count + 1) * 1000:.0f} ms/layer")
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
