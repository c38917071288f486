#!/usr/bin/env python3
"""
Thin images against full images, on two Docker hosts sharing a Ceph pool.

    python bench/thin.py --out bench/results/$(date +%F)-thin.json

One run starts a throwaway Ceph dev cluster (memstore) and two nodes, each
a ``twistd -n txgraph --backend rbd`` with its own dockerd, on one pool:

 - node A loads the Debian image and makes its thin image
   (``txgraph-admin make-thin``); the thin image is saved to a file, as a
   registry would carry it;
 - node B, which has never seen the image, then measures, alternating the
   two repetition by repetition (median of ``--reps``):

   - **thin**: ``docker load`` of the thin image + ``docker run`` of one
     command, from the start to the container's first output line;
   - **full**: ``docker load`` of the full image + the same ``docker run``.

   After each repetition B removes the image and runs ``gc --apply``, so
   every repetition starts on a node that never saw the image.

Bytes read are the cluster's own count: the OSD's ``op_r_out_bytes`` (bytes
it sent to clients) over the whole repetition, load included, against the
image's uncompressed size.  Bytes written (``op_w_in_bytes``) are shown too.

The daemons and images come from the integration harness
(``tests/integration/{dockerd,txgraphd,images}.py``).  Everything started is
stopped by PID.  Run as root.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import images  # noqa: E402
from dockerd import Dockerd  # noqa: E402
from txgraphd import Txgraphd, admin  # noqa: E402

from txgraph.backends.rbd.mappers.base import admin_socket_command  # noqa: E402
from txgraph.testing.ceph import DevCluster  # noqa: E402

DEBIAN = (images.DEBIAN_TAG, "bench/debian:thin", ("cat", "/etc/debian_version"))
# --quick: the tiny busybox image, so that a smoke run takes seconds.
BUSYBOX = (images.BUSYBOX_TAG, "bench/busybox:thin", ("echo", "first output"))


def osd_bytes(cluster: DevCluster) -> tuple[int, int]:
    """
    (bytes the OSD sent to clients, bytes it received from them).
    """
    dump = admin_socket_command(
        os.path.join(cluster.dir, "run", "ceph-osd.0.asok"), {"prefix": "perf dump"}
    )
    osd = dump["osd"]
    # Clones' copy-ups are read-write ops: count what they carry too.
    return (int(osd["op_r_out_bytes"]) + int(osd["op_rw_out_bytes"]),
            int(osd["op_w_in_bytes"]) + int(osd["op_rw_in_bytes"]))


def first_output(
    dockerd: Dockerd, load: Path, image: str, command: tuple[str, ...]
) -> tuple[float, float]:
    """
    Seconds from the start of ``docker load`` to the first line the
    container prints, and of that the seconds ``docker load`` took.
    """
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER")},
           "DOCKER_HOST": dockerd.host}
    start = time.monotonic()
    subprocess.run([dockerd.docker_cli, "load", "-q", "-i", str(load)], env=env, check=True,
                   capture_output=True, timeout=900)
    loaded = time.monotonic() - start
    proc = subprocess.Popen(
        [dockerd.docker_cli, "run", "--rm", "--network", "none", image, *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - start
    _out, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or not line.strip():
        raise SystemExit(f"docker run {image} failed: {err.decode(errors='replace')}")
    return elapsed, loaded


def forget(dockerd: Dockerd, txgraph: Txgraphd, image: str) -> None:
    """
    Remove the image from the node, and whatever gc finds, so that the
    next repetition starts on a node that never saw it.
    """
    dockerd.docker("rmi", image)
    result = admin(txgraph.state_dir, "gc", "--apply", "--json", "--docker-root",
                   str(dockerd.data_root), "--driver", txgraph.name, "--min-age", "0")
    if result.returncode not in (0, 1):
        raise SystemExit(f"gc failed: {result.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the busybox image, one repetition")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--object-size", default=None,
                        help="txgraph --rbd-object-size (default: txgraph's own)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/thin.py needs root (mounts, loop devices, dockerd)")
    if not DevCluster.available():
        raise SystemExit("Ceph is not installed (ceph-mon, ceph-osd)")
    full_image, thin_image, command = BUSYBOX if args.quick else DEBIAN
    source = images.busybox_image() if args.quick else images.debian_image()
    reps = args.reps or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="txgraph-thin-bench-", dir=args.workdir))
    samples: dict[str, list[dict[str, float]]] = {"thin": [], "full": []}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        # Admin socket paths must stay short: the cluster lives in /tmp.
        cluster_dir = Path(tempfile.mkdtemp(prefix="txgraph-thin-ceph-"))
        stack.callback(shutil.rmtree, cluster_dir, True)
        cluster = DevCluster(cluster_dir / "c")
        stack.callback(cluster.down)
        cluster.up()
        nodes = []
        for node in ("a", "b"):
            t = Txgraphd(work / f"txgraph-{node}", f"txgraph-thinbench-{os.getpid()}-{node}",
                         "--backend", "rbd", "--rbd-conf", cluster.conf,
                         "--rbd-client", cluster.client_id, "--rbd-keyring",
                         cluster.client_keyring, "--rbd-pool", cluster.pool,
                         "--rbd-node-id", f"bench-{node}",
                         *(["--rbd-object-size", args.object_size] if args.object_size else []))
            (work / f"txgraph-{node}").mkdir()
            stack.callback(t.cleanup)
            t.start()
            d = Dockerd(work / f"dockerd-{node}", t.name)
            stack.callback(d.cleanup)
            d.start()
            nodes.append((t, d))
        (ta, da), (tb, db) = nodes
        print("bench: node A loads the full image and makes the thin one", flush=True)
        da.docker("load", "-i", str(source), timeout=900)
        made = admin(ta.state_dir, "make-thin", full_image, "--tag", thin_image,
                     "--docker-host", da.host, "--json")
        if made.returncode != 0:
            raise SystemExit(f"make-thin failed: {made.stderr}")
        report = json.loads(made.stdout)
        image_bytes = sum(layer["size"] for layer in report["descriptor"]["layers"])
        thin_tar = work / "thin.tar"
        da.docker("save", "-o", str(thin_tar), thin_image)
        loads = {"thin": (thin_tar, thin_image), "full": (source, full_image)}
        for rep in range(reps):
            for kind in (("thin", "full") if rep % 2 == 0 else ("full", "thin")):
                path, image = loads[kind]
                read0, written0 = osd_bytes(cluster)
                seconds, load_seconds = first_output(db, path, image, command)
                read1, written1 = osd_bytes(cluster)
                samples[kind].append(
                    {"seconds": seconds, "load": load_seconds, "read": read1 - read0,
                     "written": written1 - written0}
                )
                print(f"bench: rep {rep + 1} {kind}: {seconds:.2f} s to first output "
                      f"(load {load_seconds:.2f} s), "
                      f"{(read1 - read0) / 2**20:.1f} MiB read, "
                      f"{(written1 - written0) / 2**20:.1f} MiB written", flush=True)
                forget(db, tb, image)

    def median(kind: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[kind])

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "image": full_image,
        "image_bytes": image_bytes,
        "layers": len(report["descriptor"]["layers"]),
        "command_run": list(command),
        "samples": samples,
        "object_size": args.object_size,
        "median": {k: {key: median(k, key) for key in ("seconds", "load", "read", "written")}
                   for k in samples},
    }
    speedup = result["median"]["full"]["seconds"] / result["median"]["thin"]["seconds"]
    fraction = result["median"]["thin"]["read"] / image_bytes
    result["speedup"] = speedup
    result["thin_read_fraction"] = fraction
    rows = [
        ("", "thin", "full", "ratio", "target", "met"),
        ("time to first output (s)", f"{result['median']['thin']['seconds']:.2f}",
         f"{result['median']['full']['seconds']:.2f}", f"{speedup:.1f}x faster", ">= 10x",
         "yes" if speedup >= 10 else "no"),
        ("of which docker load (s)", f"{result['median']['thin']['load']:.2f}",
         f"{result['median']['full']['load']:.2f}", "", "", ""),
        ("bytes read from the cluster (MiB)", f"{result['median']['thin']['read'] / 2**20:.1f}",
         f"{result['median']['full']['read'] / 2**20:.1f}",
         f"{100 * fraction:.1f} % of the image", "<= 10 %", "yes" if fraction <= 0.10 else "no"),
        ("bytes written to the cluster (MiB)", f"{result['median']['thin']['written'] / 2**20:.1f}",
         f"{result['median']['full']['written'] / 2**20:.1f}", "", "", ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nimage {full_image}: {image_bytes / 2**20:.1f} MiB in {result['layers']} layer(s); "
          f"median of {reps}; object size {args.object_size or 'default'}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
