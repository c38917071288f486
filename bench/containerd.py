#!/usr/bin/env python3
"""
txgraph as containerd's snapshotter against containerd's own overlayfs.

    python bench/containerd.py --out bench/results/$(date +%F)-containerd.json

Two systems, each a containerd 1.6 (the integration harness's, with its own
config, root and sockets) on a fresh loop-mounted ext4 of its own (as
bench/run.py makes them):

 - **overlayfs**: containerd's built-in overlayfs snapshotter;
 - **txgraph**: ``twistd -n txgraph --backend overlay --containerd-listen``
   as containerd's proxy plugin, its state directory on the same fresh ext4.

Measured through ``ctr``, the systems alternating repetition by repetition
(the machine is shared and noisy: both see the same noise):

 - ``import``: ``ctr images import --snapshotter S`` of the Debian image
   (content ingestion and unpack), then ``ctr images rm --sync`` (content
   and snapshots collected) before the next repetition;
 - ``run_rm``: ``ctr run --rm --snapshotter S`` of ``true`` in the Debian
   image, median;
 - ``concurrent10``: ten such runs at once, time until the last ends.

With ``--rbd`` (on by default, needs Ceph): a throwaway Ceph dev cluster
(memstore), the Debian image pushed to a local registry, and per repetition
a fresh RBD namespace with two nodes (txgraph ``--backend rbd`` with node
ids ``a`` and ``b``, each under a containerd whose CRI plugin unpacks with
it).  Node A's CRI pull (``first``: it unpacks and publishes each layer)
is timed against node B's pull of the same image (``second``: every layer
taken from the pool), with the OSD's bytes written during each.

The JSON goes to ``--out``; a table is printed.  Everything started is
stopped by PID, every mount and loop device removed.  Run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# This script's own name is the harness module's: bench/ goes last, after
# tests/integration/, so that "containerd" is the harness.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.append(str(REPO / "bench"))

import images  # noqa: E402
from containerd import CRI_NAMESPACE, Containerd, Registry  # noqa: E402
from run import LoopFS, _text_table, machine  # noqa: E402
from thin import osd_bytes  # noqa: E402
from txgraphd import Txgraphd  # noqa: E402

from txgraph.testing.ceph import DevCluster  # noqa: E402

SYSTEMS = ("overlayfs", "txgraph")


class System:
    """One containerd (and for txgraph its proxy snapshotter) on its own ext4."""

    def __init__(self, key: str, fs: LoopFS, containerd: Containerd,
                 txgraph: Txgraphd | None) -> None:
        self.key = key
        self.fs = fs
        self.containerd = containerd
        self.txgraph = txgraph
        self.snapshotter = "txgraph" if txgraph is not None else "overlayfs"

    def ctr(self, *args: str, timeout: float = 600) -> str:
        """``ctr`` on this system's containerd; its output."""
        return self.containerd.ctr(*args, timeout=timeout).stdout


def timed(action: Callable[[], object]) -> float:
    """Seconds the action took."""
    start = time.monotonic()
    action()
    return time.monotonic() - start


def import_debian(system: System, tarball: Path) -> str:
    """Import and unpack the Debian image; its name."""
    [image] = system.containerd.import_image(
        tarball, snapshotter=system.snapshotter, timeout=900
    )
    return image


def run_rm(system: System, image: str, name: str) -> None:
    """One ``ctr run --rm`` of ``true``."""
    system.ctr("run", "--rm", "--snapshotter", system.snapshotter, image, name, "true")


def rbd_pulls(cluster: DevCluster, work: Path, registry: Registry, reference: str,
              rep: int) -> dict[str, float]:
    """One repetition of the two-node pull on a fresh RBD namespace: seconds and
    OSD bytes written for node A's (first) and node B's (second) CRI pull."""
    namespace = f"ctrbench-{os.getpid()}-{rep}"
    subprocess.run(
        ["rbd", "-c", cluster.conf, "--keyring", cluster.keyring, "namespace", "create",
         f"{cluster.pool}/{namespace}"], check=True, capture_output=True, timeout=60,
    )
    result: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for node in ("a", "b"):
            home = work / f"rbd-{rep}-{node}"
            home.mkdir()
            t = Txgraphd(home / "t", f"txgraph-ctrbench-{os.getpid()}-{rep}{node}",
                         "--backend", "rbd", "--rbd-conf", cluster.conf,
                         "--rbd-client", cluster.client_id, "--rbd-keyring",
                         cluster.client_keyring, "--rbd-pool", cluster.pool,
                         "--rbd-namespace", namespace, "--rbd-node-id", f"bench-{node}")
            (home / "t").mkdir()
            socket_path = t.serve_containerd()
            stack.callback(t.cleanup)
            t.start()
            c = Containerd(home / "c", proxy_plugins={"txgraph": socket_path},
                           cri_snapshotter="txgraph", plain_http_registries=[registry.host])
            stack.callback(c.cleanup)
            c.start()
            kind = "first" if node == "a" else "second"
            written0 = osd_bytes(cluster)[1]
            result[kind] = timed(lambda c=c: c.cri_pull(reference, timeout=900))
            result[f"{kind}_written"] = osd_bytes(cluster)[1] - written0
            images_here = c.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout
            if reference not in images_here:
                raise SystemExit(f"node {node} has no {reference} after its pull")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of import, concurrent and the rbd pulls (default 3)")
    parser.add_argument("--runs", type=int, default=None, help="ctr run --rm samples (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: busybox, one repetition, two runs")
    parser.add_argument("--no-rbd", dest="rbd", action="store_false",
                        help="skip the rbd two-node pulls")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/containerd.py needs root (mounts, loop devices, containerd)")
    if args.rbd and not DevCluster.available():
        raise SystemExit("Ceph is not installed (ceph-mon, ceph-osd); use --no-rbd")
    tarball = images.busybox_image() if args.quick else images.debian_image()
    reps = args.reps or (1 if args.quick else 3)
    runs = args.runs or (2 if args.quick else 10)
    work = Path(tempfile.mkdtemp(prefix="txgraph-ctrd-bench-", dir=args.workdir))
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in SYSTEMS}
    rbd_samples: list[dict[str, float]] = []

    def add(system: System, row: str, value: float) -> None:
        samples[system.key].setdefault(row, []).append(value)
        print(f"bench: {system.key} {row}: {value:.3f} s", flush=True)

    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        systems: list[System] = []
        for key in SYSTEMS:
            fs = LoopFS(work / f"{key}.img", work / key, 8 << 30)
            stack.callback(fs.cleanup)
            fs.create()
            txgraph = None
            proxies: dict[str, Path] = {}
            if key == "txgraph":
                txgraph = Txgraphd(fs.mountpoint / "t", f"txgraph-ctrbench-{os.getpid()}",
                                   "--backend", "overlay")
                txgraph.workdir.mkdir()
                proxies["txgraph"] = txgraph.serve_containerd()
                stack.callback(txgraph.cleanup)
                txgraph.start()
            c = Containerd(fs.mountpoint / "containerd", proxy_plugins=proxies)
            stack.callback(c.cleanup)
            c.start()
            systems.append(System(key, fs, c, txgraph))

        def alternating(count: int) -> list[tuple[int, System]]:
            order = []
            for rep in range(count):
                for system in (systems if rep % 2 == 0 else systems[::-1]):
                    order.append((rep, system))
            return order

        for _rep, system in alternating(reps):
            add(system, "import", timed(lambda s=system: import_debian(s, tarball)))
            image = system.containerd.image_names()[0]
            system.ctr("images", "rm", "--sync", image)
        names = {s.key: import_debian(s, tarball) for s in systems}
        for rep, system in alternating(runs):
            add(system, "run_rm",
                timed(lambda s=system, r=rep: run_rm(s, names[s.key], f"rm-{r}")))
        for rep, system in alternating(reps):
            def concurrent(s: System = system, r: int = rep) -> None:
                with ThreadPoolExecutor(10) as pool:
                    list(pool.map(lambda i: run_rm(s, names[s.key], f"c-{r}-{i}"), range(10)))
            add(system, "concurrent10", timed(concurrent))

        if args.rbd:
            cluster_dir = Path(tempfile.mkdtemp(prefix="txgraph-ctrd-ceph-"))
            stack.callback(shutil.rmtree, cluster_dir, True)
            cluster = DevCluster(cluster_dir / "c")
            stack.callback(cluster.down)
            cluster.up()
            registry = Registry(work / "registry")
            stack.callback(registry.cleanup)
            registry.start()
            source = systems[0]
            reference = f"{registry.host}/bench/debian:{os.getpid()}"
            source.ctr("images", "tag", "--force", names[source.key], reference)
            source.ctr("images", "push", "--plain-http", reference)
            for rep in range(reps):
                sample = rbd_pulls(cluster, work, registry, reference, rep)
                rbd_samples.append(sample)
                print(f"bench: rbd rep {rep + 1}: first {sample['first']:.2f} s "
                      f"({sample['first_written'] / 2**20:.1f} MiB written), second "
                      f"{sample['second']:.2f} s "
                      f"({sample['second_written'] / 2**20:.1f} MiB written)", flush=True)

    median = {s: {row: statistics.median(v) for row, v in rows.items()}
              for s, rows in samples.items()}
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {**machine(), "containerd": subprocess.run(
            ["/usr/bin/containerd", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()},
        "image": str(tarball.name),
        "reps": reps,
        "runs": runs,
        "samples": samples,
        "median": median,
        "ratio": {row: median["txgraph"][row] / median["overlayfs"][row]
                  for row in median["overlayfs"]},
    }
    lines = [["", "overlayfs", "txgraph", "ratio", "target", "met"]]
    for row in ("import", "run_rm", "concurrent10"):
        ratio = result["ratio"][row]
        lines.append([f"{row} (s)", f"{median['overlayfs'][row]:.3f}",
                      f"{median['txgraph'][row]:.3f}", f"{ratio:.2f}x", "<= 1.20x",
                      "yes" if ratio <= 1.20 else "no"])
    if rbd_samples:
        first = statistics.median(s["first"] for s in rbd_samples)
        second = statistics.median(s["second"] for s in rbd_samples)
        result["rbd"] = {
            "samples": rbd_samples,
            "first": first,
            "second": second,
            "first_written": statistics.median(s["first_written"] for s in rbd_samples),
            "second_written": statistics.median(s["second_written"] for s in rbd_samples),
            "speedup": first / second,
        }
        lines.append(["rbd pull, node A / node B (s)", f"{first:.3f}", f"{second:.3f}",
                      f"{first / second:.1f}x faster", ">= 10x",
                      "yes" if first / second >= 10 else "no"])
    print(f"\nimage {tarball.name}; medians of {reps} (import, concurrent10, rbd) "
          f"and {runs} (run_rm)")
    print(_text_table(lines))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
