"""
What a tar applied in place changed, tracked while it is applied.

A tar applied in place onto a copy of its parent can only change the paths
it names, so the stat of each of them before it was first touched (the
parent's) and after the apply give the same changes as comparing the whole
trees, without a view of the parent.  Where that is not known for certain
(a path first touched below a directory this layer removed, or reached
through a symlink), it says so and the caller compares the trees.
"""

from __future__ import annotations

import errno
import os
import stat

from txgraph.archive.changes import ChangedSizes, stat_different
from txgraph.archive.fs import (
    DIR_FLAGS,
    RESOLVE_BENEATH,
    RESOLVE_NO_SYMLINKS,
    Tree,
    lgetxattr,
    openat2,
    proc_path,
)
from txgraph.archive.tarformat import CAPABILITY


class ChangeTracker:
    """
    What each path a layer touches was before it first did (the parent's
    file, since the layer is applied onto a copy of its parent), to tell
    at the end which of them changed as
    L{txgraph.archive.changes.changes_dirs} would.

    Only the paths the tar names can differ from the parent: an entry's
    own path, a hard link's target (the link re-applies owner, mode and
    times to the inode), and what whiteouts and opaque directories remove.
    A path first touched below a directory the layer already removed or
    replaced had a parent state nobody can see any more, and a path
    reached through a symlink is not where changes_dirs looks: either makes
    the result unknown (None), and the caller compares the trees.
    """

    def __init__(self, tree: Tree) -> None:
        self._tree = tree
        self.before: dict[bytes, tuple[os.stat_result | None, bytes]] = {}
        self._gone_dirs: set[bytes] = set()
        self.unknown = False
        # One parent directory held open, as long as nothing was removed.
        self._dir: tuple[bytes, int, int] | None = None

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None

    def _lstat(
        self, rel: bytes, capability: bool = True
    ) -> tuple[os.stat_result | None, bytes]:
        """
        C{rel}'s lstat and (if asked) C{security.capability} (None if it
        does not exist); L{_Unknown} if reaching it needs a symlink.
        """
        parent, _, name = rel.rpartition(b"/")
        held = self._dir
        if held is None or held[0] != parent or held[2] != self._tree.generation:
            self.close()
            try:
                fd = openat2(
                    self._tree.root_fd, parent or b".", DIR_FLAGS,
                    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
                )
            except (FileNotFoundError, NotADirectoryError):
                return None, b""
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EXDEV):
                    raise _Unknown() from None
                raise
            held = self._dir = (parent, fd, self._tree.generation)
        try:
            st = os.stat(name, dir_fd=held[1], follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None, b""
        if not capability or stat.S_ISDIR(st.st_mode):
            return st, b""
        return st, lgetxattr(proc_path(held[1], name), CAPABILITY) or b""

    def touch(self, rel: bytes, replaced: bool) -> None:
        """
        Record C{rel} as it is now, if this is the first time the layer
        touches it.  C{replaced}: a directory there is about to go (with
        its contents).
        """
        if self.unknown or rel in self.before:
            return
        parent = rel.rpartition(b"/")[0]
        if parent and parent in self.before and self.before[parent][0] is None:
            # Below a path the parent did not have: neither had it this.
            self.before[rel] = (None, b"")
            return
        end = rel.find(b"/")
        while end != -1:
            if rel[:end] in self._gone_dirs:
                self.unknown = True
                return
            end = rel.find(b"/", end + 1)
        try:
            old = self._lstat(rel)
        except _Unknown:
            self.unknown = True
            return
        self.before[rel] = old
        if replaced and old[0] is not None and stat.S_ISDIR(old[0].st_mode):
            self._gone_dirs.add(rel)

    def size(self) -> int | None:
        """
        changes_size of the paths touched: the added or changed
        non-directories, an inode with several links counted once.
        """
        if self.unknown:
            return None
        sizes = ChangedSizes()
        try:
            for rel in sorted(self.before):
                old, old_capability = self.before[rel]
                try:
                    new, _ = self._lstat(rel, capability=False)
                except _Unknown:
                    # A directory on its way became a symlink: it was
                    # replaced, and this path went with it.
                    continue
                if new is None or stat.S_ISDIR(new.st_mode):
                    continue
                if (
                    old is not None
                    and not stat_different(old, new)
                    and old_capability == (self._lstat(rel)[1])
                ):
                    continue
                sizes.add(new)
        finally:
            self.close()
        return sizes.total


class _Unknown(Exception):
    """
    A path's state before the layer cannot be known for certain.
    """

