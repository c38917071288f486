#!/usr/bin/env python3
"""
moby's 129-layer chain (graphtest's ``DeepLayerRead(128)``: a base and 128
children, each created on the last, mounted, written and unmounted, then
the top read) over the plugin socket, on the overlay and the rbd backend,
in one run; optionally an older checkout's rbd backend too (``--old DIR``),
the systems alternating repetition by repetition.

    python bench/chain.py --reps 2 --old /tmp/old-checkout --out bench/results/$(date +%F)-chain.json

Each system is a ``twistd -n txgraph`` of the integration harness
(``tests/integration/txgraphd.py``) on its own state directory and socket;
the rbd ones share one throwaway Ceph dev cluster (memstore), each in an
RBD namespace of its own.  Every plugin call is timed; the table gives the
chain's wall time, its per-layer cost, and the median of each call.
Everything started is stopped by PID; the chain is removed after each
repetition.

Run as root (mounts, loop devices, rbd-fuse).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from txgraphd import Txgraphd, rbd_flags, rbd_namespace  # noqa: E402

from txgraph.testing.ceph import DevCluster  # noqa: E402
from txgraph.testing.graphtest import (  # noqa: E402
    PluginClient,
    add_file,
    add_many_layers,
    check_file,
    check_many_layers,
    random_id,
)


class TimedClient(PluginClient):
    """
    A plugin client that records the wall time of every call, by method.
    """

    def __init__(self, socket: str) -> None:
        super().__init__(socket)
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def call(self, method: str, **args: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return super().call(method, **args)
        finally:
            self.times[method].append(time.perf_counter() - start)


def _rbd_flags(cluster: DevCluster, base_size: str) -> list[str]:
    """
    The rbd backend on the dev cluster, in a new namespace.
    """
    return rbd_flags(cluster, rbd_namespace(cluster, "chain"), base_size=base_size)


def one_chain(client: TimedClient, depth: int) -> dict[str, Any]:
    """
    One DeepLayerRead(depth); the chain is removed afterwards (not timed).
    """
    client.times.clear()
    base = random_id()
    start = time.perf_counter()
    client.create(base)
    add_file(client, base, "testfile.txt", b"test content")
    top = add_many_layers(client, base, depth)
    check_many_layers(client, top, depth)
    check_file(client, top, "testfile.txt", b"test content")
    wall = time.perf_counter() - start
    calls = {m: statistics.median(t) for m, t in client.times.items()}
    samples = {m: list(t) for m, t in client.times.items()}
    removal = time.perf_counter()
    _remove_chain(client, top, base)
    return {
        "wall": wall,
        "per_layer": wall / (depth + 1),
        "calls": calls,
        "samples": samples,
        "remove": time.perf_counter() - removal,
    }


def _remove_chain(client: PluginClient, top: str, base: str) -> None:
    # The chain's layers name their parent in their files: read the order
    # once, then remove top first.
    with client.mounted(top) as root:
        order = [top]
        i = 1
        while os.path.exists(os.path.join(root, f"layer-{i}")):
            i += 1
        for j in range(i - 1, 0, -1):
            with open(os.path.join(root, f"layer-{j}", "parent-id")) as f:
                order.append(f.read())
    for layer in order:
        client.remove(layer)
    if base not in order:
        client.remove(base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--old", help="an older checkout whose rbd backend is measured too")
    parser.add_argument("--no-overlay", action="store_true")
    parser.add_argument("--rbd-option", action="append", default=[],
                        help="extra txgraph flag(s) for the rbd systems, e.g. --rbd-option=--rbd-flatten-depth=16")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help="one more rbd system of this checkout with extra flags "
                        "(space-separated), e.g. flat8='--rbd-flatten-depth 8'")
    parser.add_argument("--base-size", default="32M")
    parser.add_argument("--out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="txgraph-chain-"))
    cluster = DevCluster(work / "ceph")
    daemons: list[Txgraphd] = []
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    try:
        cluster.up()
        systems: dict[str, Txgraphd] = {}

        def daemon(label: str, flags: list[str], repo: str | None) -> None:
            d = Txgraphd(work / label, f"chain-{label}-{os.getpid()}", *flags)
            (work / label).mkdir()
            if repo:
                d.env["PYTHONPATH"] = repo
            daemons.append(d)
            d.start(60)
            systems[label] = d

        if not args.no_overlay:
            daemon("overlay", ["--backend", "overlay"], None)
        if args.old:
            daemon("rbd-old", _rbd_flags(cluster, args.base_size) + args.rbd_option, args.old)
        daemon("rbd", _rbd_flags(cluster, args.base_size) + args.rbd_option, None)
        for variant in args.variant:
            label, _, flags = variant.partition("=")
            daemon(label, _rbd_flags(cluster, args.base_size) + args.rbd_option + flags.split(), None)
        for rep in range(args.reps):
            order = list(systems)
            if rep % 2:
                order.reverse()
            for label in order:
                client = TimedClient(str(systems[label].socket))
                result = one_chain(client, args.depth)
                results[label].append(result)
                calls = ", ".join(f"{m} {v * 1000:.1f}" for m, v in sorted(result["calls"].items()))
                print(f"rep {rep} {label:8s} {result['wall']:8.2f} s  "
                      f"{result['per_layer'] * 1000:7.1f} ms/layer  calls (ms): {calls}", flush=True)
    finally:
        for d in reversed(daemons):
            d.stop()
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    print()
    medians = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    for label, wall in medians.items():
        line = f"{label:8s} median {wall:8.2f} s  {wall / (args.depth + 1) * 1000:7.1f} ms/layer"
        if "overlay" in medians and label != "overlay":
            line += f"  {wall / medians['overlay']:6.1f}x overlay"
        if "rbd-old" in medians and label == "rbd":
            line += f"  {medians['rbd-old'] / wall:5.2f}x faster than rbd-old"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
