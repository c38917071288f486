"""
The filesystem primitives the archive package works through: C{openat2(2)}
confined to a root, a bounded cache of directory descriptors below it,
removal that never follows symlinks, and tar names split into components.

Safety: txgraph runs as root and applies tars from anywhere.  Containment
is enforced by the kernel, not by string checks: every parent directory is
opened with C{openat2(2)} and C{RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS}
relative to the root, so a symlink in the tree (even to C{/} or
C{../../..}) resolves as if the root were C{/}, exactly as in moby's
C{chroot}-ed extraction; the last component is then created or changed
with C{*at} calls relative to that directory without following symlinks.
Names whose normalised form climbs above the root are rejected outright.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections import OrderedDict

_SYS_OPENAT2 = 437  # the same number on every architecture but alpha
_RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE_IN_ROOT = 0x10
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(
    dirfd: int, path: bytes, flags: int, resolve: int = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
) -> int:
    """
    C{openat2(dirfd, path, flags)} with C{path} resolved as if C{dirfd}
    were the root directory (or as C{resolve} says).
    """
    how = _OpenHow(flags, 0, resolve)
    for _ in range(64):
        fd: int = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # EAGAIN: a concurrent rename or mount raced the lookup; try again.
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), os.fsdecode(path))


def proc_path(dirfd: int, name: bytes) -> bytes:
    """
    A path naming C{name} in the directory open as C{dirfd}, for the calls
    that have no C{*at} form (the xattr calls).
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


class Tree:
    """
    A root directory, held open, and a bounded cache of O_PATH descriptors
    of directories below it, each found by C{openat2} inside the root.
    """

    def __init__(self, root: str, cache_size: int = 64) -> None:
        self.root_fd = os.open(root, DIR_FLAGS)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        self._retired: list[int] = []
        try:
            os.close(openat2(self.root_fd, b".", DIR_FLAGS))
        except OSError as e:
            os.close(self.root_fd)
            if e.errno == errno.ENOSYS:
                raise OSError(e.errno, "openat2(2) is required (Linux 5.6 or later)") from e
            raise

    def close(self) -> None:
        """
        Close every descriptor.
        """
        self.forget()
        self.release()
        os.close(self.root_fd)

    def forget(self) -> None:
        """
        Drop the cache: called whenever a directory or symlink was removed,
        since a cached descriptor may now be of a detached directory.  The
        descriptors stay open until L{release}, so that those the caller
        still holds stay valid.
        """
        self._retired.extend(self._cache.values())
        self._cache.clear()

    def release(self) -> None:
        """
        Close the descriptors dropped from the cache since the last call:
        called between entries, when nobody holds one.
        """
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def lookup(self, rel: bytes) -> int:
        """
        The descriptor (owned by the cache: do not close it) of directory
        C{rel} (C{b""} for the root), valid until the next L{release}.
        L{OSError} if it does not resolve to a directory.
        """
        if not rel:
            return self.root_fd
        fd = self._cache.get(rel)
        if fd is not None:
            self._cache.move_to_end(rel)
            return fd
        fd = openat2(self.root_fd, rel, DIR_FLAGS)
        self._cache[rel] = fd
        if len(self._cache) > self._cache_size:
            self._retired.append(self._cache.popitem(last=False)[1])
        return fd

    def ensure(self, rel: bytes, owner: tuple[int, int]) -> int:
        """
        Like L{lookup}, creating missing directories (mode 0755, owned by
        C{owner}) as moby does for entries whose parents the tar omits.
        L{NotADirectoryError} if a component exists but is not a directory.
        """
        try:
            return self.lookup(rel)
        except FileNotFoundError:
            pass
        parts = rel.split(b"/")
        fd = self.root_fd
        for i, part in enumerate(parts):
            sub = b"/".join(parts[: i + 1])
            try:
                fd = self.lookup(sub)
                continue
            except FileNotFoundError:
                pass
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                raise NotADirectoryError(
                    errno.ENOTDIR, "exists but is not a directory", os.fsdecode(sub)
                ) from None
            os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
            os.chmod(part, 0o755, dir_fd=fd, follow_symlinks=False)
            fd = self.lookup(sub)
        return fd


def remove(tree: Tree | None, dirfd: int, name: bytes, st: os.stat_result | None = None) -> None:
    """
    Remove C{name} from the directory open as C{dirfd}, recursively if it
    is a directory, never following symlinks.
    """
    if st is None:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(os.fsdecode(name), dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)
    if tree is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        tree.forget()


def split_name(name: bytes) -> list[bytes]:
    """
    The components of a tar name relative to the root: a leading C{/},
    C{.} components and a trailing C{/} are dropped and C{..} applied;
    L{ValueError} if it climbs above the root or holds a NUL.
    """
    if b"\0" in name:
        raise ValueError("the name holds a NUL byte")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        clean: list[bytes] = []
        for p in parts:
            if p != b"..":
                clean.append(p)
            elif clean:
                clean.pop()
            else:
                raise ValueError("the name leads outside the layer")
        parts = clean
    return parts


def lgetxattr(path: str | bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise

