"""
Crash recovery and txgraph-admin: nothing leaked or lost after any crash,
and a gc that proves it.

 - gc finds each planted kind of orphan, and nothing on a clean system;
   --apply repairs them and a second gc is clean; through the admin socket
   while txgraph runs, and on the database directly while it is stopped.
 - The crash matrix: for every crash point each backend reaches (overlay,
   and rbd on a real dev cluster; for rbd with containers' layers on local
   storage, the points where a container's local layer is made, mounted,
   unmounted and removed), txgraph is killed there (SIGKILL, via TXGRAPH_CRASH_AT) under a real
   dockerd doing real work, restarted, and then every layer dockerd knows
   is usable, nothing is mounted, and gc (against dockerd's layer store)
   finds nothing.
 - The same for a thin image's load on rbd, at the points its ApplyDiff
   reaches, with its tree in the pool or made by the load.
 - dockerd killed by SIGKILL with running containers, then restarted.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import images
import pytest
from conftest import Components, Stack, rbd_flags, rbd_namespace
from dockerd import host_leftovers, mounts_under
from txgraphd import Txgraphd, admin

A = "a" * 64
B = "b" * 64
C = "c" * 64
D = "d" * 64
E = "e" * 64
F = "f" * 64
REPO = Path(__file__).resolve().parents[2]


def gc(state_dir: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """
    Run gc with --json; return the exit code and the findings.
    """
    result = admin(state_dir, "gc", "--json", *args)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)["findings"]


def ok(daemon: Txgraphd, method: str, body: object) -> Any:
    status, reply = daemon.call(method, body)
    assert status == 200, (method, body, reply)
    return reply


def fake_docker_root(root: Path, driver: str, cache_ids: list[str], mount_ids: list[str]) -> Path:
    """
    A dockerd data root whose layer store knows exactly these layers.
    """
    layerdb = root / "image" / driver / "layerdb"
    for i, cache_id in enumerate(cache_ids):
        d = layerdb / "sha256" / f"{i:064x}"
        d.mkdir(parents=True)
        (d / "cache-id").write_text(cache_id)
    for i, mount_id in enumerate(mount_ids):
        d = layerdb / "mounts" / f"{i:064x}"
        d.mkdir(parents=True)
        (d / "mount-id").write_text(mount_id)
        (d / "init-id").write_text(mount_id + "-init")
    return root


def plant_orphans(daemon: Txgraphd, tmp_path: Path) -> Path:
    """
    Make one orphan of each kind; return a docker root knowing A and B.
    """
    ok(daemon, "GraphDriver.Create", {"ID": A})
    ok(daemon, "GraphDriver.CreateReadWrite", {"ID": B, "Parent": A})
    ok(daemon, "GraphDriver.Create", {"ID": D})
    ok(daemon, "GraphDriver.Create", {"ID": E})
    overlay = daemon.state_dir / "overlay"
    # mount: something mounted on B's merged directory, which nothing holds
    subprocess.run(["mount", "-t", "tmpfs", "stray", str(overlay / B / "merged")], check=True)
    # object: a layer directory without a row, and a leftover in .tmp
    (overlay / C / "diff").mkdir(parents=True)
    (overlay / ".tmp" / "junk").mkdir()
    # row: D's storage vanished
    subprocess.run(["rm", "-rf", str(overlay / D)], check=True)
    # unknown: E is not in dockerd's layer store (A and B are)
    return fake_docker_root(tmp_path / "docker", "txgraph", [A], [B.removesuffix("-init")])


EXPECTED_KINDS = {
    ("mount", str(Path("overlay") / B / "merged")),
    ("object", C),
    ("object", ".tmp/junk"),
    ("row", D),
    ("unknown", E),
}


def _kinds(findings: list[dict[str, Any]], state_dir: Path) -> set[tuple[str, str]]:
    return {
        (f["kind"], os.path.relpath(f["id"], state_dir) if f["kind"] == "mount" else f["id"])
        for f in findings
    }


def test_gc_clean(components: Components) -> None:
    """
    gc on a clean system finds nothing and exits 0.
    """
    daemon = components.txgraph()
    ok(daemon, "GraphDriver.Create", {"ID": A})
    code, findings = gc(daemon.state_dir)
    assert (code, findings) == (0, [])
    result = admin(daemon.state_dir, "gc")
    assert result.returncode == 0 and "nothing to collect" in result.stdout


def test_gc_through_admin_socket(components: Components, tmp_path: Path) -> None:
    """
    With txgraph running, gc asks it through the admin socket: it finds each
    planted orphan, --apply repairs them all, and a second gc is clean.
    """
    daemon = components.txgraph()
    assert (daemon.state_dir / "admin.sock").is_socket()
    assert (os.stat(daemon.state_dir / "admin.sock").st_mode & 0o777) == 0o600
    docker_root = plant_orphans(daemon, tmp_path)
    args = ("--docker-root", str(docker_root), "--min-age", "0")
    code, findings = gc(daemon.state_dir, *args)
    assert code == 1
    assert _kinds(findings, daemon.state_dir) == EXPECTED_KINDS
    table = admin(daemon.state_dir, "gc", *args)
    assert table.returncode == 1 and "--apply" in table.stdout
    code, findings = gc(daemon.state_dir, "--apply", *args)
    assert code == 1 and all(f["repaired"] for f in findings), findings
    assert gc(daemon.state_dir, *args) == (0, [])
    assert mounts_under(daemon.state_dir) == []
    assert ok(daemon, "GraphDriver.Exists", {"ID": A}) == {"Exists": True}
    assert ok(daemon, "GraphDriver.Exists", {"ID": E}) == {"Exists": False}


def test_gc_stopped_daemon(components: Components, tmp_path: Path) -> None:
    """
    With txgraph stopped, gc opens the state itself (under the lock) and
    recovers it as the daemon would at start, which already clears .tmp
    leftovers and marks the storage-less layer faulty; it then finds and
    repairs the rest, and a faulty layer.
    """
    daemon = components.txgraph()
    docker_root = plant_orphans(daemon, tmp_path)
    ok(daemon, "GraphDriver.Create", {"ID": F})
    daemon.stop()
    with sqlite3.connect(daemon.state_dir / "txgraph.db") as db:
        db.execute("UPDATE layers SET state = 'faulty', error = 'planted' WHERE id = ?", (F,))
    args = ("--docker-root", str(docker_root), "--min-age", "0")
    code, findings = gc(daemon.state_dir, *args)
    assert code == 1
    expected = EXPECTED_KINDS - {("object", ".tmp/junk"), ("row", D)}
    assert _kinds(findings, daemon.state_dir) == expected | {("faulty", D), ("faulty", F)}
    code, findings = gc(daemon.state_dir, "--apply", *args)
    assert all(f["repaired"] for f in findings), findings
    assert gc(daemon.state_dir, *args) == (0, [])
    status = json.loads(admin(daemon.state_dir, "status", "--json").stdout)
    assert status["layers"] == 2 and status["faulty"] == []
    daemon.start()
    assert ok(daemon, "GraphDriver.Exists", {"ID": B}) == {"Exists": True}


def test_gc_refuses_while_locked(components: Components) -> None:
    """
    gc on a state directory whose daemon holds the lock but does not
    answer fails with exit 2, saying so, rather than opening the database.
    """
    daemon = components.txgraph()
    os.kill(daemon.pid, 19)  # SIGSTOP: the lock is held, nothing answers
    try:
        (daemon.state_dir / "admin.sock").unlink()
        result = admin(daemon.state_dir, "gc")
    finally:
        os.kill(daemon.pid, 18)
    assert result.returncode == 2
    assert "another txgraph" in result.stderr


def test_admin_socket_without_host(components: Components) -> None:
    """
    The admin socket serves a request without a Host header (HTTP/1.0).
    """
    import socket

    daemon = components.txgraph()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.state_dir / "admin.sock"))
        sock.sendall(b"POST /status HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"200", reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["backend"] == "overlay"


def test_unknown_crash_point_refused(components: Components) -> None:
    """
    Arming a crash point that does not exist stops txgraph at start.
    """
    daemon = components.txgraph(start=False)
    daemon.env["TXGRAPH_CRASH_AT"] = "mounting.sideways"
    with pytest.raises(RuntimeError, match="unknown crash point"):
        daemon.start(timeout=20)


# -- the crash matrix ---------------------------------------------------------

#: The crash points each backend reaches: overlay neither maps nor commits.
POINTS = {
    "overlay": [
        f"{state}.{when}"
        for state in ("creating", "applying", "mounting", "unmounting", "removing")
        for when in ("before", "after")
    ],
    "rbd": [
        f"{state}.{when}"
        for state in (
            "creating", "applying", "committing", "mapping",
            "mounting", "unmounting", "unmapping", "removing",
        )
        for when in ("before", "after")
    ],
}
# Get and Put with their new reference count committed, unanswered; Create
# with its layer durably created, unanswered.
for _points in POINTS.values():
    _points += ["get.committed", "put.committed", "create.committed"]
# An ApplyDiff replacing the layer's image by a clone of its shared image,
# between the removal and the clone.
POINTS["rbd"].append("rbd.replace.removed")
# A Remove that moved the layer's image to the RBD trash, before the purge.
POINTS["rbd"].append("rbd.remove.trashed")
# rbd with container_layers=local: where a docker run's local layers (its
# -init and its own) are made, mounted over the image's lower mapping,
# unmounted and removed.  Its other points are the rbd backend's above
# (image layers) or do nothing for a local layer (commit, map, unmap).
POINTS["rbd-local"] = [
    f"{state}.{when}"
    for state in ("creating", "mounting", "unmounting", "removing")
    for when in ("before", "after")
]
#: Points whose workload is a docker load (an ApplyDiff).
LOAD_POINTS = ("applying.", "rbd.replace.")
#: Points whose workload is a docker save (a Get of an image layer): on rbd
#: a container's layers are mapped as they are created, so only a Get of a
#: layer without a kept device maps.
MAP_POINTS = ("mapping.",)
CASES = [(backend, point) for backend, points in POINTS.items() for point in points]


@pytest.fixture(scope="module")
def crash_stacks(
    module_components: Components, busybox_image: Path, request: pytest.FixtureRequest
) -> Callable[[str], Stack]:
    """
    One txgraph + dockerd per backend (made when first asked for), with
    busybox loaded.
    """
    made: dict[str, Stack] = {}

    def stack_for(backend: str) -> Stack:
        if backend not in made:
            flags: list[str] = []
            if backend in ("rbd", "rbd-local"):
                cluster = request.getfixturevalue("ceph_cluster")
                flags = rbd_flags(cluster, rbd_namespace(cluster))
            if backend == "rbd-local":
                flags += ["--rbd-container-layers", "local"]
            txgraph = module_components.txgraph(*flags)
            dockerd = module_components.dockerd(txgraph.name)
            stack = Stack(txgraph, dockerd)
            stack.backend = "rbd" if backend == "rbd-local" else backend
            stack.local = backend == "rbd-local"
            stack.docker("load", "-i", str(busybox_image))
            made[backend] = stack
        return made[backend]

    return stack_for


def _small_image(tmp_path: Path, tag: str) -> Path:
    rootfs = tmp_path / "rootfs.tar"
    import io
    import tarfile

    with tarfile.open(rootfs, "w") as tf:
        data = os.urandom(4096)
        info = tarfile.TarInfo("payload")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return images.save_tarball(rootfs, tag, {"Cmd": ["/payload"]}, tmp_path / "image.tar")


def _workload(point: str, tmp_path: Path) -> list[str]:
    if point.startswith(LOAD_POINTS):
        return ["load", "-i", str(_small_image(tmp_path, f"crash:{point.replace('.', '-')}"))]
    if point.startswith(MAP_POINTS):
        return ["save", "-o", str(tmp_path / "saved.tar"), "busybox:local"]
    # docker run creates, maps, mounts, unmounts, unmaps, commits (the -init
    # layer, lazily, when the container's layer is made from it) and removes.
    return ["run", "--rm", "--network", "none", "busybox:local", "true"]


def _verify_nothing_leaked_or_lost(stack: Stack) -> None:
    daemon = stack.txgraph
    out = stack.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "alive").stdout
    assert out.strip() == "alive"
    # Devices kept after a last Put (rbd's unmap_delay, 5 s) go when their
    # delay passes (mapped, then unmapping while the unmap runs), and so do
    # the image's lower mappings under local container layers.
    deadline = time.monotonic() + 30
    while any(r["state"] in ("mapped", "unmapping") for r in stack.layers()) or (
        stack.local and host_leftovers(daemon.state_dir)
    ):
        assert time.monotonic() < deadline, "a kept device or lower mapping was never unmapped"
        time.sleep(0.2)
    assert host_leftovers(daemon.state_dir) == []
    assert stack.status()["Mounts"] == "0"
    known: set[str] = set()
    layerdb = stack.dockerd.data_root / "image" / daemon.name / "layerdb"
    for path in list(layerdb.glob("sha256/*/cache-id")) + list(layerdb.glob("mounts/*/*-id")):
        if not path.parent.name.endswith("-removing"):
            known.add(path.read_text().strip())
    for layer_id in known:
        assert ok(daemon, "GraphDriver.Exists", {"ID": layer_id}) == {"Exists": True}, layer_id
    code, findings = gc(
        daemon.state_dir, "--docker-root", str(stack.dockerd.data_root),
        "--driver", daemon.name, "--min-age", "0",
    )
    assert (code, [(f["kind"], f["id"], f["detail"]) for f in findings]) == (0, [])


def _crash_during(
    stack: Stack, point: str, args: list[str], between: Callable[[], None] | None = None
) -> Any:
    """
    Run a docker command while txgraph (armed at C{point}) dies there;
    restart txgraph (after C{between}, if given, runs on the dead daemon's
    state); return the command's result once dockerd gave up or finished.
    """
    daemon = stack.txgraph
    outcome: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(result=stack.docker(*args, check=False, timeout=120))
    )
    worker.start()
    process = daemon.process
    assert process is not None
    process.wait(timeout=60)
    assert process.returncode == -9, f"txgraph did not die at {point}"
    daemon.process = None
    if between is not None:
        between()
    daemon.start()
    worker.join(timeout=120)
    return outcome["result"]


@pytest.mark.dockerd
@pytest.mark.parametrize("backend, point", CASES)
def test_crash_point(
    crash_stacks: Callable[[str], Stack], backend: str, point: str, tmp_path: Path
) -> None:
    """
    txgraph killed at this crash point under a working dockerd, then
    restarted: the operation completes or fails cleanly, and afterwards
    nothing is leaked or lost.
    """
    stack = crash_stacks(backend)
    daemon = stack.txgraph
    daemon.stop()
    daemon.env["TXGRAPH_CRASH_AT"] = point
    daemon.start()
    del daemon.env["TXGRAPH_CRASH_AT"]
    args = _workload(point, tmp_path)
    log_start = daemon.log_path.stat().st_size
    result = _crash_during(stack, point, args)
    with open(daemon.log_path, "rb") as f:
        f.seek(log_start)
        lost = [ln for ln in f.read().decode(errors="replace").splitlines() if "recovery found" in ln]
    assert lost == [], lost
    if result.returncode != 0:
        # dockerd retries a call cut off by the crash with the request body
        # it already consumed: an empty JSON body (refused: "missing ID") or
        # a half-read ApplyDiff stream.  Its operation fails, and dockerd
        # itself then leaks what it created (a container's -init layer is
        # never Removed).  Those, and only those, are what gc must find as
        # layers dockerd does not know; repaired, the operation works.  On
        # rbd, a crash after an ApplyDiff published its layer's shared image
        # leaves that image unused once recovery reset the layer: gc finds
        # and removes it as "shared".
        assert "GraphDriver." in result.stderr, result.stderr
        # A failed Remove leaves the container "Removal In Progress"; the
        # remedy is what a user does: docker rm again (Remove of a layer
        # recovery already removed succeeds).
        _gc_after_a_failed_operation(stack)
        stack.docker(*args)
    _verify_nothing_leaked_or_lost(stack)


#: A thin image's load on rbd: its layer replaced by a clone of the thin
#: tree (the pool has it) or by a candidate built, published and cloned.
THIN_POINTS = ["applying.before", "applying.after", "rbd.replace.removed"]


@pytest.mark.dockerd
@pytest.mark.parametrize("tree", ["in-pool", "made"])
@pytest.mark.parametrize("point", THIN_POINTS)
def test_crash_point_thin_load(
    crash_stacks: Callable[[str], Stack], point: str, tree: str, tmp_path: Path
) -> None:
    """
    txgraph killed at this crash point while dockerd loads a thin image
    (whose tree the pool has, or which the load makes and publishes), then
    restarted: the load completes or fails cleanly, and afterwards nothing
    is leaked or lost.
    """
    stack = crash_stacks("rbd")
    daemon = stack.txgraph
    tag = f"crash-thin:{point.replace('.', '-')}-{tree}"
    made = admin(daemon.state_dir, "make-thin", "busybox:local", "--tag", tag,
                 "--docker-host", stack.dockerd.host, "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    saved = tmp_path / "thin.tar"
    stack.docker("save", "-o", str(saved), tag)
    stack.docker("rmi", tag)
    if tree == "made":
        # Nothing uses the thin tree now: gc removes it, the load makes it.
        findings = _remove_leftovers_and_gc(stack)
        assert "shared" in [f["kind"] for f in findings], findings
    daemon.stop()
    daemon.env["TXGRAPH_CRASH_AT"] = point
    daemon.start()
    del daemon.env["TXGRAPH_CRASH_AT"]
    result = _crash_during(stack, point, ["load", "-i", str(saved)])
    if result.returncode != 0:
        assert "GraphDriver." in result.stderr, result.stderr
        _gc_after_a_failed_operation(stack)
        stack.docker("load", "-i", str(saved))
    out = stack.docker("run", "--rm", "--network", "none", tag, "cat", "/.txgraph-thin.json").stdout
    assert json.loads(out) == json.loads(made.stdout)["descriptor"]
    # Its tree is unused now: gc removes it (and finds nothing else).
    stack.docker("rmi", tag)
    assert {f["kind"] for f in _remove_leftovers_and_gc(stack)} == {"shared"}
    _verify_nothing_leaked_or_lost(stack)


def _gc_after_a_failed_operation(stack: Stack) -> None:
    """
    After an operation the crash made fail: what dockerd leaked (layers it
    does not know, "unknown"), and on rbd a shared image left unused
    ("shared"), and with local container layers the image's lower mapping
    left under a layer dockerd gave up, are all that gc finds; all are
    repaired.
    """
    findings = _remove_leftovers_and_gc(stack)
    assert all(f["repaired"] for f in findings), findings
    lowers = str(stack.txgraph.state_dir / "rbd" / "lower") + "/"
    findings = [
        f for f in findings if not (stack.local and f["kind"] == "mount" and f["id"].startswith(lowers))
    ]
    assert {f["kind"] for f in findings} <= {"unknown", "shared"}, findings


def _remove_leftovers_and_gc(stack: Stack) -> list[dict[str, Any]]:
    """
    What a user does after a failed operation: C{docker rm -f} what is
    left, then C{txgraph-admin gc --apply}; gc's findings.
    """
    leftover = stack.docker("ps", "-aq").stdout.split()
    if leftover:
        stack.docker("rm", "-f", *leftover)
    daemon = stack.txgraph
    _, findings = gc(
        daemon.state_dir, "--apply", "--docker-root", str(stack.dockerd.data_root),
        "--driver", daemon.name, "--min-age", "0",
    )
    return findings


@pytest.mark.dockerd
@pytest.mark.parametrize("backend", list(POINTS))
def test_dockerd_sigkill_with_running_containers(
    crash_stacks: Callable[[str], Stack], backend: str
) -> None:
    """
    dockerd killed by SIGKILL with running containers, then restarted:
    it releases the dead containers' layers, and they can be removed.
    """
    stack = crash_stacks(backend)
    docker = stack.docker
    for name in ("k1", "k2"):
        docker("run", "-d", "--name", name, "--network", "none", "busybox:local", "sleep", "300")
    assert stack.status()["Mounts"] == "2"
    stack.dockerd.kill()
    stack.dockerd.start()
    deadline = time.monotonic() + 30
    while stack.status()["Mounts"] != "0" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.status()["Mounts"] == "0"
    docker("rm", "k1", "k2")
    _verify_nothing_leaked_or_lost(stack)


@pytest.mark.dockerd
@pytest.mark.parametrize("point", ["creating.before", "creating.after"])
def test_power_cut_loses_creating_record(
    crash_stacks: Callable[[str], Stack], point: str, tmp_path: Path
) -> None:
    """
    On overlay the write-ahead C{creating} record is committed without an
    fsync (its prepare is atomic), so a power cut may lose it: txgraph dies
    at the crash point and, before it restarts, the record is deleted, as
    a power cut before the durable C{created} would leave the database.
    Start and gc then clean what the half-done Create left (a layer
    directory without a row is an C{object} orphan; a half-made one in
    .tmp is deleted at start), and nothing dockerd knows is lost.
    """
    stack = crash_stacks("overlay")
    daemon = stack.txgraph
    lost: list[str] = []

    def power_cut() -> None:
        with sqlite3.connect(daemon.state_dir / "txgraph.db") as db:
            lost.extend(r[0] for r in db.execute("SELECT id FROM layers WHERE state = 'creating'"))
            db.execute("DELETE FROM layers WHERE state = 'creating'")

    daemon.stop()
    daemon.env["TXGRAPH_CRASH_AT"] = point
    daemon.start()
    del daemon.env["TXGRAPH_CRASH_AT"]
    args = _workload(point, tmp_path)
    result = _crash_during(stack, point, args, between=power_cut)
    assert len(lost) == 1, lost
    assert result.returncode != 0, result.stdout
    findings = _remove_leftovers_and_gc(stack)
    kinds = {(f["kind"], f["id"]) for f in findings}
    assert {k for k, _ in kinds} <= {"unknown", "object"}, findings
    # The layer whose record was lost: its storage (made before the crash
    # at creating.after) is an orphan object; at creating.before nothing.
    assert (("object", lost[0]) in kinds) == (point == "creating.after"), findings
    assert all(f["repaired"] for f in findings), findings
    stack.docker(*args)
    _verify_nothing_leaked_or_lost(stack)


@pytest.mark.dockerd
def test_lost_get_answer_on_a_container_layer(crash_stacks: Callable[[str], Stack]) -> None:
    """
    txgraph killed after committing the Get of a container's own layer
    (docker start), before answering: dockerd's retry fails, so the start
    fails, and dockerd's clean-up of the failed start Puts the layer.  No
    reference is left over (unlike the -init layer's Get in docker run,
    which leaks the layer: see test_crash_point), gc finds nothing, and the
    container starts and is removed normally.
    """
    stack = crash_stacks("overlay")
    daemon = stack.txgraph
    stack.docker("create", "--name", "held", "--network", "none", "busybox:local", "true")
    try:
        daemon.stop()
        daemon.env["TXGRAPH_CRASH_AT"] = "get.committed"
        daemon.start()
        del daemon.env["TXGRAPH_CRASH_AT"]
        result = _crash_during(stack, "get.committed", ["start", "held"])
        assert result.returncode != 0, result.stdout
        assert "GraphDriver.Get" in result.stderr, result.stderr
        assert stack.status()["Mounts"] == "0"
        assert stack.status()["References"] == "0"
        stack.docker("start", "-a", "held")
        stack.docker("rm", "held")
    finally:
        stack.docker("rm", "-f", "held", check=False)
    _verify_nothing_leaked_or_lost(stack)


# -- the crash matrix of containerd's snapshots ---------------------------------

#: The crash points a snapshot's life reaches: its own transitions
#: (txgraph.snapshotter.CRASH_POINTS) and its layer's on each backend.
SNAPSHOT_POINTS = {
    "overlay": [
        "snapshot.inserted", "snapshot.layer-committed", "snapshot.layer-removed",
        "creating.before", "creating.after", "removing.before", "removing.after",
    ],
    "rbd": [
        "snapshot.inserted", "snapshot.layer-committed", "snapshot.layer-removed",
        "committing.before", "committing.after", "mounting.after", "unmounting.after",
    ],
}
#: The crash points of the remote-snapshot shortcut (rbd's shared layers):
#: a labelled Commit publishes the layer, a labelled Prepare of a chain the
#: pool holds adopts it (through the layer's "applying" state).
SHARED_POINTS = ["snapshot.published", "applying.before", "applying.after", "snapshot.adopted"]
SNAPSHOT_CASES = [(b, p) for b, points in SNAPSHOT_POINTS.items() for p in points] + [
    ("rbd", p) for p in SHARED_POINTS
]


@pytest.fixture(scope="module")
def snapshot_daemons(
    module_components: Components, request: pytest.FixtureRequest
) -> Callable[[str], Txgraphd]:
    """One txgraph per backend (made when first asked for) serving containerd's
    protocol too."""
    made: dict[str, Txgraphd] = {}

    def daemon_for(backend: str) -> Txgraphd:
        if backend not in made:
            flags: list[str] = []
            if backend == "rbd":
                cluster = request.getfixturevalue("ceph_cluster")
                flags = rbd_flags(cluster, rbd_namespace(cluster))
            made[backend] = module_components.txgraph(*flags, containerd=True)
        return made[backend]

    return daemon_for


def _client(daemon: Txgraphd) -> Any:
    from txgraph.testing.snapshotter.client import Snapshotter, Target

    return Snapshotter(Target(f"unix://{daemon.containerd_socket}", "txgraph"))


def _snapshot_workload(sn: Any) -> None:
    """Prepare, Commit, View, Remove: every snapshot transition."""
    sn.prepare("work-a", "keep")
    sn.commit("work", "work-a")
    sn.view("work-v", "work")
    sn.remove("work-v")
    sn.remove("work")


def _shared_workload(sn: Any) -> None:
    """containerd's unpacker on a node that unpacks a layer (Prepare and
    Commit labelled with its chain ID: published), then on one that finds it
    in the pool (Prepare answered AlreadyExists: adopted); then its gc."""
    import grpc

    from txgraph.snapshotter import TARGET_REF

    labels = {TARGET_REF: "sha256:" + secrets.token_hex(32)}
    sn.prepare("pub-a", "", labels)
    sn.commit("pub", "pub-a", labels)
    try:
        sn.prepare("take-a", "", labels)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    else:
        raise AssertionError("a labelled Prepare of a chain in the pool was not AlreadyExists")
    sn.remove("take-a")
    sn.remove("pub")


@pytest.mark.parametrize("backend, point", SNAPSHOT_CASES)
def test_snapshot_crash_point(
    snapshot_daemons: Callable[[str], Txgraphd], backend: str, point: str
) -> None:
    """
    txgraph killed at this point of a snapshot's life (SIGKILL), restarted:
    the snapshot made before is still there, whole; what containerd then
    does (its garbage collection: List, and Remove of what it does not know)
    leaves no layer, no row, no mount; gc finds nothing.
    """
    import grpc

    daemon = snapshot_daemons(backend)
    sn = _client(daemon)
    try:
        sn.prepare("keep-a", "")
        sn.commit("keep", "keep-a")
    finally:
        sn.close()
    daemon.stop()
    daemon.env["TXGRAPH_CRASH_AT"] = point
    daemon.start()
    del daemon.env["TXGRAPH_CRASH_AT"]
    sn = _client(daemon)
    try:
        with pytest.raises(grpc.RpcError):
            (_shared_workload if point in SHARED_POINTS else _snapshot_workload)(sn)
    finally:
        sn.close()
    process = daemon.process
    assert process is not None
    process.wait(timeout=60)
    assert process.returncode == -9, f"txgraph did not die at {point}"
    daemon.process = None
    daemon.start()
    assert "recovery found" not in daemon.log_tail(200)
    sn = _client(daemon)
    try:
        assert sn.stat("keep").kind == 3  # COMMITTED: nothing lost
        # containerd's garbage collector: everything it does not know goes.
        while infos := sn.walk():
            parents = {i.parent for i in infos}
            for info in infos:
                if info.name not in parents:
                    sn.remove(info.name)
    finally:
        sn.close()
    assert json.loads(admin(daemon.state_dir, "ls", "--json").stdout) == []
    assert host_leftovers(daemon.state_dir) == []
    code, findings = gc(daemon.state_dir, "--min-age", "0")
    if point in SHARED_POINTS:
        # The published layer stays in the pool until gc removes it unused.
        findings = [f for f in findings if f["kind"] != "shared"]
        code = 0 if not findings else code
    assert (code, findings) == (0, [])
