"""
The backend conformance suite: the same tests for every storage backend.

A backend subscribes with one line::

    class OverlayBackendTests(make_backend_tests(lambda path: OverlayBackend(path, {...}))):
        "The overlay backend passes the conformance suite."

The tests drive the synchronous L{txgraph.backends.Backend} interface the
way the layer machines do, and check what dockerd relies on, after moby's
graphtest: an empty layer is an empty 0755 root-owned directory; a child
sees its parent's files with their modes and owners; Diff then ApplyDiff
reproduces a layer, with ApplyDiff's size answered as the backend's moby
counterpart answers it (L{make_backend_tests}'s C{apply_size}); Changes are exact; removal and the other life-cycle
calls are idempotent, as crash recovery needs.  They need root (mounts).
The 129-layer chain (128 lowers) is read through the whole daemon, in
moby's own suite over the socket (L{txgraph.testing.graphtest}), once per
backend: on rbd it takes about two minutes.
"""

from __future__ import annotations

import errno
import inspect
import io
import os
import stat
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from txgraph.api.containerd.proto import mount_pb2
from txgraph.backends import Backend, BackendContract, LayerInfo
from txgraph.model import Change, ChangeKind, IDMap
from txgraph.testing.snapshotter.mount import mount_all, unmount_all

IDENTITY = IDMap.from_docker(None, None)


def new_id(suffix: str = "") -> str:
    """
    A fresh 64-hex layer ID.
    """
    return uuid.uuid4().hex + uuid.uuid4().hex + suffix


class Layers:
    """
    Drives a backend the way the layer machines do, remembering each
    layer's parent and mapping, and cleaning everything up at the end.
    """

    def __init__(self, backend: Backend, containers: bool = False) -> None:
        self.backend = backend
        #: Read-write layers are made as containers' (L{LayerInfo.container}).
        self.containers = containers
        self.infos: dict[str, LayerInfo] = {}
        self.mounted: set[str] = set()

    def chain(self, layer_id: str) -> list[LayerInfo]:
        """
        Ancestors, nearest first.
        """
        result = []
        parent = self.infos[layer_id].parent
        while parent is not None:
            result.append(self.infos[parent])
            parent = self.infos[parent].parent
        return result

    def create(self, parent: str | None = None, readwrite: bool = True) -> str:
        """
        Prepare a new layer (committing the parent first, unmapped: a
        read-write device is never snapshotted).
        """
        if parent is not None:
            self.commit(parent)
        layer_id = new_id()
        self.prepare(
            LayerInfo(
                id=layer_id,
                parent=parent,
                readwrite=readwrite,
                container=readwrite and self.containers,
            )
        )
        return layer_id

    def commit(self, layer_id: str) -> None:
        """
        Commit a layer (unmapped first: a read-write device is never
        snapshotted), as the machine does before its first child or after
        an ApplyDiff; its later mounts are read-only.
        """
        info = self.infos[layer_id]
        if info.mapping is not None:
            self.backend.unmap(info)
            info = replace(info, mapping=None)
        self.backend.commit(info)
        self.infos[layer_id] = replace(info, committed=True)

    def prepare(self, info: LayerInfo) -> None:
        """
        Prepare a layer, recording the mapping a backend may return (one
        that maps read-write layers as it makes them).
        """
        self.infos[info.id] = replace(info, mapping=None)
        mapping = self.backend.prepare(info)
        self.infos[info.id] = replace(info, mapping=mapping)

    def get(self, layer_id: str) -> str:
        """
        Map (unless mapped already) and mount; return the directory.
        """
        info = self.infos[layer_id]
        if info.mapping is None:
            info = self.infos[layer_id] = replace(info, mapping=self.backend.map(info))
        self.mounted.add(layer_id)
        return self.backend.mount(info, self.chain(layer_id))

    def put(self, layer_id: str) -> None:
        """
        Unmount and unmap.
        """
        info = self.infos[layer_id]
        self.backend.unmount(info)
        self.backend.unmap(info)
        self.infos[layer_id] = replace(info, mapping=None)
        self.mounted.discard(layer_id)

    def write(self, layer_id: str, files: dict[str, bytes]) -> None:
        """
        Write files into a layer through a mount.
        """
        root = self.get(layer_id)
        try:
            for name, data in files.items():
                path = os.path.join(root, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        finally:
            self.put(layer_id)

    def cleanup(self) -> None:
        """
        Remove every layer, children first.
        """
        for layer_id in list(self.mounted):
            self.put(layer_id)
        for layer_id in reversed(list(self.infos)):
            self.backend.remove(self.infos[layer_id])


def _tree(root: str) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    """
    Every entry below C{root}: mode, uid, gid and content (or link target).
    """
    result: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if rel == "lost+found":
                continue
            content: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            result[rel] = (st.st_mode, st.st_uid, st.st_gid, content)
    return result


def contract_members() -> dict[str, Any]:
    """
    Every member of L{BackendContract}: its methods (as functions) and
    declared attributes and properties (as None), by name.
    """
    members: dict[str, Any] = {name: None for name in BackendContract.__annotations__}
    for name, value in vars(BackendContract).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            members[name] = None
        elif inspect.isfunction(value):
            members[name] = value
    return members


def check_contract(backend: object) -> list[str]:
    """
    How C{backend} differs from L{BackendContract}, member by member: a
    missing attribute or method, or a method whose parameters (names,
    kinds, which have defaults) differ from the contract's.  Empty when it
    conforms.  Annotations are not compared here: mypy compares them.
    """
    problems = []
    for name, spec in sorted(contract_members().items()):
        if not hasattr(backend, name):
            problems.append(f"{name} is missing")
            continue
        if spec is None:
            continue
        method = getattr(backend, name)
        if not callable(method):
            problems.append(f"{name} is not a method")
            continue
        wanted = list(inspect.signature(spec).parameters.values())[1:]
        got = list(inspect.signature(method).parameters.values())
        shape = [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in wanted]
        have = [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in got]
        if shape != have:
            problems.append(f"{name}{inspect.signature(method)} is not {name}{inspect.signature(spec)}")
    return problems


def make_contract_tests(factory: Callable[[str], Backend], containers: bool = False) -> type:
    """
    The part of the conformance suite that needs no storage: the backend
    object against the contract, its status, and the idempotency of
    removal and of unmounting, as crash recovery needs.  A fake backend
    passes these (tests/unit/test_fake_backend.py).  With C{containers},
    read-write layers are made as containers' (L{LayerInfo.container}).
    """

    class BackendContractTests:
        """
        The contract every backend keeps, as far as it needs no storage.
        """

        @pytest.fixture
        def layers(self, tmp_path: Any) -> Iterator[Layers]:
            backend = factory(str(tmp_path))
            backend.start()
            driver = Layers(backend, containers)
            try:
                yield driver
            finally:
                driver.cleanup()
                backend.stop()

        def test_status(self, layers: Layers) -> None:
            """
            Status gives key/value string pairs.
            """
            lines = layers.backend.status()
            assert lines and all(
                isinstance(k, str) and isinstance(v, str) for k, v in lines
            )

        def test_contract(self, layers: Layers) -> None:
            """
            The backend has every member of the contract, each method with
            the contract's parameters.
            """
            assert check_contract(layers.backend) == []

        def test_remove_is_idempotent(self, layers: Layers) -> None:
            """
            Removing removes the storage; removing again succeeds.
            """
            layer = layers.create()
            info = layers.infos.pop(layer)
            layers.backend.remove(info)
            assert not layers.backend.exists(info)
            assert layer not in layers.backend.list_layers()
            layers.backend.remove(info)

        def test_unmount_is_idempotent(self, layers: Layers) -> None:
            """
            Unmounting and unmapping what is not mounted or mapped succeeds.
            """
            base = layers.create()
            child = layers.create(base)
            layers.get(child)
            layers.put(child)
            layers.put(child)

    return BackendContractTests


def make_backend_tests(
    factory: Callable[[str], Backend], apply_size: str = "tree", containers: bool = False
) -> type:
    """
    The conformance test class for backends made by C{factory(state_dir)}:
    the contract tests (L{make_contract_tests}) and those of the layers'
    content, which need real storage.

    C{apply_size} is the rule the backend's ApplyDiff size follows, as its
    moby counterpart's does: C{"tree"}, the size of the layer's own tree,
    equal to DiffSize against its parent (overlay2); C{"content"}, the
    tar's content size, the sum of its entries' sizes as Go's tar reader
    gives them (moby's naive-diff drivers, whose C{ApplyDiff} returns
    C{UnpackLayer}'s sum).  The two differ for the same tar: a symlink
    counts its target's length in DiffSize and 0 in the tar.  With
    C{containers}, read-write layers are made as containers'
    (L{LayerInfo.container}).
    """
    if apply_size not in ("tree", "content"):
        raise ValueError(f"apply_size must be 'tree' or 'content', not {apply_size!r}")

    class BackendConformanceTests(make_contract_tests(factory, containers)):  # type: ignore[misc]
        """
        The contract every backend keeps (see L{txgraph.backends}).
        """

        def test_create_empty(self, layers: Layers) -> None:
            """
            A new layer exists and is an empty 0755 directory owned by root.
            """
            layer = layers.create(readwrite=False)
            assert layers.backend.exists(layers.infos[layer])
            assert layer in layers.backend.list_layers()
            root = layers.get(layer)
            st = os.stat(root)
            assert stat.S_IMODE(st.st_mode) == 0o755
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert [n for n in os.listdir(root) if n != "lost+found"] == []
            layers.put(layer)

        def test_create_snapshot(self, layers: Layers) -> None:
            """
            A child sees its parent's files with identical modes and owners.
            """
            base = layers.create()
            root = layers.get(base)
            os.mkdir(os.path.join(root, "a subdir"))
            os.chmod(os.path.join(root, "a subdir"), 0o705 | stat.S_ISVTX)
            os.chown(os.path.join(root, "a subdir"), 1, 2)
            with open(os.path.join(root, "a file"), "wb") as f:
                f.write(b"some content")
            os.chmod(os.path.join(root, "a file"), 0o222 | stat.S_ISUID)
            expected = _tree(root)
            layers.put(base)
            snap = layers.create(base, readwrite=False)
            assert _tree(layers.get(snap)) == expected
            layers.put(snap)
            assert len(expected) == 2

        def _base_and_upper(self, layers: Layers) -> tuple[str, str]:
            base = layers.create()
            layers.write(
                base,
                {
                    "keep": b"kept",
                    "change-me": b"old content",
                    "remove-me": b"doomed",
                    "dir/remove-too": b"doomed too",
                    "same-size": b"aaaa",
                },
            )
            upper = layers.create(base)
            root = layers.get(upper)
            try:
                with open(os.path.join(root, "change-me"), "wb") as f:
                    f.write(b"new and longer content")
                with open(os.path.join(root, "same-size"), "wb") as f:
                    f.write(b"bbbb")
                os.utime(os.path.join(root, "same-size"), ns=(10**9, 10**9))
                os.unlink(os.path.join(root, "remove-me"))
                os.unlink(os.path.join(root, "dir", "remove-too"))
                os.mkdir(os.path.join(root, "added"))
                with open(os.path.join(root, "added", "file"), "wb") as f:
                    f.write(b"x" * 5000)
                os.symlink("keep", os.path.join(root, "link"))
                os.link(os.path.join(root, "added", "file"), os.path.join(root, "hard"))
            finally:
                layers.put(upper)
            return base, upper

        def test_changes(self, layers: Layers) -> None:
            """
            Changes lists exactly what changed, as moby computes it.
            """
            base, upper = self._base_and_upper(layers)
            info = layers.infos[upper]
            changes = layers.backend.changes(info, layers.chain(upper), base)
            assert changes == sorted(changes, key=lambda c: c.path)
            assert set(changes) == {
                Change("/added", ChangeKind.ADD),
                Change("/added/file", ChangeKind.ADD),
                Change("/change-me", ChangeKind.MODIFY),
                Change("/dir", ChangeKind.MODIFY),
                Change("/dir/remove-too", ChangeKind.DELETE),
                Change("/hard", ChangeKind.ADD),
                Change("/link", ChangeKind.ADD),
                Change("/remove-me", ChangeKind.DELETE),
                Change("/same-size", ChangeKind.MODIFY),
            }

        def test_diff_apply(self, layers: Layers) -> None:
            """
            Diff against the parent, applied to a new child of the parent,
            reproduces the layer; ApplyDiff's size follows the backend's
            rule (C{apply_size}): DiffSize, or the tar's content size.
            """
            base, upper = self._base_and_upper(layers)
            info = layers.infos[upper]
            size = layers.backend.diff_size(info, layers.chain(upper), base)
            out = io.BytesIO()
            layers.backend.diff(info, layers.chain(upper), base, out, IDENTITY)
            copy = layers.create(base, readwrite=False)
            out.seek(0)
            applied = layers.backend.apply(layers.infos[copy], out, IDENTITY)
            layers.commit(copy)
            assert size == layers.backend.diff_size(layers.infos[copy], layers.chain(copy), base)
            out.seek(0)
            with tarfile.open(fileobj=out) as tar:
                content = sum(member.size for member in tar.getmembers())
            # The symlink: its target's length is in DiffSize, not in the tar.
            assert size == content + len("keep")
            assert applied == (size if apply_size == "tree" else content)
            expected = _tree(layers.get(upper))
            layers.put(upper)
            actual = _tree(layers.get(copy))
            layers.put(copy)
            assert "remove-me" not in actual and "dir/remove-too" not in actual
            assert {k: v[3] for k, v in actual.items()} == {
                k: v[3] for k, v in expected.items()
            }

        def test_committed_layer_mounts_read_only(self, layers: Layers) -> None:
            """
            A committed layer (an image layer: dockerd Gets it for docker
            save) mounts read-only, with or without a parent, and shows its
            whole tree; before it is committed, a layer made with Create
            (not CreateReadWrite) is written through its mount, as moby's
            graphtest and BuildKit do.
            """
            base = layers.create(readwrite=False)
            layers.write(base, {"base-file": b"from the base"})
            child = layers.create(base, readwrite=False)
            layers.write(child, {"child-file": b"from the child"})
            layers.commit(child)
            for layer, names in ((base, ["base-file"]), (child, ["base-file", "child-file"])):
                root = layers.get(layer)
                try:
                    assert sorted(n for n in os.listdir(root) if n != "lost+found") == names
                    with pytest.raises(OSError) as raised:
                        open(os.path.join(root, "new-file"), "wb").close()
                    assert raised.value.errno == errno.EROFS
                    with pytest.raises(OSError) as raised:
                        os.chmod(os.path.join(root, "base-file"), 0o600)
                    assert raised.value.errno == errno.EROFS
                finally:
                    layers.put(layer)
            assert layers.backend.unmount(layers.infos[child]) is None

        def test_mount_specs(self, layers: Layers, tmp_path: Any) -> None:
            """
            The mounts handed to containerd (mount_specs), mounted as
            containerd's mount.All does: an active snapshot on a committed
            parent shows the parent's files and takes writes into the layer;
            a view shows the parent's tree read-only.  A backend that holds
            client mounts is given its own mount first (as the snapshotter
            does).  Usage is a (bytes, inodes) pair.
            """
            base = layers.create()
            layers.write(base, {"base-file": b"from the base"})
            active = layers.create(base)
            view = layers.create(base, readwrite=False)
            layers.commit(view)
            for layer, is_view in ((active, False), (view, True)):
                if layers.backend.holds_client_mounts:
                    layers.get(layer)
                specs = layers.backend.mount_specs(
                    layers.infos[layer], layers.chain(layer), is_view
                )
                target = tmp_path / f"target-{layer[:8]}"
                target.mkdir()
                mount_all(
                    [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in specs],
                    target,
                )
                try:
                    names = sorted(n for n in os.listdir(target) if n != "lost+found")
                    assert names == ["base-file"], (specs, names)
                    if is_view:
                        with pytest.raises(OSError) as raised:
                            open(target / "new-file", "wb").close()
                        assert raised.value.errno == errno.EROFS
                    else:
                        (target / "new-file").write_bytes(b"written")
                finally:
                    unmount_all(target)
                if layers.backend.holds_client_mounts:
                    layers.put(layer)
            root = layers.get(active)
            try:
                assert open(os.path.join(root, "new-file"), "rb").read() == b"written"
            finally:
                layers.put(active)
            size, inodes = layers.backend.usage(layers.infos[active])
            assert size >= 0 and inodes >= 0

        def test_apply_is_idempotent(self, layers: Layers) -> None:
            """
            Applying again replaces the layer's content (dockerd retries).
            """
            layer = layers.create(readwrite=False)
            for content in (b"first", b"second"):
                tar = io.BytesIO()
                import tarfile

                with tarfile.open(fileobj=tar, mode="w") as tf:
                    ti = tarfile.TarInfo(f"file-{content.decode()}")
                    ti.size = len(content)
                    tf.addfile(ti, io.BytesIO(content))
                tar.seek(0)
                layers.backend.apply(layers.infos[layer], tar, IDENTITY)
            assert sorted(
                n for n in os.listdir(layers.get(layer)) if n != "lost+found"
            ) == ["file-second"]
            layers.put(layer)

        def test_reset_empties(self, layers: Layers) -> None:
            """
            Reset leaves the layer empty but present.
            """
            layer = layers.create()
            layers.write(layer, {"junk": b"junk"})
            layers.backend.reset(layers.infos[layer])
            assert layers.backend.exists(layers.infos[layer])
            assert [n for n in os.listdir(layers.get(layer)) if n != "lost+found"] == []
            layers.put(layer)

        def test_remove_mounted(self, layers: Layers) -> None:
            """
            Remove also tears down a mount left behind (crash recovery).
            """
            base = layers.create()
            child = layers.create(base)
            root = layers.get(child)
            info = layers.infos.pop(child)
            layers.mounted.discard(child)
            layers.backend.remove(info)
            assert not layers.backend.exists(info)
            assert not os.path.ismount(root)

        def test_prepare_replaces_leftovers(self, layers: Layers) -> None:
            """
            Preparing a layer whose storage half-exists (a crashed Create)
            gives a fresh, empty layer.
            """
            layer = layers.create()
            layers.write(layer, {"leftover": b"x"})
            layers.prepare(layers.infos[layer])
            assert [n for n in os.listdir(layers.get(layer)) if n != "lost+found"] == []
            layers.put(layer)

        def test_ensure_mounted(self, layers: Layers) -> None:
            """
            After a restart, a layer recorded as mounted is mounted again if
            its mount is gone, showing the same files.
            """
            base = layers.create()
            layers.write(base, {"f": b"data"})
            child = layers.create(base)
            root = layers.get(child)
            layers.backend.unmount(layers.infos[child])
            again = layers.backend.ensure_mounted(layers.infos[child], layers.chain(child))
            with open(os.path.join(again, "f"), "rb") as f:
                assert f.read() == b"data"
            assert layers.backend.ensure_mounted(
                layers.infos[child], layers.chain(child)
            ) == again
            layers.put(child)
            assert root

        def test_metadata(self, layers: Layers) -> None:
            """
            GetMetadata gives string pairs.
            """
            base = layers.create()
            child = layers.create(base)
            meta = layers.backend.metadata(layers.infos[child], layers.chain(child))
            assert meta and all(isinstance(v, str) for v in meta.values())

    return BackendConformanceTests
