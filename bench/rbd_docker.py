#!/usr/bin/env python3
"""
Issue 18's container rows, alone and quick: ``docker create``, ``docker
rm`` and ``docker run --rm`` of busybox on dockerd's built-in overlay2,
txgraph's overlay backend and txgraph's rbd backend (a throwaway Ceph dev
cluster, memstore), the systems in turn at every repetition, as
``bench/run.py`` measures them (same harness, same fresh loop-mounted ext4
per system).  ``--old DIR`` adds the rbd backend of another source tree
(an older commit, extracted) on the same cluster, in a namespace of its
own: an A/B of two versions in one run.  ``--local`` adds the rbd backend
with containers' layers on local storage (``container_layers=local``) the
same way (and, with ``--old``, the old tree's with it too).  ``--pair N``
(with ``--local``) adds N repetitions of a row for the local systems only:
the first containers of two images created at once (``docker create`` of
busybox and of a second image committed from it, in two threads), each
image's lower swept before (``unmap_delay`` waited out), so both are mapped
again: what two images' maps at the same time cost.

    python bench/rbd_docker.py [--runs 30] [--old DIR] [--local [--pair N]] [--out FILE.json]

Prints each system's medians and the ratios issue 18 sets targets for:
rbd create / built-in create (≤ 3) and rbd run --rm / overlay run --rm
(≤ 1.5); then, from each txgraph's own metrics (``--metrics-listen``,
scraped at the end), the mean time of each plugin call and of each rbd
operation on the cluster over the whole run: where the rows' time goes.
Run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench_run  # noqa: E402  (also puts the harness on sys.path)
from txgraphd import rbd_flags, rbd_namespace  # noqa: E402

from txgraph.testing.ceph import DevCluster  # noqa: E402

RUN = bench_run.RUN
BUSYBOX = bench_run.BUSYBOX


def measure(systems: list[bench_run.System], runs: int) -> dict[str, dict[str, list[float]]]:
    """
    C{runs} repetitions of create, rm and run --rm on each system in turn
    (the order flips every repetition), after one warm-up run each.
    """
    samples: dict[str, dict[str, list[float]]] = {
        s.key: {"create": [], "rm": [], "run_rm": []} for s in systems
    }
    for system in systems:
        system.docker(*RUN)
    for rep in range(runs):
        order = systems if rep % 2 == 0 else list(reversed(systems))
        for system in order:
            start = time.perf_counter()
            cid = system.docker("create", "--network", "none", BUSYBOX, "true").strip()
            created = time.perf_counter()
            system.docker("rm", cid)
            done = time.perf_counter()
            samples[system.key]["create"].append((created - start) * 1000)
            samples[system.key]["rm"].append((done - created) * 1000)
            samples[system.key]["run_rm"].append(system.timed(*RUN))
    return samples


#: The second image of the C{--pair} row: busybox's layers and one more.
SECOND = "second:local"
#: The rbd backend's default C{unmap_delay}: how long a lower lingers.
UNMAP_DELAY = 5.0


def make_second_image(system: bench_run.System) -> None:
    """
    C{SECOND}: busybox with one more layer (a commit of a container of it),
    so that its top layer, and so its lower, is not busybox's.
    """
    cid = system.docker("create", "--network", "none", BUSYBOX, "true").strip()
    system.docker("commit", cid, SECOND)
    system.docker("rm", cid)


def measure_pairs(systems: list[bench_run.System], reps: int) -> dict[str, list[float]]:
    """
    C{reps} repetitions, the systems in turn: both images' first containers
    created at once (wall time until both exist), then removed, after
    waiting out C{unmap_delay} so that both lowers are gone.
    """
    samples: dict[str, list[float]] = {s.key: [] for s in systems}
    for rep in range(reps):
        time.sleep(UNMAP_DELAY + 1.0)
        order = systems if rep % 2 == 0 else list(reversed(systems))
        for system in order:
            made: list[str] = []
            with ThreadPoolExecutor(2) as pool:
                start = time.perf_counter()
                futures = [
                    pool.submit(system.docker, "create", "--network", "none", image, "true")
                    for image in (BUSYBOX, SECOND)
                ]
                made = [f.result().strip() for f in futures]
                samples[system.key].append((time.perf_counter() - start) * 1000)
            system.docker("rm", *made)
    return samples


def free_port() -> int:
    """
    A TCP port nothing listens on now (for a daemon's metrics).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call_means(port: int) -> dict[str, dict[str, list[float]]]:
    """
    From a txgraph's metrics: [mean ms, count] of each graph driver call
    (C{calls}) and of each rbd operation on the cluster (C{cluster}).
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    wanted = {
        "txgraph_request_duration_seconds": ("calls", "method"),
        "txgraph_cluster_call_duration_seconds": ("cluster", "op"),
    }
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        group, label = wanted[family.name]
        for sample in family.samples:
            key = (group, sample.labels.get(label, ""))
            if sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
    means: dict[str, dict[str, list[float]]] = {"calls": {}, "cluster": {}}
    for (group, name), count in sorted(counts.items()):
        if count:
            means[group][name] = [round(sums[(group, name)] / count * 1000, 2), int(count)]
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="repetitions (default 30)")
    parser.add_argument("--old", type=Path, help="also the rbd backend of this source tree")
    parser.add_argument(
        "--local", action="store_true",
        help="also the rbd backend with container_layers=local",
    )
    parser.add_argument(
        "--pair", type=int, default=0, metavar="N",
        help="with --local: N repetitions of two images' first containers created at once",
    )
    parser.add_argument("--out", type=Path, help="write the samples and medians as JSON")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--fs-size", default="4G", help="each system's ext4 (default 4G)")
    args = parser.parse_args(argv)
    if args.pair and not args.local:
        parser.error("--pair needs --local")
    if os.geteuid() != 0:
        print("bench/rbd_docker.py needs root", file=sys.stderr)
        return 2
    if not DevCluster.available():
        print("bench/rbd_docker.py needs Ceph (ceph-mon, ceph-osd, rbd-fuse)", file=sys.stderr)
        return 2
    started = time.time()
    load_before = os.getloadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="txgraph-rbd-docker-", dir=args.workdir))
    logs = work / "logs"
    logs.mkdir()
    size = bench_run.parse_size(args.fs_size)
    busybox = bench_run.images.busybox_image()
    options = argparse.Namespace(threads=None)
    with contextlib.ExitStack() as stack:

        def fresh_fs(key: str) -> bench_run.LoopFS:
            return bench_run._fresh_fs(stack, work, key, size)

        cluster = DevCluster(work / "ceph")
        stack.callback(cluster.down)
        cluster.up()
        systems = [bench_run._builtin_system(stack, fresh_fs("builtin"), logs)]
        ports: dict[str, int] = {}

        def metrics(key: str) -> list[str]:
            ports[key] = free_port()
            return ["--metrics-listen", f"tcp:{ports[key]}:interface=127.0.0.1"]

        systems.append(bench_run._txgraph_system(
            stack, fresh_fs("overlay"), logs, "overlay", "txgraph overlay",
            ["--backend", "overlay", *metrics("overlay")], options))
        trees: list[tuple[str, str, Path | None, list[str]]] = [("rbd", "txgraph rbd", None, [])]
        if args.old is not None:
            trees.insert(0, ("rbd-old", f"txgraph rbd ({args.old.name})", args.old.resolve(), []))
        if args.local:
            local = ["--rbd-container-layers", "local"]
            if args.old is not None:
                trees.append(
                    ("rbd-local-old", f"txgraph rbd, local ({args.old.name})", args.old.resolve(), local)
                )
            trees.append(("rbd-local", "txgraph rbd, local containers", None, local))
        for key, label, tree, extra in trees:
            flags = rbd_flags(cluster, rbd_namespace(cluster, key.replace("-", "")), key)
            flags += metrics(key) + extra
            systems.append(bench_run._txgraph_system(
                stack, fresh_fs(key), logs, key, label, flags, options,
                env={"PYTHONPATH": str(tree)} if tree else None))
        for system in systems:
            system.docker("load", "-i", str(busybox))
        samples = measure(systems, args.runs)
        local_systems = [s for s in systems if s.key.startswith("rbd-local")]
        if args.pair:
            for system in local_systems:
                make_second_image(system)
            for key, values in measure_pairs(local_systems, args.pair).items():
                samples[key]["pair_create"] = values
        medians = {
            key: {row: statistics.median(values) for row, values in rows.items()}
            for key, rows in samples.items()
        }
        ratios = {}
        for key in [k for k, _, _, _ in trees]:
            ratios[key] = {
                "create / built-in create": medians[key]["create"] / medians["builtin"]["create"],
                "rm / built-in rm": medians[key]["rm"] / medians["builtin"]["rm"],
                "run --rm / overlay run --rm": medians[key]["run_rm"] / medians["overlay"]["run_rm"],
            }
        if args.old is not None:
            for new, old in (("rbd", "rbd-old"), ("rbd-local", "rbd-local-old")):
                if old in medians:
                    ratios[f"{new} / {old}"] = {
                        row: medians[new][row] / medians[old][row]
                        for row in medians[new] if row in medians[old]
                    }
        print(f"{'system':28s} {'create':>9s} {'rm':>9s} {'run --rm':>9s}  (medians of {args.runs}, ms)")
        for system in systems:
            m = medians[system.key]
            print(f"{system.label:28s} {m['create']:9.1f} {m['rm']:9.1f} {m['run_rm']:9.1f}")
        if args.pair:
            print(f"two images' first containers created at once (medians of {args.pair}, ms):")
            for system in local_systems:
                print(f"  {system.label:28s} {medians[system.key]['pair_create']:9.1f}")
        for key, values in ratios.items():
            print(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
        means = {key: call_means(port) for key, port in ports.items()}
        for group, title in (("calls", "plugin call"), ("cluster", "rbd operation")):
            names = sorted({n for m in means.values() for n in m[group]})
            if not names:
                continue
            print(f"\nmean ms per {title} over the run (count):")
            for name in names:
                print(f"  {name:28s} " + "  ".join(
                    f"{key} {m[group][name][0]:7.2f} ({m[group][name][1]})"
                    for key, m in means.items() if name in m[group]
                ))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.datetime.fromtimestamp(started).astimezone().isoformat(
                    timespec="seconds"),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "systems": {s.key: s.label for s in systems},
                "medians_ms": medians,
                "ratios": ratios,
                "call_means_ms_count": means,
                "samples_ms": samples,
            }, indent=2) + "\n")
            print(f"wrote {args.out}")
    with contextlib.suppress(OSError):
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
