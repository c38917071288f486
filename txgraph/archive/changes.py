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


def _names_inodes(fd: int) -> dict[str, int]:
    with os.scandir(fd) as listing:
        return {entry.name: entry.inode() for entry in listing}


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _capability(dirfd: int, name: str) -> bytes:
    return lgetxattr(proc_path(dirfd, os.fsencode(name)), CAPABILITY) or b""


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

    moby collects both trees whole (C{collectFileInfoForChanges}) and then
    compares them; this compares them directory by directory as it walks
    them, so that nothing but the answer is held: a layer of 10,000 files
    made about 180,000 objects live at once (the two trees, linked both
    ways, so that they lingered until the garbage collector's next full
    pass), where the answer is 10,000.  A subtree that is the very same
    inode on the same device in both trees is skipped, as moby skips it;
    a deleted directory is one deletion and is not entered; an added one
    is entered, everything in it added.
    """
    if old is None:
        with tempfile.TemporaryDirectory(prefix="txgraph-empty-") as empty:
            changes = _compare(empty, new)
    else:
        changes = _compare(old, new)
    _modify_parents(changes)
    return sorted_changes(changes)


def _compare(old_dir: str, new_dir: str) -> list[Change]:
    """
    The added, deleted and modified paths of C{new_dir} against
    C{old_dir}, in no particular order, without the directories that are
    modified only because something inside them is (L{_modify_parents}).
    """
    changes: list[Change] = []
    old_st, new_st = os.lstat(old_dir), os.lstat(new_dir)
    if not stat.S_ISDIR(new_st.st_mode):
        return changes
    # Both trees are walked by descriptor: each directory is opened below
    # its root without following any symlink (a path up to PATH_MAX inside
    # the tree works; a directory swapped for a symlink is not entered).
    top1 = os.open(old_dir, WALK_FLAGS) if stat.S_ISDIR(old_st.st_mode) else None
    try:
        top2 = os.open(new_dir, WALK_FLAGS)
    except BaseException:
        if top1 is not None:
            os.close(top1)
        raise
    fd1: int | None = None
    fd2: int | None = None
    try:
        # Directories of the new tree still to compare, each with what the
        # old tree has at its path (None: nothing, so all is added).
        stack: list[tuple[str, os.stat_result | None, os.stat_result]] = [
            ("", old_st, new_st)
        ]
        while stack:
            rel, s1, s2 = stack.pop()
            dir1 = top1 is not None and s1 is not None and stat.S_ISDIR(s1.st_mode)
            same_device = s1 is not None and s1.st_dev == s2.st_dev
            brel = os.fsencode(rel.lstrip("/"))
            fd1 = _open_beneath(top1, brel) if dir1 and top1 is not None else None
            fd2 = _open_beneath(top2, brel)
            names1 = _names_inodes(fd1) if fd1 is not None else {}
            names2 = _names_inodes(fd2) if fd2 is not None else {}
            for name, ino2 in names2.items():
                ino1 = names1.get(name)
                if same_device and ino1 == ino2:
                    continue
                assert fd2 is not None
                c2 = _lstat_at(fd2, name)
                c1 = _lstat_at(fd1, name) if fd1 is not None and ino1 is not None else None
                child = rel + "/" + name
                if c2 is None:
                    if c1 is not None:
                        changes.append(Change(child, ChangeKind.DELETE))
                    continue
                if c1 is None:
                    changes.append(Change(child, ChangeKind.ADD))
                elif fd1 is not None and (
                    _stat_different(c1, c2) or _capability(fd1, name) != _capability(fd2, name)
                ):
                    changes.append(Change(child, ChangeKind.MODIFY))
                if stat.S_ISDIR(c2.st_mode):
                    stack.append((child, c1, c2))
            if fd1 is not None:
                for name in names1.keys() - names2.keys():
                    if _lstat_at(fd1, name) is not None:
                        changes.append(Change(rel + "/" + name, ChangeKind.DELETE))
            for fd in (fd1, fd2):
                if fd is not None:
                    os.close(fd)
            fd1 = fd2 = None
    finally:
        for fd in (fd1, fd2, top1, top2):
            if fd is not None:
                os.close(fd)
    return changes


def _modify_parents(changes: list[Change]) -> None:
    """
    Add moby's "a directory with a change inside it is modified": every
    directory above a change that is not itself added or modified (an
    added directory's content is all added, so only directories present
    in both trees get here; never the root).
    """
    reported = {c.path for c in changes}
    for i in range(len(changes)):
        parent = changes[i].path.rpartition("/")[0]
        while parent and parent not in reported:
            reported.add(parent)
            changes.append(Change(parent, ChangeKind.MODIFY))
            parent = parent.rpartition("/")[0]
