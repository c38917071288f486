"""
moby's Changes and sizes: C{archive.ChangesDirs} (the changes from one full
tree to another), C{archive.ChangesSize} and C{pkg/directory.Size}.

Sizes (the rule callers follow for DiffSize):

  - an overlay layer's size is C{directory_size(upper)};
  - a full tree's size is C{changes_size(root, changes_dirs(root,
    parent_root))}.

ApplyDiff answers as the backend's moby counterpart does: the overlay
backend, like overlay2, the size of the layer's own directory (so, against
its parent, its DiffSize); the rbd backend, like moby's naive-diff drivers
(devicemapper, vfs, btrfs, zfs), the tar's content size
(L{txgraph.archive.apply.ApplyStats.content_bytes}).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Iterator

from twisted.logger import Logger

from txgraph.archive.fs import (
    DIR_FLAGS,
    RESOLVE_BENEATH,
    RESOLVE_NO_SYMLINKS,
    WALK_FLAGS,
    lgetxattr,
    openat2,
    proc_path,
)
from txgraph.archive.tarformat import CAPABILITY, NS
from txgraph.model import Change, ChangeKind

log = Logger()


def directory_size(path: str) -> int:
    """
    moby's C{pkg/directory.Size}: the sum of the sizes (C{lstat}) of every
    non-directory below C{path} with a non-zero size, each inode counted
    once.  Entries vanishing during the walk are ignored.
    """
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    seen: set[int] = set()
    total = 0
    root = os.open(path, WALK_FLAGS)
    try:
        stack = [b""]
        while stack:
            rel = stack.pop()
            fd = _open_beneath(root, rel)
            if fd is None:
                continue
            try:
                with os.scandir(fd) as listing:
                    for entry in listing:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                name = os.fsencode(entry.name)
                                stack.append(rel + b"/" + name if rel else name)
                                continue
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if st.st_size and st.st_ino not in seen:
                            seen.add(st.st_ino)
                            total += st.st_size
            finally:
                os.close(fd)
    finally:
        os.close(root)
    return total


def _open_beneath(root: int, rel: bytes) -> int | None:
    """
    A descriptor of the directory C{rel} (relative, C{b""} for C{root}
    itself) below the directory open as C{root}, found without following
    any symlink, so that a path up to PATH_MAX inside the tree works and a
    directory swapped for a symlink is never entered.  None if it vanished
    or is no longer a directory.
    """
    try:
        return openat2(
            root, rel or b".", WALK_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV):
            return None
        raise


def changes_size(root: str, changes: list[Change]) -> int:
    """
    moby's C{archive.ChangesSize}: the sum of the sizes (C{lstat}) of the
    added and modified non-directories, files with several links counted
    once.
    """
    total = 0
    seen: set[int] = set()
    root_fd = os.open(root, WALK_FLAGS)
    try:
        for change in changes:
            if change.kind == ChangeKind.DELETE:
                continue
            rel = os.fsencode(change.path.lstrip("/"))
            parent, _, name = rel.rpartition(b"/")
            try:
                fd = openat2(
                    root_fd, parent or b".", DIR_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                )
                try:
                    st = os.stat(name or b".", dir_fd=fd, follow_symlinks=False)
                finally:
                    os.close(fd)
            except OSError as e:
                path = os.path.join(root, change.path.lstrip("/"))
                log.error("cannot stat {path}: {error}", path=path, error=e.strerror)
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            if st.st_nlink > 1:
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_size
    finally:
        os.close(root_fd)
    return total


def _same_fs_time(a: int, b: int) -> bool:
    # tar keeps whole seconds: equal, or the same second with either side
    # having no fraction (moby's sameFsTime).
    return a == b or (a // NS == b // NS and (a % NS == 0 or b % NS == 0))


def sorted_changes(changes: list[Change]) -> list[Change]:
    return sorted(changes, key=lambda c: os.fsencode(c.path))


class _Node:
    """
    A file of a tree being compared (moby's C{FileInfo}).
    """

    __slots__ = ("path", "st", "capability", "children", "parent", "added")

    def __init__(
        self, path: str, st: os.stat_result | None, capability: bytes, parent: _Node | None
    ) -> None:
        self.path = path
        self.st = st
        self.capability = capability
        self.children: dict[str, _Node] = {}
        self.parent = parent
        self.added = False

    def is_dir(self) -> bool:
        return self.st is None or stat.S_ISDIR(self.st.st_mode)


# A frame of moby's recursive addChanges, run iteratively: the node, how many
# changes there were before it, its children still to visit, and the old
# children not matched yet.
_Frame = tuple[_Node, int, Iterator[tuple[str, _Node]], dict[str, _Node]]


def _names_inodes(fd: int) -> dict[str, int]:
    with os.scandir(fd) as listing:
        return {entry.name: entry.inode() for entry in listing}


def _collect(old_dir: str, new_dir: str) -> tuple[_Node, _Node]:
    """
    moby's C{collectFileInfoForChanges}: both trees, minus the subtrees
    that are the very same inode on the same device in both.
    """
    old_root = _Node("/", None, b"", None)
    new_root = _Node("/", None, b"", None)
    Stat = os.stat_result | None
    old_st, new_st = os.lstat(old_dir), os.lstat(new_dir)
    # Both trees are walked by descriptor: each directory is opened below
    # its root without following any symlink (a path up to PATH_MAX inside
    # the tree works; a directory swapped for a symlink is not entered).
    top1 = os.open(old_dir, WALK_FLAGS) if stat.S_ISDIR(old_st.st_mode) else None
    try:
        top2 = os.open(new_dir, WALK_FLAGS) if stat.S_ISDIR(new_st.st_mode) else None
    except BaseException:
        if top1 is not None:
            os.close(top1)
        raise
    fd1: int | None = None
    fd2: int | None = None
    try:
        stack: list[tuple[str, Stat, Stat, _Node | None, _Node | None]] = [
            ("", old_st, new_st, old_root, new_root)
        ]
        while stack:
            rel, s1, s2, n1, n2 = stack.pop()
            dir1 = s1 is not None and stat.S_ISDIR(s1.st_mode)
            dir2 = s2 is not None and stat.S_ISDIR(s2.st_mode)
            if not dir1 and not dir2:
                continue
            same_device = s1 is not None and s2 is not None and s1.st_dev == s2.st_dev
            brel = os.fsencode(rel.lstrip("/"))
            fd1 = _open_beneath(top1, brel) if dir1 and top1 is not None else None
            fd2 = _open_beneath(top2, brel) if dir2 and top2 is not None else None
            names1 = _names_inodes(fd1) if fd1 is not None else {}
            names2 = _names_inodes(fd2) if fd2 is not None else {}
            for name in set(names1) | set(names2):
                ino1 = names1.get(name)
                if same_device and ino1 is not None and ino1 == names2.get(name):
                    continue
                child = rel + "/" + name
                c1 = _register(fd1, child, name, n1) if fd1 is not None else None
                c2 = _register(fd2, child, name, n2) if fd2 is not None else None
                stack.append((child, c1.st if c1 else None, c2.st if c2 else None, c1, c2))
            for fd in (fd1, fd2):
                if fd is not None:
                    os.close(fd)
            fd1 = fd2 = None
    finally:
        for fd in (fd1, fd2, top1, top2):
            if fd is not None:
                os.close(fd)
    return old_root, new_root


def _register(dirfd: int, rel: str, name: str, parent: _Node | None) -> _Node | None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    assert parent is not None
    capability = lgetxattr(proc_path(dirfd, os.fsencode(name)), CAPABILITY)
    node = _Node(rel, st, capability or b"", parent)
    parent.children[name] = node
    return node


def _stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    # moby's statDifferent: sizes and times of directories are ignored.
    return (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
        or (
            not stat.S_ISDIR(old.st_mode)
            and (not _same_fs_time(old.st_mtime_ns, new.st_mtime_ns) or old.st_size != new.st_size)
        )
    )


def changes_dirs(new: str, old: str | None) -> list[Change]:
    """
    moby's C{archive.ChangesDirs}: the changes from the full tree C{old}
    to the full tree C{new} (everything added if C{old} is None), sorted
    by path.

    A file is modified if its mode, owner, device number, C{security.
    capability} attribute or (for non-directories) size or time differs;
    a directory with a change inside it is reported modified.
    """
    if old is None:
        with tempfile.TemporaryDirectory(prefix="txgraph-empty-") as empty:
            old_root, new_root = _collect(empty, new)
    else:
        old_root, new_root = _collect(old, new)
    changes: list[Change] = []

    def enter(info: _Node, old_info: _Node | None) -> _Frame:
        start = len(changes)
        if old_info is None:
            changes.append(Change(info.path, ChangeKind.ADD))
            info.added = True
        olds = dict(old_info.children) if old_info is not None and info.is_dir() else {}
        return (info, start, iter(list(info.children.items())), olds)

    stack = [enter(new_root, old_root)]
    while stack:
        info, start, children, olds = stack[-1]
        for name, child in children:
            old_child = olds.pop(name, None)
            if old_child is not None:
                assert old_child.st is not None and child.st is not None
                if (
                    _stat_different(old_child.st, child.st)
                    or old_child.capability != child.capability
                ):
                    changes.append(Change(child.path, ChangeKind.MODIFY))
                    child.added = True
            stack.append(enter(child, old_child))
            break
        else:
            stack.pop()
            for old_child in olds.values():
                changes.append(Change(old_child.path, ChangeKind.DELETE))
            inside = len(changes) > start
            if inside and info.is_dir() and not info.added and info.parent is not None:
                changes.append(Change(info.path, ChangeKind.MODIFY))
    return sorted_changes(changes)

