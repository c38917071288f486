#!/usr/bin/env python3
"""
Thin images against full images, on two Docker hosts sharing a Ceph pool.

    python bench/thin.py --out bench/results/$(date +%F)-thin.json
    python bench/thin.py --debian --size-mib 512 --size-mib 1536 --out ...

One run starts a throwaway Ceph dev cluster (memstore) and two nodes, each
a ``twistd -n txgraph --backend rbd`` with its own dockerd, on one pool.
For each image measured (the Debian image by default; with ``--size-mib N``,
repeatable, an image of N MiB of random data built here, plus the Debian
one with ``--debian``):

 - node A loads the image and makes its thin image
   (``txgraph-admin make-thin``); the thin image is saved to a file, as a
   registry would carry it;
 - node B, which has never seen the image, then measures, alternating the
   two repetition by repetition (median of ``--reps``):

   - **thin**: ``docker load`` of the thin image + ``docker run`` of one
     command, from the start to the container's first output line;
   - **full**: ``docker load`` of the full image + the same ``docker run``.

   After each repetition B removes the image and runs ``gc --apply``, so
   every repetition starts on a node that never saw the image.  After the
   image's repetitions A removes it too and gc empties the pool of it, so
   that the next image starts from the same pool (memstore keeps it in RAM).

A sized image (``bench/sized:<N>mib``) is one layer: the busybox rootfs the
tests build, and ``/data`` holding N MiB of incompressible random files of
4 MiB each and a ``README`` that the container prints (``cat /data/README``).
It is built in the work directory, offline, and removed at the end.

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
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import images  # noqa: E402
from dockerd import Dockerd  # noqa: E402
from txgraphd import Txgraphd, admin  # noqa: E402

from txgraph.backends.rbd.mappers.base import admin_socket_command  # noqa: E402
from txgraph.testing.ceph import DevCluster  # noqa: E402

#: The size of each random file of a sized image.
CHUNK = 4 << 20
#: The dev cluster's memstore holds at least this much.
MEMSTORE_MIN = 4 << 30


@dataclass(frozen=True)
class Image:
    """
    One image to measure: its tag, its thin image's tag, the command the
    container runs, and how to get its ``docker save`` tarball.
    """

    name: str
    tag: str
    thin_tag: str
    command: tuple[str, ...]
    size_mib: int | None = None

    def tarball(self, work: Path) -> Path:
        """
        The image's ``docker save`` tarball (built in C{work} for a sized one).
        """
        if self.name == "debian":
            return images.debian_image()
        if self.name == "busybox":
            return images.busybox_image()
        assert self.size_mib is not None
        return sized_image(work, self.size_mib, self.tag)


DEBIAN = Image("debian", images.DEBIAN_TAG, "bench/debian:thin", ("cat", "/etc/debian_version"))
# --quick: the tiny busybox image, so that a smoke run takes seconds.
BUSYBOX = Image("busybox", images.BUSYBOX_TAG, "bench/busybox:thin", ("echo", "first output"))


def sized(mib: int) -> Image:
    """
    The image of C{mib} MiB of random data (L{sized_image}).
    """
    tag = f"bench/sized:{mib}mib"
    return Image(f"{mib}mib", tag, f"{tag}-thin", ("cat", "/data/README"), mib)


def sized_image(work: Path, mib: int, tag: str) -> Path:
    """
    Build a one-layer image in C{work}: the busybox rootfs and, under
    C{/data}, C{mib} MiB of random (incompressible) data in files of
    L{CHUNK} bytes and a one-line C{README}.  Returns its C{docker save}
    tarball; the layer tar in between is removed.
    """
    rootfs = work / f"sized-{mib}.rootfs.tar"
    with tarfile.open(rootfs, "w", format=tarfile.GNU_FORMAT) as out:
        with tarfile.open(images.busybox_rootfs()) as base:
            for member in base:
                data = base.extractfile(member) if member.isfile() else None
                out.addfile(member, data)

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            out.addfile(info, io.BytesIO(data))

        directory = tarfile.TarInfo("./data")
        directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
        out.addfile(directory)
        add("./data/README", f"{mib} MiB of random data in {CHUNK >> 20} MiB files\n".encode())
        left = mib << 20
        index = 0
        while left > 0:
            n = min(CHUNK, left)
            add(f"./data/blob-{index:05d}", os.urandom(n))
            left -= n
            index += 1
    saved = work / f"sized-{mib}.image.tar"
    images.save_tarball(rootfs, tag, images.BUSYBOX_CONFIG, saved,
                        comment=f"bench/thin.py: busybox and {mib} MiB of random data")
    rootfs.unlink()
    return saved


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
                   capture_output=True, timeout=1800)
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


def forget(dockerd: Dockerd, txgraph: Txgraphd, *tags: str) -> None:
    """
    Remove the images from the node, and whatever gc finds (shared images
    that nothing uses any more included), so that the next repetition
    starts on a node that never saw them.
    """
    dockerd.docker("rmi", *tags)
    result = admin(txgraph.state_dir, "gc", "--apply", "--json", "--docker-root",
                   str(dockerd.data_root), "--driver", txgraph.name, "--min-age", "0")
    if result.returncode not in (0, 1):
        raise SystemExit(f"gc failed: {result.stderr}")


def measure(
    image: Image, reps: int, work: Path, cluster: DevCluster,
    a: tuple[Txgraphd, Dockerd], b: tuple[Txgraphd, Dockerd],
) -> dict[str, Any]:
    """
    Node A loads C{image} and makes its thin image, node B times thin and
    full in turns; then both forget it.  Returns the image's result.
    """
    (ta, da), (tb, db) = a, b
    print(f"bench: {image.name}: building/finding the image", flush=True)
    source = image.tarball(work)
    print(f"bench: {image.name}: node A loads the full image and makes the thin one", flush=True)
    da.docker("load", "-i", str(source), timeout=1800)
    made = admin(ta.state_dir, "make-thin", image.tag, "--tag", image.thin_tag,
                 "--docker-host", da.host, "--json")
    if made.returncode != 0:
        raise SystemExit(f"make-thin failed: {made.stderr}")
    report = json.loads(made.stdout)
    image_bytes = sum(layer["size"] for layer in report["descriptor"]["layers"])
    thin_tar = work / "thin.tar"
    da.docker("save", "-o", str(thin_tar), image.thin_tag)
    loads = {"thin": (thin_tar, image.thin_tag), "full": (source, image.tag)}
    samples: dict[str, list[dict[str, float]]] = {"thin": [], "full": []}
    for rep in range(reps):
        for kind in (("thin", "full") if rep % 2 == 0 else ("full", "thin")):
            path, tag = loads[kind]
            read0, written0 = osd_bytes(cluster)
            seconds, load_seconds = first_output(db, path, tag, image.command)
            read1, written1 = osd_bytes(cluster)
            samples[kind].append(
                {"seconds": seconds, "load": load_seconds, "read": read1 - read0,
                 "written": written1 - written0}
            )
            print(f"bench: {image.name} rep {rep + 1} {kind}: {seconds:.2f} s to first output "
                  f"(load {load_seconds:.2f} s), "
                  f"{(read1 - read0) / 2**20:.1f} MiB read, "
                  f"{(written1 - written0) / 2**20:.1f} MiB written", flush=True)
            forget(db, tb, tag)
    # The next image starts from an emptied pool: A forgets this one too.
    forget(da, ta, image.tag, image.thin_tag)
    thin_tar.unlink()
    if image.size_mib is not None:
        source.unlink()

    def median(kind: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[kind])

    medians = {k: {key: median(k, key) for key in ("seconds", "load", "read", "written")}
               for k in samples}
    return {
        "image": image.tag,
        "name": image.name,
        "image_bytes": image_bytes,
        "layers": len(report["descriptor"]["layers"]),
        "command_run": list(image.command),
        "samples": samples,
        "median": medians,
        "speedup": medians["full"]["seconds"] / medians["thin"]["seconds"],
        "thin_read_fraction": medians["thin"]["read"] / image_bytes,
    }


def show(result: dict[str, Any], reps: int, object_size: str | None) -> None:
    """
    Print one image's table.
    """
    m, speedup, fraction = result["median"], result["speedup"], result["thin_read_fraction"]
    rows = [
        ("", "thin", "full", "ratio", "target", "met"),
        ("time to first output (s)", f"{m['thin']['seconds']:.2f}", f"{m['full']['seconds']:.2f}",
         f"{speedup:.1f}x faster", ">= 10x", "yes" if speedup >= 10 else "no"),
        ("of which docker load (s)", f"{m['thin']['load']:.2f}", f"{m['full']['load']:.2f}",
         "", "", ""),
        ("bytes read from the cluster (MiB)", f"{m['thin']['read'] / 2**20:.1f}",
         f"{m['full']['read'] / 2**20:.1f}",
         f"{100 * fraction:.1f} % of the image", "<= 10 %", "yes" if fraction <= 0.10 else "no"),
        ("bytes written to the cluster (MiB)", f"{m['thin']['written'] / 2**20:.1f}",
         f"{m['full']['written'] / 2**20:.1f}", "", "", ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nimage {result['image']}: {result['image_bytes'] / 2**20:.1f} MiB in "
          f"{result['layers']} layer(s); median of {reps}; object size {object_size or 'default'}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))


def commit() -> str | None:
    """
    The checkout's commit (with C{-dirty} if it has changes), if git knows.
    """
    run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                         capture_output=True, text=True, check=False)
    return run.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the busybox image, one repetition")
    parser.add_argument("--size-mib", type=int, action="append", default=[], metavar="N",
                        help="measure an image of N MiB of random data (repeatable)")
    parser.add_argument("--debian", action="store_true",
                        help="with --size-mib: measure the Debian image too (first)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--object-size", default=None,
                        help="txgraph --rbd-object-size (default: txgraph's own)")
    parser.add_argument("--rbd-option", action="append", default=[], metavar="KEY=VALUE",
                        help="another rbd option for both nodes' txgraph, as "
                             "--rbd-KEY VALUE (repeatable; e.g. container_layers=local)")
    args = parser.parse_args(argv)
    extra: list[str] = []
    for option in args.rbd_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SystemExit(f"--rbd-option wants KEY=VALUE, not {option!r}")
        extra += [f"--rbd-{key.replace('_', '-')}", value]
    if os.geteuid() != 0:
        raise SystemExit("bench/thin.py needs root (mounts, loop devices, dockerd)")
    if not DevCluster.available():
        raise SystemExit("Ceph is not installed (ceph-mon, ceph-osd)")
    if any(n < 1 for n in args.size_mib):
        raise SystemExit("--size-mib must be at least 1")
    todo: list[Image] = []
    if args.quick:
        todo.append(BUSYBOX)
    if args.debian or not (args.quick or args.size_mib):
        todo.append(DEBIAN)
    todo += [sized(n) for n in args.size_mib]
    reps = args.reps or (1 if args.quick else 3)
    # The pool holds the largest image twice at once (A's shared copy and
    # the full load's candidate on B), each with its filesystem's overhead.
    memstore = max(MEMSTORE_MIN, (3 * max(args.size_mib, default=0) << 20) + (2 << 30))
    results = []
    work = Path(tempfile.mkdtemp(prefix="txgraph-thin-bench-", dir=args.workdir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        # Admin socket paths must stay short: the cluster lives in /tmp.
        cluster_dir = Path(tempfile.mkdtemp(prefix="txgraph-thin-ceph-"))
        stack.callback(shutil.rmtree, cluster_dir, True)
        cluster = DevCluster(cluster_dir / "c")
        stack.callback(cluster.down)
        os.environ["CEPH_DEV_MEMSTORE_BYTES"] = str(memstore)
        cluster.up()
        nodes = []
        for node in ("a", "b"):
            t = Txgraphd(work / f"txgraph-{node}", f"txgraph-thinbench-{os.getpid()}-{node}",
                         "--backend", "rbd", "--rbd-conf", cluster.conf,
                         "--rbd-client", cluster.client_id, "--rbd-keyring",
                         cluster.client_keyring, "--rbd-pool", cluster.pool,
                         "--rbd-node-id", f"bench-{node}",
                         *(["--rbd-object-size", args.object_size] if args.object_size else []),
                         *extra)
            (work / f"txgraph-{node}").mkdir()
            stack.callback(t.cleanup)
            t.start()
            d = Dockerd(work / f"dockerd-{node}", t.name)
            stack.callback(d.cleanup)
            d.start()
            nodes.append((t, d))
        for image in todo:
            results.append(measure(image, reps, work, cluster, nodes[0], nodes[1]))
            show(results[-1], reps, args.object_size)
    if args.out:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "commit": commit(),
            "loadavg_at_end": os.getloadavg(),
            "cpus": os.cpu_count(),
            "reps": reps,
            "object_size": args.object_size,
            "rbd_options": args.rbd_option,
            "memstore_bytes": memstore,
            "images": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
