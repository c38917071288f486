"""
moby's own graph driver conformance suite, ported to run against a
running graph driver plugin over its socket, as dockerd speaks to it.

moby tests its built-in drivers with C{daemon/graphdriver/graphtest}
(v20.10.24: C{graphtest_unix.go}, C{testutil.go}, C{testutil_unix.go}).
That suite cannot reach a plugin (it skips unknown driver names), so its
checks are ported here, with its IDs (C{empty}, C{Base}, C{Snap},
C{<driver>Test} and random 64-hex ones), its file names, sizes, modes and
owners, its 128-layer read (a base and 128 children: 128 lower layers
under the top one), its DiffApply assertion (ApplyDiff's size equals
C{DiffSize(upper, "")}), its 21 Changes, and its quota test (a 25 MiB write
into a 50M layer succeeds, a further 50 MiB write fails with ENOSPC or
EDQUOT).  One difference: the random file contents come from Python's
generator, seeded as moby seeds Go's, so the bytes differ from Go's (the
tests compare what they wrote with what they read, so nothing they check
depends on the bytes).

A backend subscribes with one line, given a C{graphdriver} fixture that
yields a L{PluginClient} of a daemon running that backend::

    class TestOverlayGraphtest(make_graphtest()):
        "moby's graphtest against txgraph's overlay backend."
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import shutil
import stat
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from txgraph.engine import UnixHTTPConnection

#: archive.ChangeModify, ChangeAdd, ChangeDelete in moby.
CHANGE_MODIFY, CHANGE_ADD, CHANGE_DELETE = 0, 1, 2
MIB = 1 << 20


class PluginError(Exception):
    """
    A graph driver call that failed: its method, HTTP status and C{Err}.
    """

    def __init__(self, method: str, status: int, message: str) -> None:
        super().__init__(f"{method}: {status} {message}")
        self.method = method
        self.status = status
        self.message = message


class PluginClient:
    """
    The graph driver protocol over a plugin's UNIX socket, as dockerd's
    C{graphDriverProxy} speaks it (JSON POSTs, ApplyDiff's raw tar body,
    Diff's raw tar answer).
    """

    def __init__(self, socket: str, timeout: float = 600) -> None:
        self.socket = socket
        self.timeout = timeout

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.socket, self.timeout)
        try:
            conn.request(
                "POST", path, body=body,
                headers={"Accept": "application/vnd.docker.plugins.v1.2+json"},
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def call(self, method: str, **args: Any) -> dict[str, Any]:
        """
        One JSON call; its decoded answer, or L{PluginError}.  Empty
        arguments are left out, as dockerd's C{omitempty} does.
        """
        body = json.dumps({k: v for k, v in args.items() if v}).encode()
        status, raw = self._post(f"/GraphDriver.{method}", body)
        reply = json.loads(raw) if raw else {}
        if status != 200 or reply.get("Err"):
            raise PluginError(method, status, reply.get("Err", raw.decode(errors="replace")))
        return reply  # type: ignore[no-any-return]

    def create(self, layer_id: str, parent: str = "", storage_opt: dict[str, str] | None = None) -> None:
        """
        Create (an image layer).
        """
        self.call("Create", ID=layer_id, Parent=parent, StorageOpt=storage_opt)

    def create_rw(self, layer_id: str, parent: str = "", storage_opt: dict[str, str] | None = None) -> None:
        """
        CreateReadWrite (a container's layer).
        """
        self.call("CreateReadWrite", ID=layer_id, Parent=parent, StorageOpt=storage_opt)

    def remove(self, layer_id: str) -> None:
        """
        Remove.
        """
        self.call("Remove", ID=layer_id)

    def get(self, layer_id: str) -> str:
        """
        Get: the layer's directory.
        """
        return str(self.call("Get", ID=layer_id)["Dir"])

    def put(self, layer_id: str) -> None:
        """
        Put.
        """
        self.call("Put", ID=layer_id)

    def exists(self, layer_id: str) -> bool:
        """
        Exists.
        """
        return bool(self.call("Exists", ID=layer_id)["Exists"])

    def diff_size(self, layer_id: str, parent: str = "") -> int:
        """
        DiffSize.
        """
        return int(self.call("DiffSize", ID=layer_id, Parent=parent)["Size"])

    def changes(self, layer_id: str, parent: str = "") -> list[tuple[str, int]]:
        """
        Changes, as (path, kind) pairs.
        """
        reply = self.call("Changes", ID=layer_id, Parent=parent)
        return [(c["Path"], c["Kind"]) for c in reply.get("Changes") or []]

    def diff(self, layer_id: str, parent: str = "") -> bytes:
        """
        Diff: the layer tar.
        """
        body = json.dumps({k: v for k, v in {"ID": layer_id, "Parent": parent}.items() if v})
        status, raw = self._post("/GraphDriver.Diff", body.encode())
        if status != 200:
            raise PluginError("Diff", status, raw.decode(errors="replace"))
        return raw

    def apply_diff(self, layer_id: str, parent: str, tar: bytes) -> int:
        """
        ApplyDiff: the tar becomes the layer's content; its size.
        """
        query = f"id={quote(layer_id, safe='')}&parent={quote(parent, safe='')}"
        status, raw = self._post(f"/GraphDriver.ApplyDiff?{query}", tar)
        reply = json.loads(raw) if raw else {}
        if status != 200 or reply.get("Err"):
            raise PluginError("ApplyDiff", status, reply.get("Err", raw.decode(errors="replace")))
        return int(reply["Size"])

    @contextlib.contextmanager
    def mounted(self, layer_id: str) -> Iterator[str]:
        """
        Get, and Put when done.
        """
        root = self.get(layer_id)
        try:
            yield root
        finally:
            self.put(layer_id)


def random_id() -> str:
    """
    A fresh ID as moby's C{stringid.GenerateRandomID} makes them.
    """
    return secrets.token_hex(32)


def random_content(size: int, seed: int) -> bytes:
    """
    C{size} bytes determined by C{seed} (moby's C{randomContent}).
    """
    return random.Random(seed).randbytes(size)


def _write(path: str, data: bytes, mode: int) -> None:
    # Go's ioutil.WriteFile: create with the mode (the umask applies), truncate.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_dir(path: str) -> list[str]:
    """
    moby's C{readDir}: the entries, without C{lost+found} (block-device
    drivers' filesystems have one).
    """
    return sorted(n for n in os.listdir(path) if n != "lost+found")


def verify_file(path: str, mode: int, uid: int, gid: int) -> None:
    """
    moby's C{verifyFile}: type, permissions, sticky, setuid and setgid
    bits, and owner, exactly.
    """
    st = os.stat(path)
    assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(mode), path
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode), (
        f"{path}: mode {stat.S_IMODE(st.st_mode):o}, expected {stat.S_IMODE(mode):o}"
    )
    assert (st.st_uid, st.st_gid) == (uid, gid), path


def create_base(driver: PluginClient, name: str) -> None:
    """
    moby's C{createBase}: a read-write layer with C{a subdir} (0705 and
    sticky, owned 1:2) and C{a file} (C{Some data}, 0222 and setuid),
    made under umask 0.
    """
    old = os.umask(0)
    try:
        driver.create_rw(name)
        with driver.mounted(name) as root:
            subdir = os.path.join(root, "a subdir")
            os.mkdir(subdir, 0o705 | stat.S_ISVTX)
            os.chown(subdir, 1, 2)
            _write(os.path.join(root, "a file"), b"Some data", 0o222 | stat.S_ISUID)
    finally:
        os.umask(old)


def verify_base(driver: PluginClient, name: str) -> None:
    """
    moby's C{verifyBase}: exactly those two entries, with those modes
    and owners.
    """
    with driver.mounted(name) as root:
        verify_file(os.path.join(root, "a subdir"), stat.S_IFDIR | 0o705 | stat.S_ISVTX, 1, 2)
        verify_file(os.path.join(root, "a file"), stat.S_IFREG | 0o222 | stat.S_ISUID, 0, 0)
        assert len(read_dir(root)) == 2


def add_file(driver: PluginClient, layer: str, name: str, content: bytes) -> None:
    """
    moby's C{addFile} (mode 0755).
    """
    with driver.mounted(layer) as root:
        _write(os.path.join(root, name), content, 0o755)


def check_file(driver: PluginClient, layer: str, name: str, content: bytes) -> None:
    """
    moby's C{checkFile}.
    """
    with driver.mounted(layer) as root:
        assert _read(os.path.join(root, name)) == content, name


def add_many_files(driver: PluginClient, layer: str, count: int, seed: int) -> None:
    """
    moby's C{addManyFiles}: C{directory-<i>/file-<i+j>}, 100 per
    directory, 64 bytes each.
    """
    with driver.mounted(layer) as root:
        for i in range(0, count, 100):
            directory = os.path.join(root, f"directory-{i}")
            os.makedirs(directory, 0o755, exist_ok=True)
            for j in range(min(100, count - i)):
                _write(os.path.join(directory, f"file-{i + j}"), random_content(64, seed + i + j), 0o755)


def check_many_files(driver: PluginClient, layer: str, count: int, seed: int) -> None:
    """
    moby's C{checkManyFiles}.
    """
    with driver.mounted(layer) as root:
        for i in range(0, count, 100):
            for j in range(min(100, count - i)):
                path = os.path.join(root, f"directory-{i}", f"file-{i + j}")
                assert _read(path) == random_content(64, seed + i + j), path


def change_many_files(driver: PluginClient, layer: str, count: int, seed: int) -> list[tuple[str, int]]:
    """
    moby's C{changeManyFiles}: in each directory, every third file
    modified, one added beside every third, every third removed; returns
    the changes moby expects (the directory itself modified, first).
    """
    changes: list[tuple[str, int]] = []
    with driver.mounted(layer) as root:
        for i in range(0, count, 100):
            archive_root = f"/directory-{i}"
            os.makedirs(root + archive_root, 0o755, exist_ok=True)
            for j in range(min(100, count - i)):
                if j == 0:
                    changes.append((archive_root, CHANGE_MODIFY))
                if j % 3 == 0:
                    path = f"{archive_root}/file-{i + j}"
                    _write(root + path, random_content(64, seed + i + j), 0o755)
                    changes.append((path, CHANGE_MODIFY))
                elif j % 3 == 1:
                    path = f"{archive_root}/file-{seed}-{i + j}"
                    _write(root + path, random_content(64, seed + i + j), 0o755)
                    changes.append((path, CHANGE_ADD))
                else:
                    path = f"{archive_root}/file-{i + j}"
                    os.remove(root + path)
                    changes.append((path, CHANGE_DELETE))
    return changes


def add_many_layers(driver: PluginClient, base: str, count: int) -> str:
    """
    moby's C{addManyLayers}: C{count} layers over C{base}, each writing
    C{top-id} and C{layer-<i>/{layer-id,parent-id}}; returns the top one.
    """
    last = base
    for i in range(1, count + 1):
        layer = random_id()
        driver.create(layer, last)
        with driver.mounted(layer) as root:
            _write(os.path.join(root, "top-id"), layer.encode(), 0o755)
            layer_dir = os.path.join(root, f"layer-{i}")
            os.makedirs(layer_dir, 0o755, exist_ok=True)
            _write(os.path.join(layer_dir, "layer-id"), layer.encode(), 0o755)
            _write(os.path.join(layer_dir, "parent-id"), last.encode(), 0o755)
        last = layer
    return last


def check_many_layers(driver: PluginClient, layer: str, count: int) -> None:
    """
    moby's C{checkManyLayers}: from the top, each layer's files name it
    and lead to its parent.
    """
    with driver.mounted(layer) as root:
        expected = _read(os.path.join(root, "top-id"))
        assert expected == layer.encode()
        for i in range(count, 0, -1):
            layer_dir = os.path.join(root, f"layer-{i}")
            assert _read(os.path.join(layer_dir, "layer-id")) == expected, f"layer-{i}"
            expected = _read(os.path.join(layer_dir, "parent-id"))


def _remove_all(driver: PluginClient, layer: str, *names: str) -> None:
    with driver.mounted(layer) as root:
        for name in names:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _check_removed(driver: PluginClient, layer: str, name: str) -> None:
    with driver.mounted(layer) as root:
        assert not os.path.lexists(os.path.join(root, name)), f"{name} still exists"


def make_graphtest(driver_name: str = "txgraph", quota_required: bool = True) -> type:
    """
    The ported graphtest class.  The test module provides a C{graphdriver}
    fixture (a L{PluginClient}); C{driver_name} makes the quota test's
    layer name (C{<driver>Test}); C{quota_required} is moby's C{required}:
    whether a driver answering "not supported" fails rather than skips.
    """

    class GraphDriverTests:
        """
        moby's graphtest checks (v20.10.24), over the plugin socket.
        """

        def test_create_empty(self, graphdriver: PluginClient) -> None:
            """
            DriverTestCreateEmpty: C{empty} exists and is an empty 0755
            directory owned by root.
            """
            graphdriver.create("empty")
            try:
                assert graphdriver.exists("empty"), "Newly created image doesn't exist"
                with graphdriver.mounted("empty") as root:
                    verify_file(root, stat.S_IFDIR | 0o755, 0, 0)
                    assert read_dir(root) == []
            finally:
                graphdriver.remove("empty")

        def test_create_base(self, graphdriver: PluginClient) -> None:
            """
            DriverTestCreateBase: C{Base}'s two entries keep their modes
            (sticky, setuid) and owners.
            """
            create_base(graphdriver, "Base")
            try:
                verify_base(graphdriver, "Base")
            finally:
                graphdriver.remove("Base")

        def test_create_snap(self, graphdriver: PluginClient) -> None:
            """
            DriverTestCreateSnap: C{Snap}, a child of C{Base}, shows the same
            entries, modes and owners.
            """
            create_base(graphdriver, "Base")
            try:
                graphdriver.create("Snap", "Base")
                try:
                    verify_base(graphdriver, "Snap")
                finally:
                    graphdriver.remove("Snap")
            finally:
                graphdriver.remove("Base")

        def test_deep_layer_read(self, graphdriver: PluginClient) -> None:
            """
            DriverTestDeepLayerRead(128): a base and 128 children, each
            writing files of its own; the top (over 128 lower layers) sees
            every layer's files and the base's C{testfile.txt}.
            """
            base = random_id()
            graphdriver.create(base)
            content = b"test content"
            add_file(graphdriver, base, "testfile.txt", content)
            top = add_many_layers(graphdriver, base, 128)
            check_many_layers(graphdriver, top, 128)
            check_file(graphdriver, top, "testfile.txt", content)

        def test_diff_apply(self, graphdriver: PluginClient) -> None:
            """
            DriverTestDiffApply(10): the Diff of an upper layer against its
            base, applied to a new child of the base, reproduces it, and
            ApplyDiff's size equals C{DiffSize(upper, "")}.
            """
            file_count = 10
            base, upper = random_id(), random_id()
            delete_file, delete_content = "file-remove.txt", b"This file should get removed in upper!"
            delete_dir = "var/lib"
            graphdriver.create(base)
            add_many_files(graphdriver, base, file_count, 3)
            add_file(graphdriver, base, delete_file, delete_content)
            with graphdriver.mounted(base) as root:
                os.makedirs(os.path.join(root, delete_dir), 0o755, exist_ok=True)
            graphdriver.create(upper, base)
            add_many_files(graphdriver, upper, file_count, 6)
            _remove_all(graphdriver, upper, delete_file, delete_dir)
            diff_size = graphdriver.diff_size(upper, "")
            diff = random_id()
            graphdriver.create(diff, base)
            check_many_files(graphdriver, diff, file_count, 3)
            check_file(graphdriver, diff, delete_file, delete_content)
            tar = graphdriver.diff(upper, base)
            applied = graphdriver.apply_diff(diff, base, tar)
            check_many_files(graphdriver, diff, file_count, 6)
            _check_removed(graphdriver, diff, delete_file)
            _check_removed(graphdriver, diff, delete_dir)
            assert applied == diff_size, (
                f"Apply diff size different, got {applied}, expected {diff_size}"
            )

        def test_changes(self, graphdriver: PluginClient) -> None:
            """
            DriverTestChanges: the 21 changes of 20 changed files (and their
            directory), exactly, in moby's order.
            """
            base, upper = random_id(), random_id()
            graphdriver.create(base)
            add_many_files(graphdriver, base, 20, 3)
            graphdriver.create(upper, base)
            expected = change_many_files(graphdriver, upper, 20, 6)
            actual = graphdriver.changes(upper, base)
            assert len(expected) == 21
            assert sorted(actual) == sorted(expected)

        def test_set_quota(self, graphdriver: PluginClient) -> None:
            """
            DriverTestSetQuota(required): in a read-write child of C{Base}
            with C{size=50M}, a 25 MiB file fits and a further 50 MiB one
            fails with ENOSPC or EDQUOT.
            """
            name = f"{driver_name}Test"
            create_base(graphdriver, "Base")
            try:
                try:
                    graphdriver.create_rw(name, "Base", {"size": "50M"})
                except PluginError as e:
                    if not quota_required and "Filesystem does not support, or has not enabled quotas" in e.message:
                        pytest.skip(f"Quota not supported on underlying filesystem: {e}")
                    raise
                try:
                    with graphdriver.mounted(name) as root:
                        quota = 50 * MIB
                        _write(os.path.join(root, "smallfile"), random_content(quota // 2, 0), 0o700)
                        with pytest.raises(OSError) as failed:
                            _write(os.path.join(root, "bigfile"), random_content(quota, 0), 0o700)
                        assert failed.value.errno in (errno.ENOSPC, errno.EDQUOT), failed.value
                finally:
                    graphdriver.remove(name)
            finally:
                graphdriver.remove("Base")

    return GraphDriverTests
