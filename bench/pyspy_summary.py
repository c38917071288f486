#!/usr/bin/env python3
"""
Summarise the py-spy recordings of ``bench/run.py --profile DIR``.

Each recording is py-spy's raw (collapsed) format with ``--threads
--idle``: one line per distinct stack, ``thread (tid): NAME;frame;...;frame
COUNT``.  For every row and every kind of thread (the reactor, the one
database thread, the backend pool) this prints how the samples split into
waiting for work and doing something, the inclusive share of the
interesting frames (SQLite commits, statement execution, mounts, tar
parsing, HTTP, JSON...), and the hottest leaf frames.

    python bench/pyspy_summary.py DIR [--top 12] [--json OUT]

Samples are wall-clock (py-spy --idle samples every thread at the rate
given, running or not), so they are shown as thread-seconds: the reactor's
total is the wall time of the recording; the backend pool's may be larger
(several threads).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

#: Inclusive buckets: (label, regex on the joined stack).  A stack is counted
#: in every bucket whose pattern it matches.
BUCKETS = [
    ("sqlite commit (fsync)",
     r"\bcommit \(sqlalchemy/engine/default\.py|do_commit|_commit_thd \(txgraph/store\.py"),
    ("prepared layer write (txgraph.store, no SQLAlchemy)", r"\bexecute \(txgraph/store\.py"),
    ("  of which group commits (write_group_thd, > 1 write)",
     r"write_group_thd \(txgraph/store\.py:\d+\);[\w.]*(execute|_commit_thd) \(txgraph/store"),
    ("sqlalchemy execute (compile, bind, run)", r"Connection\.execute \(sqlalchemy"),
    ("sqlalchemy begin/connect/close", r"Engine\.begin|Connection\.__exit__|_connection_for_bind|Engine\.connect"),
    ("mount(2)", r"\bmount \(txgraph/mounts\.py"),
    ("umount2(2) (incl. EBUSY retries)", r"\bunmount \(txgraph/mounts\.py"),
    ("mountinfo parsing", r"mount_table \(txgraph/mounts\.py"),
    ("tar apply (archive.apply_layer)", r"apply_layer \(txgraph/archive/apply\.py"),
    ("  apply: waiting for body (ApplyStream.read)", r"ApplyStream\.read \(txgraph/api/streams\.py"),
    ("  apply: directory_size", r"directory_size \(txgraph/archive/changes\.py"),
    ("tar export (Diff)", r"export_overlay|export_changes"),
    ("changes (overlay_changes)", r"overlay_changes \(txgraph/archive/"),
    ("HTTP parsing/writing (twisted.web)", r"twisted/web/http\.py|twisted/web/server\.py"),
    ("Klein routing", r"klein/"),
    ("JSON", r"json/(encoder|decoder|__init__)"),
    ("layer machine (automat, layers/)", r"automat/|txgraph/layers/"),
    ("logging (twisted.logger)", r"twisted/logger/"),
    ("thread hand-off (callFromThread/deferToThreadPool)", r"callFromThread|deferToThreadPool|callInThreadWithCallback \("),
]

#: Waiting for work: the reactor's thread sitting in epoll_wait (the leaf is
#: doPoll itself, not something it dispatched to), or a pool thread with no
#: txgraph frame on its stack waiting for a task.
IDLE = [
    ("idle: reactor in epoll", r"EPollReactor\.doPoll \(twisted/internet/epollreactor\.py:\d+\)$"),
    ("idle: pool thread waiting for work",
     r"^(?!.*txgraph/)(?=.*(Condition\.wait|Queue\.get|_threadworker)).*$"),
]


def thread_kind(name: str) -> str:
    if "txgraph-db" in name:
        return "db"
    if "txgraph-backend" in name:
        return "backend"
    if "MainThread" in name or name.strip() == "":
        return "reactor"
    return "other"


def parse(path: Path) -> dict[str, Counter[str]]:
    """
    kind -> Counter(stack without the thread prefix -> samples).
    """
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        head, _, frames = stack.partition(";")
        m = re.match(r"thread \((\d+)\):?\s*(.*)", head)
        name = m.group(2) if m else head
        kind = thread_kind(name)
        out[kind][frames] += n
    return out


def summarise(stacks: Counter[str], top: int) -> dict[str, Any]:
    total = sum(stacks.values())
    idle: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        label = next((lab for lab, pat in IDLE if re.search(pat, stack)), None)
        if label:
            idle[label] += n
            continue
        for lab, pat in BUCKETS:
            if re.search(pat, stack):
                busy[lab] += n
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf] += n
    active = total - sum(idle.values())
    return {
        "samples": total,
        "idle": dict(idle),
        "active": active,
        "buckets": {k: busy[k] for k, _ in BUCKETS if busy[k]},
        "leaves": leaves.most_common(top),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rate", type=float, default=250.0,
                        help="py-spy's sampling rate (bench/run.py uses 250)")
    args = parser.parse_args()
    report: dict[str, dict[str, Any]] = {}
    for path in sorted(args.directory.glob("*.txt")):
        per_kind = parse(path)
        report[path.stem] = {k: summarise(v, args.top) for k, v in sorted(per_kind.items())}
        rate = args.rate
        wall = report[path.stem].get("reactor", {}).get("samples", 0) / rate
        print(f"=== {path.stem}: {wall:.1f} s recorded (seconds below are thread-seconds)")
        for kind, s in report[path.stem].items():
            print(f"  [{kind}] {s['samples'] / rate:.2f} s; active {s['active'] / rate:.2f} s; "
                  + "; ".join(f"{k} {v / rate:.2f} s" for k, v in s["idle"].items()))
            for label, n in s["buckets"].items():  # type: ignore[union-attr]
                print(f"      {n / rate:7.3f} s  {label}")
            for leaf, n in s["leaves"]:  # type: ignore[union-attr]
                print(f"        leaf {n / rate:7.3f} s  {leaf}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
