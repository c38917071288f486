"""
txgraph under a real dockerd (Debian's docker.io 20.10, --experimental -s
<plugin>): the scenarios a Docker host lives by, end to end.

For each backend (overlay, rbd on a real dev cluster, and rbd with
containers' layers on local storage), one txgraph and one dockerd serve the
whole module, in order: load, import, run, commit,
build (BuildKit and classic), diff, cp, export, save, rm, rmi, a dockerd
restart, and a txgraph SIGKILL with a running container.  Each test leaves the stack usable for the next.
"""

from __future__ import annotations

import grp
import hashlib
import io
import json
import os
import pwd
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Components, Stack, make_stack
from dockerd import loop_devices_under, mounts_under, pid_alive

from txgraph.backends import layer_key

pytestmark = pytest.mark.dockerd


@pytest.fixture(scope="module", params=["overlay", "rbd", "rbd-local"])
def stack(request: pytest.FixtureRequest, module_components: Components) -> Stack:
    """
    txgraph on each backend in turn, with a dockerd using it; rbd twice:
    with containers' layers in the pool, and kept locally.
    """
    return make_stack(request, module_components, request.param)


def _stray_mounts(stack: Stack) -> list[str]:
    """
    Mounts under txgraph's state directory but for the rbd-fuse mounts of
    layers that rest mapped (devices kept after their last Put), or whose
    kept device is being unmapped right now, and (rbd-local) the image
    layers' lower mounts and their rbd-fuse mounts, kept for unmap_delay
    after their last container's Put.
    """
    if stack.backend != "rbd":
        return mounts_under(stack.txgraph.state_dir)
    # The states first: a device whose unmap ends meanwhile is gone from
    # the mount table before its layer reads "created".
    fuse = stack.txgraph.state_dir / "rbd" / "fuse"
    kept = {str(fuse / layer_key(r["id"])) for r in stack.layers() if r["state"] in ("mapped", "unmapping")}
    lowers = (str(stack.txgraph.state_dir / "rbd" / "lower") + "/", str(fuse / "lower."))
    return [
        m for m in mounts_under(stack.txgraph.state_dir)
        if m not in kept and not (stack.local and m.startswith(lowers))
    ]


def test_info_shows_txgraph(stack: Stack) -> None:
    """
    docker info names the plugin and shows txgraph's Status lines.
    """
    out = stack.docker("info").stdout
    assert f"Storage Driver: {stack.txgraph.name}" in out
    assert f"Backend: {stack.backend}" in out
    assert "Layers By State" in out


def test_load_busybox(stack: Stack, busybox_image: Path) -> None:
    """
    docker load of busybox creates one layer through Create + ApplyDiff,
    with the size dockerd then shows.
    """
    out = stack.docker("load", "-i", str(busybox_image)).stdout
    assert "busybox:local" in out
    size = stack.docker("image", "inspect", "-f", "{{.Size}}", "busybox:local").stdout
    assert int(size) > 1_900_000
    assert len(stack.layer_ids()) == 1


def test_run_rm(stack: Stack) -> None:
    """
    docker run --rm works and leaves no container layer or mount behind.
    """
    before = stack.layer_ids()
    out = stack.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "hi").stdout
    assert out.strip() == "hi"
    assert stack.layer_ids() == before
    assert _stray_mounts(stack) == []


def test_load_debian(stack: Stack, debian_image: Path) -> None:
    """
    docker load of a ~120 MB Debian image streams through ApplyDiff, and
    the image runs.
    """
    stack.docker("load", "-i", str(debian_image), timeout=300)
    out = stack.docker(
        "run", "--rm", "--network", "none", "debian:local", "cat", "/etc/debian_version"
    ).stdout
    assert out.strip().startswith("12")


#: A multi-stage build from the suite's own images, without network: RUN
#: in each, COPY from the context, and COPY --from the first stage.
BUILD_DOCKERFILE = """\
FROM debian:local AS build
RUN echo "debian $(cat /etc/debian_version)" > /out.txt
FROM busybox:local
COPY --from=build /out.txt /from-debian.txt
COPY hello.txt /hello.txt
RUN cat /from-debian.txt /hello.txt > /combined.txt
CMD ["cat", "/combined.txt"]
"""


@pytest.mark.parametrize("builder", ["buildkit", "classic"])
def test_build(stack: Stack, tmp_path: Path, builder: str) -> None:
    """
    docker build with BuildKit (DOCKER_BUILDKIT=1: its snapshots are layers
    with BuildKit's own 25-character IDs) and with the classic builder
    makes an image that runs; removing it and the build cache leaves the
    layers as they were, and nothing mounted.
    """
    before = stack.layer_ids()
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(BUILD_DOCKERFILE)
    (context / "hello.txt").write_text("hello from the context\n")
    env = {"DOCKER_BUILDKIT": "1" if builder == "buildkit" else "0"}
    tag = f"built:{builder}"
    stack.docker("build", "--network", "none", "-t", tag, str(context), env=env, timeout=300)
    if builder == "buildkit":
        assert any(len(i) == 25 for i in stack.layer_ids() - before), "no BuildKit snapshot"
    out = stack.docker("run", "--rm", "--network", "none", tag).stdout
    version = stack.docker("run", "--rm", "--network", "none", "debian:local", "cat", "/etc/debian_version")
    assert out == f"debian {version.stdout.strip()}\nhello from the context\n"
    stack.docker("rmi", tag)
    # The classic builder leaves the first stage's image, untagged.
    stack.docker("image", "prune", "-f")
    stack.docker("builder", "prune", "-af")
    assert stack.layer_ids() == before
    assert _stray_mounts(stack) == []


def test_import(stack: Stack, busybox_rootfs: Path) -> None:
    """
    docker import of a rootfs tar makes a runnable image (dockerd applies
    the layer, finds it identical to busybox's, and Removes the copy).
    """
    before = stack.layer_ids()
    with open(busybox_rootfs, "rb") as f:
        stack.docker("import", "-", "bb:imported", input=f.read(), text=False)
    out = stack.docker("run", "--rm", "--network", "none", "bb:imported", "echo", "imported").stdout
    assert out.strip() == "imported"
    assert stack.layer_ids() == before


def test_commit_and_diff(stack: Stack) -> None:
    """
    A container's changes show in docker diff exactly as moby reports them,
    and docker commit makes an image with them.
    """
    docker = stack.docker
    docker(
        "run", "--name", "c1", "--network", "none", "busybox:local",
        "sh", "-c", "echo new > /newfile && mkdir -p /etc/x && echo y > /etc/x/y && rm /bin/ls",
    )
    diff = docker("diff", "c1").stdout.split("\n")
    assert [line for line in diff if line] == [
        "C /bin", "D /bin/ls", "C /etc", "A /etc/x", "A /etc/x/y", "A /newfile",
    ]
    docker("commit", "c1", "bb:committed")
    out = docker(
        "run", "--rm", "--network", "none", "bb:committed",
        "sh", "-c", "cat /newfile /etc/x/y; ls /bin/ls 2>/dev/null || echo gone",
    ).stdout
    assert out.split() == ["new", "y", "gone"]
    size = docker("ps", "-a", "-s", "--filter", "name=c1", "--format", "{{.Size}}").stdout
    assert size.strip().startswith(("14B", "13B", "15B", "12B", "6B", "7B", "10B", "11B", "9B", "8B")) or "B" in size


def _mapped(stack: Stack) -> dict[str, dict[str, Any]]:
    from txgraph.admin.client import Daemon

    report = Daemon(str(stack.txgraph.state_dir)).call("/status")
    return {m["id"]: m["mapping"] for m in report["mapped"]}


def test_rbd_local_container_layers(stack: Stack) -> None:
    """
    rbd with container_layers=local: a container's layer and its -init
    layer are local overlayfs layers (GetMetadata shows their directories
    and the image layer they are over), both containers of an image share
    one read-only mapping of it, and that mapping goes unmap_delay (5 s)
    after the last of them is removed.
    """
    if not stack.local:
        pytest.skip("only rbd with container_layers=local keeps containers' layers locally")
    docker = stack.docker
    before = stack.layer_ids()
    lower_root = stack.txgraph.state_dir / "rbd" / "lower"
    for name in ("l1", "l2"):
        docker("run", "-d", "--name", name, "--network", "none", "busybox:local", "sleep", "300")
    try:
        data = [
            json.loads(docker("inspect", "-f", "{{json .GraphDriver.Data}}", name).stdout)
            for name in ("l1", "l2")
        ]
        assert data[0]["UpperDir"].startswith(str(stack.txgraph.state_dir / "rbd" / "local") + "/")
        image = json.loads(docker("image", "inspect", "-f", "{{json .GraphDriver.Data}}", "busybox:local").stdout)
        assert "Image" in image and "UpperDir" not in image
        assert data[0]["Base"] == data[1]["Base"] == image["Image"]
        lower = Path(data[0]["LowerDir"].split(":")[-1]).parent
        assert lower.parent == lower_root and Path(data[1]["LowerDir"].split(":")[-1]).parent == lower
        assert mounts_under(lower) == [str(lower)]
        assert stack.status()["Container Layers"] == f"local ({stack.txgraph.state_dir / 'rbd' / 'local'})"
        assert docker("exec", "l2", "sh", "-c", "echo hi > /x && cat /x /etc/passwd").stdout.startswith("hi\n")
    finally:
        docker("rm", "-f", "l1", "l2")
    assert stack.layer_ids() == before
    deadline = time.monotonic() + 30
    while mounts_under(lower):
        assert time.monotonic() < deadline, "the image's lower mapping stayed after its containers"
        time.sleep(0.2)
    assert _stray_mounts(stack) == []


def test_rbd_keeps_a_device_from_create_to_start(stack: Stack) -> None:
    """
    dockerd gets and puts a container's layer at create, and gets it again
    at start: on rbd the last Put keeps the device (unmap_delay), so the
    start mounts the same rbd-fuse mapping instead of mapping again.
    docker diff of the stopped container reads that device, and the
    device is unmapped once the delay (5 s) has passed.
    """
    if stack.backend != "rbd" or stack.local:
        pytest.skip("only the rbd backend maps containers' layers")
    docker = stack.docker
    before = stack.layer_ids()
    docker("create", "--name", "k1", "--network", "none", "busybox:local",
           "sh", "-c", "echo kept > /kept")
    (layer,) = [i for i in stack.layer_ids() - before if not i.endswith("-init")]
    rows = {r["id"]: r for r in stack.layers()}
    assert rows[layer]["state"] == "mapped"
    assert rows[f"{layer}-init"]["state"] == "created"  # committed for its child
    kept = _mapped(stack)[layer]
    assert pid_alive(kept["pid"])
    docker("start", "-a", "k1")
    assert _mapped(stack).get(layer) == kept, "start mapped the layer again"
    assert [line for line in docker("diff", "k1").stdout.split("\n") if line] == ["A /kept"]
    deadline = time.monotonic() + 30
    while layer in _mapped(stack):
        assert time.monotonic() < deadline, "the kept device was never unmapped"
        time.sleep(0.2)
    assert {r["id"]: r["state"] for r in stack.layers()}[layer] == "created"
    assert not pid_alive(kept["pid"])
    assert [line for line in docker("diff", "k1").stdout.split("\n") if line] == ["A /kept"]
    docker("rm", "k1")
    assert stack.layer_ids() == before


def test_cp_into_container(stack: Stack, tmp_path: Path) -> None:
    """
    docker cp into a stopped and into a running container is visible inside.
    """
    docker = stack.docker
    source = tmp_path / "hello.txt"
    source.write_text("hello from the host\n")
    docker("cp", str(source), "c1:/hello.txt")
    docker("create", "--name", "c2", "--network", "none", "busybox:local", "sleep", "60")
    docker("start", "c2")
    try:
        docker("cp", str(source), "c2:/tmp/hello.txt")
        out = docker("exec", "c2", "cat", "/tmp/hello.txt").stdout
        assert out == "hello from the host\n"
    finally:
        docker("rm", "-f", "c2")
    out = docker("cp", "c1:/hello.txt", "-", text=False).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        member = tf.extractfile("hello.txt")
        assert member is not None and member.read() == b"hello from the host\n"


def test_export(stack: Stack) -> None:
    """
    docker export gives the container's whole filesystem, changes included.
    """
    out = stack.docker("export", "c1", text=False).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        names = set(tf.getnames())
    assert {"newfile", "etc/x/y", "bin/busybox", "hello.txt"} <= names
    assert "bin/ls" not in names


def test_save_is_byte_identical(stack: Stack, busybox_rootfs: Path, tmp_path: Path) -> None:
    """
    docker save rebuilds busybox's layer byte for byte from what Get shows.
    """
    saved = tmp_path / "saved.tar"
    stack.docker("save", "-o", str(saved), "busybox:local")
    with tarfile.open(saved) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        [layer] = manifest[0]["Layers"]
        data = tf.extractfile(layer).read()  # type: ignore[union-attr]
    expected = hashlib.sha256(busybox_rootfs.read_bytes()).hexdigest()
    assert hashlib.sha256(data).hexdigest() == expected


#: The kernel's warning when a directory is both a lower directory of one
#: overlay mount and the upper or work directory of another.
IN_USE = "is in-use as upperdir/workdir of another mount"


def _kernel_records() -> list[tuple[int, str]]:
    """
    The kernel log's records as (sequence number, message), read from
    C{/dev/kmsg}: sequence numbers keep counting when the ring buffer drops
    its oldest records, where a count of C{dmesg} lines goes down.
    """
    records = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # Overwritten while we read: the next read resumes.
                continue
            head, _, message = raw.decode("utf-8", "replace").partition(";")
            records.append((int(head.split(",")[1]), message))
    finally:
        os.close(fd)
    return records


def _kernel_mark() -> int:
    """
    The sequence number of the kernel log's newest record.
    """
    return max((seq for seq, _ in _kernel_records()), default=-1)


def _kernel_in_use_lines(since: int) -> list[str]:
    """
    The overlayfs "in-use" warnings the kernel logged after record C{since}.
    """
    return [m.strip() for seq, m in _kernel_records() if seq > since and IN_USE in m]


def _stat_tree(stack: Stack, container: str, top: str) -> dict[str, tuple[str, ...]]:
    """
    What moby's differ compares for each path under C{top} in a running
    container: raw mode, uid, gid, device numbers, mtime (s) and size.
    """
    out = stack.docker(
        "exec", container, "find", top, "-exec", "stat", "-c", "%n|%f|%u|%g|%t:%T|%Y|%s", "{}", "+"
    ).stdout
    result = {}
    for line in out.splitlines():
        path, *fields = line.split("|")
        result[path] = tuple(fields)
    return result


def _moby_diff(before: dict[str, tuple[str, ...]], after: dict[str, tuple[str, ...]]) -> list[str]:
    """
    The docker diff lines moby's overlay2 gives (its naive differ,
    archive.ChangesDirs): a path is added or deleted, or changed when its
    mode, owner or device differs, or for a non-directory its mtime or size
    (never its link count or ctime); every directory above a change is
    changed too.  Sorted by path.
    """
    kinds: dict[str, str] = {}
    for path, new in after.items():
        old = before.get(path)
        is_dir = int(new[0], 16) & 0o170000 == 0o040000
        if old is None:
            kinds[path] = "A"
        elif old[:4] != new[:4] or (not is_dir and old[4:] != new[4:]):
            kinds[path] = "C"
    for path in before:
        if path not in after and os.path.dirname(path) in after:
            kinds[path] = "D"
    for path in list(kinds):
        parent = os.path.dirname(path)
        while parent != "/":
            kinds.setdefault(parent, "C")
            parent = os.path.dirname(parent)
    return [f"{kind} {path}" for path, kind in sorted(kinds.items())]


def test_docker_diff_as_moby_overlay2(stack: Stack, tmp_path: Path) -> None:
    """
    docker diff answers as moby's overlay2 does (naive ChangesDirs) in the
    three cases where a reading of the overlay upper directory differs: a
    hard link (its target is copied up, unchanged), a chmod deep down (the
    directories above it are changed), a docker cp into a directory of a
    running container (the directory is changed).  The expected lines are
    derived from stats before and after by moby's rules.  Reading a
    running container's layer makes the kernel warn about nothing.
    """
    docker = stack.docker
    docker(
        "run", "--name", "diffbase", "--network", "none", "busybox:local", "sh", "-c",
        "mkdir -p /t/dir1 && echo h > /t/hard1 && echo b > /t/dir1/b && chown 1:2 /t/dir1/b",
    )
    docker("commit", "diffbase", "diffbase:1")
    docker("rm", "diffbase")
    source = tmp_path / "copied"
    source.write_text("copied in\n")
    cases = {
        "ln": (lambda c: docker("exec", c, "ln", "/t/hard1", "/t/hard3"), "C /t/hard1", False),
        "chmod": (lambda c: docker("exec", c, "chmod", "600", "/t/dir1/b"), "C /t/dir1", True),
        "cp": (lambda c: docker("cp", str(source), f"{c}:/t/copied"), "C /t", True),
    }
    mark = _kernel_mark()
    for name, (change, line, reported) in cases.items():
        container = f"diff-{name}"
        docker("run", "-d", "--name", container, "--network", "none", "diffbase:1", "sleep", "300")
        try:
            before = _stat_tree(stack, container, "/t")
            change(container)
            after = _stat_tree(stack, container, "/t")
            got = sorted((x for x in docker("diff", container).stdout.split("\n") if x), key=lambda x: x[2:])
            assert got == _moby_diff(before, after), name
            assert (line in got) == reported, (name, got)
        finally:
            docker("rm", "-f", container)
    # Changes of a running container read it through its own mount.
    assert _kernel_in_use_lines(mark) == []


def _image_layer_dirs(stack: Stack) -> list[Path]:
    """
    The diff directories of txgraph's image layers (overlay backend).
    """
    root = stack.txgraph.state_dir / "overlay"
    return [root / r["id"] / "diff" for r in stack.layers() if r["kind"] == "ro"]


def _overlay_xattrs(directory: Path) -> list[str]:
    """
    Every trusted.overlay.* attribute on anything below C{directory}.
    """
    found = []
    for path in [directory, *directory.rglob("*")]:
        for key in os.listxattr(path, follow_symlinks=False):
            if key.startswith("trusted.overlay."):
                found.append(f"{path}: {key}")
    return found


def test_concurrent_save_never_writes_image_layers(stack: Stack, tmp_path: Path) -> None:
    """
    Two concurrent docker save of an image while containers run from it
    (and one more starts) mount its layers read-only: no trusted.overlay.*
    attribute appears in any image layer, the kernel logs no overlayfs
    "in-use" warning, both saves are identical, and nothing stays mounted.
    """
    docker = stack.docker
    running = [f"saver-{i}" for i in range(2)]
    for name in running:
        docker("run", "-d", "--name", name, "--network", "none", "diffbase:1", "sleep", "300")
    mark = _kernel_mark()
    try:
        outputs = [tmp_path / f"save-{i}.tar" for i in range(2)]
        commands = [("save", "-o", str(out), "diffbase:1") for out in outputs]
        commands.append(("run", "--rm", "--network", "none", "diffbase:1", "true"))
        errors: list[Exception] = []

        def run(args: tuple[str, ...]) -> None:
            try:
                docker(*args)
            except Exception as e:  # noqa: BLE001 - asserted in the test's own thread
                errors.append(e)

        jobs = [threading.Thread(target=run, args=(args,)) for args in commands]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        assert errors == []
        digests = {hashlib.sha256(out.read_bytes()).hexdigest() for out in outputs}
        assert len(digests) == 1
        if stack.backend == "overlay":
            layers = _image_layer_dirs(stack)
            assert len(layers) >= 2
            assert [x for d in layers for x in _overlay_xattrs(d)] == []
        assert _kernel_in_use_lines(mark) == []
    finally:
        docker("rm", "-f", *running)
    assert _stray_mounts(stack) == []


def test_layer_tar_names_owners_from_the_host(stack: Stack, tmp_path: Path) -> None:
    """
    A committed layer's tar (its bytes are txgraph's Diff) names each
    file's owner and group from the host's user and group databases, as
    moby's archive package does: root's files root:root, /t/dir1/b (1:2)
    the host's names for uid 1 and gid 2.
    """
    saved = tmp_path / "diffbase.tar"
    stack.docker("save", "-o", str(saved), "diffbase:1")
    with tarfile.open(saved) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        top = tf.extractfile(manifest[0]["Layers"][-1]).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(top)) as layer:
        owners = {m.name: (m.uid, m.gid, m.uname, m.gname) for m in layer.getmembers()}
    assert owners["t/dir1/b"][:2] == (1, 2)
    for uid, gid, uname, gname in owners.values():
        assert (uname, gname) == (pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name)
    assert owners["t/hard1"][2:] == ("root", "root")
    stack.docker("rmi", "diffbase:1")


def test_rm_and_rmi(stack: Stack) -> None:
    """
    docker rm removes the container's two layers; docker rmi removes the
    committed image's layer, and nothing is left mounted.
    """
    before = stack.layer_ids()
    stack.docker("rm", "c1")
    after_rm = stack.layer_ids()
    assert len(before - after_rm) == 2
    stack.docker("rmi", "bb:committed")
    assert len(after_rm - stack.layer_ids()) == 1
    assert _stray_mounts(stack) == []


def test_dockerd_restart(stack: Stack) -> None:
    """
    After dockerd restarts (Init again, same options), images still run.
    """
    stack.dockerd.restart()
    out = stack.docker("run", "--rm", "--network", "none", "busybox:local", "echo", "again").stdout
    assert out.strip() == "again"


def test_txgraph_sigkill_with_running_container(stack: Stack) -> None:
    """
    txgraph killed with SIGKILL and restarted under a running dockerd and
    container (no new Init) keeps the container's mount and references;
    stop, rm and rmi then work and leave no mount behind.
    """
    docker = stack.docker
    docker("run", "-d", "--name", "c3", "--network", "none", "busybox:local", "sleep", "300")
    before = stack.status()
    assert before["Mounts"] == "1"
    stack.txgraph.kill()
    stack.txgraph.start()
    after = stack.status()
    assert after["Mounts"] == "1" and after["References"] == before["References"]
    out = docker("exec", "c3", "cat", "/etc/passwd").stdout
    assert "root" in out
    docker("stop", "-t", "1", "c3")
    docker("rm", "c3")
    docker("rmi", "bb:imported", "debian:local")
    assert stack.status()["Mounts"] == "0"
    assert _stray_mounts(stack) == []


def test_stop_unmaps_kept_devices(stack: Stack) -> None:
    """
    txgraph's own stop (SIGTERM, without dockerd's Cleanup) unmaps the
    devices it kept: a read-write layer made over the socket rests mapped,
    and after the stop no loop device or rbd-fuse of it is left; started
    again, txgraph has the layer at rest, unmapped.
    """
    if stack.backend != "rbd":
        pytest.skip("only the rbd backend maps devices")
    layer = hashlib.sha256(b"kept at stop").hexdigest()
    status, reply = stack.txgraph.call("GraphDriver.CreateReadWrite", {"ID": layer, "Parent": ""})
    assert status == 200, reply
    kept = _mapped(stack)[layer]
    assert pid_alive(kept["pid"])
    assert stack.txgraph.stop() == -signal.SIGTERM
    assert not pid_alive(kept["pid"])
    assert [d for d in loop_devices_under(stack.txgraph.state_dir) if layer in d] == []
    stack.txgraph.start()
    assert {r["id"]: r["state"] for r in stack.layers()}[layer] == "created"
    status, reply = stack.txgraph.call("GraphDriver.Remove", {"ID": layer})
    assert status == 200, reply


def test_no_reactor_lag(stack: Stack) -> None:
    """
    Through everything above (a 127 MB ApplyDiff included), the reactor
    thread was never blocked for long: all blocking work ran in threads.
    """
    lag = float(stack.status()["Reactor Max Lag"].split()[0])
    assert lag < 250, f"the reactor was blocked for {lag} ms"


def test_clean_shutdown(stack: Stack) -> None:
    """
    Stopping dockerd (Cleanup) and then txgraph (SIGTERM) leaves no mount
    and no device, and txgraph shuts down in order.  (twistd re-raises SIGTERM after an
    orderly shutdown, so its status is "terminated by SIGTERM", which is
    what systemd counts as a clean stop.)
    """
    stack.dockerd.stop()
    assert stack.txgraph.stop() == -signal.SIGTERM
    log = stack.txgraph.log_path.read_text()
    assert "Main loop terminated." in log
    assert "Traceback" not in log
    assert mounts_under(stack.txgraph.state_dir) == []
    # No device kept after a last Put outlives the daemon either.
    assert loop_devices_under(stack.txgraph.state_dir) == []
