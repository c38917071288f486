#!/usr/bin/env python3
"""
What a clone's depth costs a container that reads its image: issue 18's
"flatten_depth measured against read cost at depth".

On a throwaway Ceph dev cluster (memstore), in-process, with
``flatten_depth`` 0 (never flatten): a base layer holding one large file
(``BIG_MIB``, default 48 MiB, random) and 400 files of 8 KiB, then a chain
of ``DEPTH`` layers (default 32) above it, each writing one small file, as
moby's chain does.  Then, for each measured depth, ``REPS`` times (default
3, the depths in turn, the order flipped each round): a container layer is
made on the layer at that depth (clone, map), mounted, and from a cold
cache (a new rbd-fuse, a new loop device) it reads the 400 small files,
then the large one; unmounted, unmapped, removed.

    DEPTH=32 python bench/rbd_depth_read.py

Prints, per depth (the container layer's number of ancestors), the median
of: prepare (clone + map: the image open, which opens every ancestor) and
mount; reading the small files; reading the large one (MB/s).  Run as root.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rbd_layer_profile import dev_cluster_and_state, start_backend  # noqa: E402

from txgraph.backends import LayerInfo  # noqa: E402
from txgraph.backends.rbd import RBDBackend  # noqa: E402

SMALL_FILES = 400
SMALL_SIZE = 8 << 10


def _fill_base(root: str, big_mib: int) -> None:
    with open(os.path.join(root, "big"), "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    for i in range(SMALL_FILES):
        directory = os.path.join(root, "small", f"d{i // 50}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{i}"), "wb") as f:
            f.write(os.urandom(SMALL_SIZE))


def _read_small(root: str) -> int:
    total = 0
    for i in range(SMALL_FILES):
        with open(os.path.join(root, "small", f"d{i // 50}", f"f{i}"), "rb") as f:
            total += len(f.read())
    return total


def _read_big(root: str) -> int:
    total = 0
    with open(os.path.join(root, "big"), "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def _chain(backend: RBDBackend, depth: int, big_mib: int) -> list[LayerInfo]:
    """
    The base layer and C{depth} layers above it, each committed.
    """
    layers: list[LayerInfo] = []
    for i in range(depth + 1):
        parent = layers[-1] if layers else None
        if parent is not None and parent.mapping is not None:
            backend.unmap(parent)
            parent = replace(parent, mapping=None)
        if parent is not None:
            backend.commit(parent)
            layers[-1] = replace(parent, committed=True)
        info = LayerInfo(id=uuid.uuid4().hex, parent=parent.id if parent else None, readwrite=True)
        info = replace(info, mapping=backend.prepare(info))
        root = backend.mount(info, [])
        if i == 0:
            _fill_base(root, big_mib)
        with open(os.path.join(root, f"layer-{i}"), "w") as f:
            f.write(info.id)
        backend.unmount(info)
        layers.append(info)
    top = layers[-1]
    if top.mapping is not None:
        backend.unmap(top)
    backend.commit(replace(top, mapping=None))
    layers[-1] = replace(top, mapping=None, committed=True)
    return layers


def _container(backend: RBDBackend, parent: LayerInfo, big_mib: int) -> dict[str, float]:
    """
    A container layer on C{parent}, read from a cold cache; its times.
    """
    info = LayerInfo(id=uuid.uuid4().hex, parent=parent.id, readwrite=True)
    began = time.perf_counter()
    info = replace(info, mapping=backend.prepare(info))
    root = backend.mount(info, [])
    mounted = time.perf_counter()
    assert _read_small(root) == SMALL_FILES * SMALL_SIZE
    small = time.perf_counter()
    assert _read_big(root) == big_mib << 20
    big = time.perf_counter()
    backend.unmount(info)
    if info.mapping is not None:
        backend.unmap(info)
    backend.remove(replace(info, mapping=None))
    return {
        "prepare_mount_ms": (mounted - began) * 1000,
        "small_ms": (small - mounted) * 1000,
        "big_mb_s": (big_mib << 20) / 1e6 / (big - small),
    }


def main() -> int:
    depth = int(os.environ.get("DEPTH", "32"))
    reps = int(os.environ.get("REPS", "3"))
    big_mib = int(os.environ.get("BIG_MIB", "48"))
    measured = sorted({d for d in (0, 1, 4, 8, 16, 32, depth) if d <= depth})
    with dev_cluster_and_state("depth") as (dev, state):
        backend = start_backend(dev, state, base_size="256M", flatten_depth="0")
        began = time.perf_counter()
        layers = _chain(backend, depth, big_mib)
        print(f"chain of {depth + 1} layers: {time.perf_counter() - began:.1f} s", flush=True)
        results: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
        for rep in range(reps):
            for d in measured if rep % 2 == 0 else list(reversed(measured)):
                results[d].append(_container(backend, layers[d], big_mib))
        print("ancestors  prepare+mount ms  400 small files ms  large file MB/s  (medians)")
        summary = {}
        for d in measured:
            row = {k: statistics.median(r[k] for r in results[d]) for k in results[d][0]}
            summary[d + 1] = row
            print(f"{d + 1:9d}  {row['prepare_mount_ms']:16.1f}  {row['small_ms']:18.1f}  "
                  f"{row['big_mb_s']:15.1f}")
        out = os.environ.get("OUT")
        if out:
            with open(out, "w") as f:
                json.dump({"depth": depth, "reps": reps, "big_mib": big_mib,
                           "samples": {d + 1: results[d] for d in measured},
                           "medians": summary}, f, indent=1)
        for info in reversed(layers):
            backend.remove(info)
        backend.settle_trash()
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
