#!/usr/bin/env python3
"""
The pieces of a txgraph call, timed one by one on a fresh loop-mounted
ext4 (as in bench/run.py), to explain the socket latencies run.py reports:

 - ``commit_full``: one ``Store.update_layer_thd`` (txgraph's own code: a
   prepared UPDATE on the database thread's sqlite3 connection, WAL,
   synchronous=FULL, as durable state changes do);
 - ``commit_normal`` / ``commit_off``: the same with synchronous=NORMAL / OFF
   (what the durability costs: in WAL mode FULL fsyncs the WAL at every
   commit, NORMAL only at checkpoints);
 - ``sqlalchemy_full`` / ``sqlalchemy_normal``: the same UPDATE the way the
   store wrote it before (SQLAlchemy Core: ``engine.connect()``, a new
   ``layers.update().values()`` per call);
 - ``group10_full`` / ``group10_normal``: ``Store.write_group_thd`` of 10
   updates in one transaction (group commit), per group;
 - ``sqlite3_full`` / ``sqlite3_off``: the same UPDATE through the bare
   sqlite3 module (the floor);
 - ``fdatasync_4k``: write 4 KiB and fdatasync a file on the same fs (the
   floor of a durable commit on this disk);
 - ``thread_hop``: a no-op through ``deferToThreadPool`` and back, under a
   running reactor (what each database or backend hop costs);
 - ``overlay_mount`` / ``overlay_umount``: txgraph.mounts.mount/unmount of a
   one-lower overlay (the syscalls of Get and the last Put), and
   ``overlay_umount_detach``: umount2(MNT_DETACH), what moby's overlay2 does;
 - ``mountinfo_parse``: ``txgraph.mounts.mount_table()`` (read on every
   Remove, reset and ensure_mounted) with the host's current mount table.

    python bench/micro.py [--n 500] [--out FILE.json]

Run as root.  Nothing of txgraph is changed; its modules are only called.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench_run  # noqa: E402  (also puts the checkout on sys.path)

from txgraph import mounts  # noqa: E402
from txgraph.store import LayerRow, Store, _update, layers  # noqa: E402


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def commits(root: Path, n: int) -> dict[str, list[float]]:
    store = Store(str(root / "txgraph.db"))
    store.open_thd()
    row = LayerRow(id="a" * 64, parent=None, kind="rw", state="created",
                   created_at=time.time(), updated_at=time.time())
    store.insert_layer_thd(row)
    results: dict[str, list[float]] = {}

    def update(durable: bool) -> Callable[[], None]:
        def go() -> None:
            row.refcount = (row.refcount + 1) % 5
            row.updated_at = time.time()
            store.update_layer_thd(row, durable)

        return go

    def off() -> None:
        # The prepared update and commit, the pragma left at OFF.
        row.refcount = (row.refcount + 1) % 5
        row.updated_at = time.time()
        conn = store._connection_thd()
        _update(row, False).execute(conn)
        conn.commit()

    def sqlalchemy(durable: bool) -> Callable[[], None]:
        # What Store.update_layer_thd did before prepared statements.
        def go() -> None:
            row.refcount = (row.refcount + 1) % 5
            row.updated_at = time.time()
            values = row.to_db()
            del values["id"]
            with store.engine.connect() as conn:
                mode = "FULL" if durable else "NORMAL"
                if store._sync != mode:
                    conn.exec_driver_sql(f"PRAGMA synchronous={mode}")
                    conn.commit()
                    store._sync = mode
                with conn.begin():
                    conn.execute(layers.update().where(layers.c.id == row.id).values(**values))

        return go

    def group(durable: bool) -> Callable[[], None]:
        def go() -> None:
            writes = []
            for _ in range(10):
                row.refcount = (row.refcount + 1) % 5
                row.updated_at = time.time()
                writes.append(_update(LayerRow(**row.__dict__), durable))
            assert store.write_group_thd(writes) == [None] * 10

        return go

    db = sqlite3.connect(str(root / "raw.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE layers (id TEXT PRIMARY KEY, refcount INT, updated_at REAL)")
    db.execute("INSERT INTO layers VALUES (?, 0, 0)", ("a" * 64,))

    def raw() -> None:
        db.execute("BEGIN")
        db.execute("UPDATE layers SET refcount=?, updated_at=? WHERE id=?",
                   (int(time.time()) % 5, time.time(), "a" * 64))
        db.execute("COMMIT")

    fd = os.open(root / "sync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"x" * 4096

    def sync() -> None:
        os.pwrite(fd, block, 0)
        os.fdatasync(fd)

    # Interleaved, so that the disk's bad moments hit every variant alike.
    for i in range(n + 1):
        for mode in ("FULL", "NORMAL", "OFF"):
            if mode == "OFF":
                store._connection_thd().execute("PRAGMA synchronous=OFF")
                store._sync = "OFF"
                ms = timed(off, 1)
            else:
                ms = timed(update(mode == "FULL"), 1)
            if i:
                results.setdefault(f"commit_{mode.lower()}", []).extend(ms)
        for mode in ("FULL", "NORMAL"):
            for name, fn in (("sqlalchemy", sqlalchemy), ("group10", group)):
                ms = timed(fn(mode == "FULL"), 1)
                if i:
                    results.setdefault(f"{name}_{mode.lower()}", []).extend(ms)
        for mode in ("FULL", "OFF"):
            db.execute(f"PRAGMA synchronous={mode}")
            ms = timed(raw, 1)
            if i:
                results.setdefault(f"sqlite3_{mode.lower()}", []).extend(ms)
        ms = timed(sync, 1)
        if i:
            results.setdefault("fdatasync_4k", []).extend(ms)
    store.close_thd()
    db.close()
    os.close(fd)
    return results


def thread_hops(n: int) -> list[float]:
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    reactor: Any = _reactor
    pool = ThreadPool(minthreads=1, maxthreads=1)
    samples: list[float] = []

    async def go() -> None:
        await deferToThreadPool(reactor, pool, lambda: None)
        for _ in range(n):
            start = time.perf_counter()
            await deferToThreadPool(reactor, pool, lambda: None)
            samples.append((time.perf_counter() - start) * 1000)

    def main() -> None:
        pool.start()
        def done(result: object) -> object:
            pool.stop()
            reactor.stop()
            return result

        ensureDeferred(go()).addBoth(done)

    reactor.callWhenRunning(main)
    reactor.run(installSignalHandlers=False)
    return samples


def overlay_mounts(root: Path, n: int) -> dict[str, list[float]]:
    for name in ("lower", "upper", "work", "merged"):
        (root / name).mkdir()
    (root / "lower" / "file").write_text("x")
    data = f"lowerdir={root / 'lower'},upperdir={root / 'upper'},workdir={root / 'work'}"
    target = str(root / "merged")
    mount_ms, umount_ms, detach_ms = [], [], []
    for i in range(n):
        start = time.perf_counter()
        mounts.mount("overlay", target, "overlay", 0, data)
        mid = time.perf_counter()
        if i % 2:
            # What moby's overlay2 Put does: umount2(MNT_DETACH).
            if mounts._libc.umount2(target.encode(), mounts.MNT_DETACH) != 0:
                raise OSError("umount2 MNT_DETACH failed")
            detach_ms.append((time.perf_counter() - mid) * 1000)
        else:
            mounts.unmount(target)
            umount_ms.append((time.perf_counter() - mid) * 1000)
        mount_ms.append((mid - start) * 1000)
    return {
        "overlay_mount": mount_ms,
        "overlay_umount": umount_ms,
        "overlay_umount_detach": detach_ms,
        "mountinfo_parse": timed(mounts.mount_table, n),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="samples of each (default 500)")
    parser.add_argument("--out", type=Path, help="write the samples' summary as JSON")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/micro.py needs root", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="txgraph-micro-", dir=args.workdir))
    results: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: work.rmdir() if work.exists() else None)
        fs = bench_run.LoopFS(work / "fs.img", work / "fs", bench_run.parse_size("2G"))
        stack.callback(fs.cleanup)
        fs.create()
        results.update(commits(fs.mountpoint, args.n))
        results.update(overlay_mounts(fs.mountpoint, args.n))
        results["thread_hop"] = thread_hops(args.n)
    with open("/proc/self/mountinfo") as f:
        mount_count = sum(1 for _ in f)
    summary = {
        name: {
            "median_ms": statistics.median(s),
            "p90_ms": bench_run.percentile(s, 90),
            "n": len(s),
        }
        for name, s in results.items()
    }
    width = max(map(len, summary))
    print(f"{'what'.ljust(width)}  median ms  p90 ms")
    for name, s in summary.items():
        print(f"{name.ljust(width)}  {s['median_ms']:9.3f}  {s['p90_ms']:6.3f}")
    print(f"(host mount table: {mount_count} entries)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(
            {"machine": bench_run.machine(), "mount_table_entries": mount_count,
             "results": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
