"""A port of containerd/continuity's ``fs/fstest``: appliers and directory comparison.

containerd's snapshotter suite (:mod:`txgraph.testing.snapshotter`)
builds layers with *appliers* (create a file with these bytes and this mode,
remove a tree, chown, hard-link, rename) and checks a mounted snapshot
against a plain directory the same appliers were run on, with
``CheckDirectoryEqual``.  This module is that toolkit in Python.

The comparison follows continuity's manifest comparison: every path below
the root (the root itself is not compared), its file type and permission
bits (set-id and sticky bits included), owner and group; for regular files
the size, the content's sha256 and the set of paths that are hard links of
one another; for symlinks the target; for devices the device number.
Modification times and extended attributes are not compared (continuity
does not compare them either).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

#: An applier changes the tree under the given root directory.
Applier = Callable[[str], None]


def _full(root: str, name: str) -> str:
    """``name`` (absolute or relative, as fstest accepts both) below ``root``."""
    return os.path.join(root, name.lstrip("/"))


def apply(*appliers: Applier) -> Applier:
    """All ``appliers``, in order (fstest.Apply)."""

    def run(root: str) -> None:
        for applier in appliers:
            applier(root)

    return run


def create_file(name: str, content: bytes, perm: int) -> Applier:
    """Write ``content`` to ``name`` (created or truncated), then chmod it to ``perm``
    (fstest.CreateFile: an existing file takes the new mode too)."""

    def run(root: str) -> None:
        path = _full(root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, perm)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.chmod(path, perm)

    return run


def create_dir(name: str, perm: int) -> Applier:
    """``mkdir -p`` with ``perm`` (fstest.CreateDir: os.MkdirAll, subject to the
    umask, which the snapshotter suite clears)."""

    def run(root: str) -> None:
        os.makedirs(_full(root, name), perm, exist_ok=True)

    return run


def remove_all(name: str) -> Applier:
    """Remove ``name`` and everything below it; a missing path is no error (os.RemoveAll)."""

    def run(root: str) -> None:
        path = _full(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    return run


def chown(name: str, uid: int, gid: int) -> Applier:
    """lchown ``name`` (fstest.Chown)."""

    def run(root: str) -> None:
        os.lchown(_full(root, name), uid, gid)

    return run


def link(oldname: str, newname: str) -> Applier:
    """Hard-link ``newname`` to ``oldname`` (fstest.Link)."""

    def run(root: str) -> None:
        os.link(_full(root, oldname), _full(root, newname))

    return run


def rename(old: str, new: str) -> Applier:
    """Rename ``old`` to ``new`` (fstest.Rename)."""

    def run(root: str) -> None:
        os.rename(_full(root, old), _full(root, new))

    return run


def base() -> Applier:
    """fstest.Base: the files a base layer needs; none on Linux (it matters on Windows)."""

    def run(root: str) -> None:
        del root

    return run


@dataclass(frozen=True)
class Resource:
    """What continuity's manifest records of one path, for comparison."""

    mode: int
    uid: int
    gid: int
    size: int | None = None
    digest: str | None = None
    links: tuple[str, ...] = ()
    target: str | None = None
    rdev: int | None = None

    def describe(self) -> str:
        """A short human-readable form for difference reports."""
        text = f"mode {stat.filemode(self.mode)} ({self.mode:o}) owner {self.uid}:{self.gid}"
        if self.size is not None:
            text += f" size {self.size} sha256 {self.digest}"
        if len(self.links) > 1:
            text += f" hardlinks {list(self.links)}"
        if self.target is not None:
            text += f" -> {self.target}"
        if self.rdev is not None:
            text += f" device {os.major(self.rdev)}:{os.minor(self.rdev)}"
        return text


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(root: str | Path) -> dict[str, Resource]:
    """Every path below ``root`` (as ``/relative/path``) and what is compared of it."""
    root = os.fspath(root)
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            entries["/" + os.path.relpath(full, root)] = os.lstat(full)
    inodes: dict[tuple[int, int], list[str]] = {}
    for path, st in entries.items():
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    result = {}
    for path, st in entries.items():
        full = os.path.join(root, path.lstrip("/"))
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        if stat.S_ISREG(st.st_mode):
            links = tuple(sorted(inodes[(st.st_dev, st.st_ino)]))
            result[path] = Resource(mode, uid, gid, size=st.st_size, digest=_sha256(full), links=links)
        elif stat.S_ISLNK(st.st_mode):
            result[path] = Resource(mode, uid, gid, target=os.readlink(full))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            result[path] = Resource(mode, uid, gid, rdev=st.st_rdev)
        else:
            result[path] = Resource(mode, uid, gid)
    return result


class DirectoryDiffError(AssertionError):
    """Two trees differ; the message lists every difference."""


def _report(expected: dict[str, Resource], actual: dict[str, Resource]) -> Iterable[str]:
    for path in sorted(expected.keys() - actual.keys()):
        yield f"missing {path}: {expected[path].describe()}"
    for path in sorted(actual.keys() - expected.keys()):
        yield f"unexpected {path}: {actual[path].describe()}"
    for path in sorted(expected.keys() & actual.keys()):
        if expected[path] != actual[path]:
            yield f"changed {path}: {expected[path].describe()} != {actual[path].describe()}"


def check_directory_equal(expected: str | Path, actual: str | Path) -> None:
    """Raise :class:`DirectoryDiffError` unless the trees are equal (fstest.CheckDirectoryEqual)."""
    differences = list(_report(manifest(expected), manifest(actual)))
    if differences:
        raise DirectoryDiffError(
            f"{actual} differs from {expected}:\n  " + "\n  ".join(differences)
        )


def check_directory_equal_with_applier(root: str | Path, applier: Applier, scratch: Path) -> None:
    """Check ``root`` against what ``applier`` makes of an empty directory
    (fstest.CheckDirectoryEqualWithApplier); ``scratch`` is a place for that directory."""
    scratch.mkdir(parents=True, exist_ok=True)
    expected = scratch / f"expected-{os.urandom(4).hex()}"
    expected.mkdir()
    try:
        applier(str(expected))
        check_directory_equal(expected, root)
    finally:
        shutil.rmtree(expected)
