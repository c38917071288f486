"""
Applying a layer tar to a directory with moby's semantics (C{Untar} with
the overlay whiteout converter for an overlay upper directory,
C{UnpackLayer} for a full tree): entries replace what is there, AUFS
whiteouts become overlay whiteouts or delete, owners are shifted by the
layer's ID map.

Errors: a malformed tar, or one that tries to reach outside its layer,
raises L{ArchiveError} naming the entry.  Failures of the host rather than
of the tar (C{ENOSPC}, C{EDQUOT}, C{EIO}, C{EROFS}, C{ENOMEM}, running out
of file descriptors, a kernel without C{openat2}) propagate as L{OSError}
for the backend to report.
"""

from __future__ import annotations

import enum
import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

from twisted.logger import Logger

from txgraph.archive.fs import Tree, proc_path, remove, split_name
from txgraph.archive.reader import Entry, Input, TarReader, Truncated
from txgraph.archive.tarformat import (
    BLK,
    CHR,
    DIR,
    FIFO,
    IDENTITY,
    LINK,
    OPAQUE_XATTR,
    REG,
    SYMLINK,
    WH_LINKDIR,
    WH_META,
    WH_OPAQUE,
    WH_PREFIX,
)
from txgraph.errors import ArchiveError
from txgraph.model import IDMap

log = Logger()


class ApplyMode(enum.Enum):
    """
    Where a layer tar is applied.

    @cvar OVERLAY: to an empty overlay upper directory; AUFS whiteouts
        become overlay whiteouts (0:0 character devices and the
        C{trusted.overlay.opaque} attribute).
    @cvar INPLACE: to a full tree that already holds the parent's content;
        whiteouts delete from it.
    """

    OVERLAY = "overlay"
    INPLACE = "inplace"


@dataclass(frozen=True)
class ApplyStats:
    """
    What L{apply_layer} read.  C{content_bytes} is the size a backend that
    answers ApplyDiff as moby's naive-diff drivers do returns (see
    L{txgraph.archive.changes} for the sizes of trees).

    @ivar entries: tar entries applied or skipped (headers of real files,
        not PAX or GNU extension records).
    @ivar tar_bytes: bytes of the tar up to its end-of-archive marker.
    @ivar content_bytes: the sum of the entries' sizes as Go's tar reader
        gives them (a sparse file's logical size; links, directories and
        whiteouts their header's size, 0 as Go writes them; extension
        records nothing): what moby's C{UnpackLayer} returns.
    """

    entries: int
    tar_bytes: int
    content_bytes: int


_OVERLAY_XATTRS = b"trusted.overlay."
_FILE_TYPE_BITS = {
    REG: stat.S_IFREG,
    LINK: stat.S_IFREG,
    SYMLINK: stat.S_IFLNK,
    CHR: stat.S_IFCHR,
    BLK: stat.S_IFBLK,
    DIR: stat.S_IFDIR,
    FIFO: stat.S_IFIFO,
}


# Failures of the host, not of the tar: they propagate as OSError.
_HOST_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOSYS,
    }
)


# What setxattr says of an attribute too large for the filesystem (ext4
# without ea_inode: ENOSPC; others E2BIG or ERANGE): an error of the tar.
_XATTR_TOO_BIG = frozenset({errno.ENOSPC, errno.E2BIG, errno.ERANGE})


class _Applier:
    """
    Applies entries one by one to a root, with moby's replacement and
    whiteout rules for the given mode.
    """

    def __init__(
        self, root: str, mode: ApplyMode, ids: IDMap, scratch_dir: str | None = None
    ) -> None:
        self.tree = Tree(root)
        self._scratch_dir = scratch_dir
        self.mode = mode
        self.ids = ids
        self._identity = ids.identity
        self._owner: tuple[int, int] | None = None
        self.dirs: list[tuple[bytes, int, int]] = []
        self.unpacked: set[bytes] | None = set() if mode is ApplyMode.INPLACE else None
        self._plnk_dir: str | None = None
        self._plnk: dict[bytes, Entry] = {}

    def close(self) -> None:
        self.tree.close()
        if self._plnk_dir is not None:
            shutil.rmtree(self._plnk_dir, ignore_errors=True)

    def owner(self) -> tuple[int, int]:
        """
        The host ids of the container's root, for directories the tar
        implies but omits.
        """
        if self._owner is None:
            self._owner = self.ids.to_host(0, 0)
        return self._owner

    def host_ids(self, e: Entry) -> tuple[int, int]:
        """
        The entry's owner on the host.
        """
        if self._identity:
            return e.uid, e.gid
        return self.ids.to_host(e.uid, e.gid)

    def apply(self, e: Entry, reader: TarReader) -> None:
        """
        Apply one entry, its data read from C{reader}.
        """
        self.tree.release()
        try:
            parts = split_name(e.name)
        except ValueError as err:
            raise ArchiveError(f"layer tar entry {e.display!r}: {err}") from None
        if parts and parts[0].startswith(WH_META) and parts != [WH_OPAQUE]:
            # AUFS metadata at the top (.wh..wh.plnk, .wh..wh.aufs, ...):
            # only hard link targets in .wh..wh.plnk are kept, aside.
            if parts[0] == WH_LINKDIR and len(parts) == 2 and e.kind == REG:
                self._save_plnk(parts[1], e, reader)
            return
        if not parts:
            self._root_entry(e)
            return
        base = parts[-1]
        if base.startswith(WH_PREFIX):
            self._whiteout(parts, e)
            return
        rel = b"/".join(parts)
        kind = e.kind
        parent = self.tree.ensure(b"/".join(parts[:-1]), self.owner())
        if kind == REG:
            self._regular(parent, base, e, reader)
        elif kind == DIR:
            self._directory(parent, base, rel, e)
        elif kind == SYMLINK:
            self._symlink(parent, base, e)
        elif kind == LINK:
            self._hardlink(parts, e)
        else:
            self._node(parent, base, e)
        if self.unpacked is not None:
            self.unpacked.add(rel)

    def _create_file(self, parent: int, name: bytes) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, 0o600, dir_fd=parent)
        except FileExistsError:
            remove(self.tree, parent, name)
            return os.open(name, flags, 0o600, dir_fd=parent)

    def _regular(self, parent: int, name: bytes, e: Entry, reader: TarReader) -> None:
        fd = self._create_file(parent, name)
        try:
            reader.copy_to(fd, e)
            self._fd_metadata(fd, e)
        finally:
            os.close(fd)

    def _fd_metadata(self, fd: int, e: Entry) -> None:
        os.fchown(fd, *self.host_ids(e))
        if e.xattrs:
            self._set_xattrs(fd, e)
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.atime_ns, e.mtime_ns))

    def _metadata(self, parent: int, name: bytes, e: Entry, *, chmod: bool, times: bool) -> None:
        # chown first: it clears setuid/setgid and file capabilities.
        os.chown(name, *self.host_ids(e), dir_fd=parent, follow_symlinks=False)
        if e.xattrs:
            self._set_xattrs(proc_path(parent, name), e)
        if chmod:
            os.chmod(name, e.mode, dir_fd=parent, follow_symlinks=False)
        if times:
            os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, target: int | bytes, e: Entry) -> None:
        assert e.xattrs is not None
        for key, value in e.xattrs.items():
            if key.startswith(_OVERLAY_XATTRS):
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                if err.errno in _XATTR_TOO_BIG:
                    # A property of the tar (an attribute larger than this
                    # filesystem stores), not a failure of the host.
                    raise ArchiveError(
                        f"layer tar entry {e.display!r}: extended attribute "
                        f"{os.fsdecode(key)} ({len(value)} bytes) cannot be stored "
                        f"on this filesystem: {err.strerror or err}"
                    ) from None
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.warn(
                    "layer tar entry {name!r}: attribute {key} ignored: {error}",
                    name=e.display,
                    key=os.fsdecode(key),
                    error=err.strerror,
                )

    def _directory(self, parent: int, name: bytes, rel: bytes, e: Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                remove(self.tree, parent, name, st)
                os.mkdir(name, 0o700, dir_fd=parent)
        self._metadata(parent, name, e, chmod=True, times=False)
        self.dirs.append((rel, e.atime_ns, e.mtime_ns))

    def _root_entry(self, e: Entry) -> None:
        if e.kind != DIR:
            raise ArchiveError(f"layer tar entry {e.display!r}: the root can only be a directory")
        # moby's Untar (overlay) skips the root; UnpackLayer (full trees)
        # applies its metadata.
        if self.mode is ApplyMode.INPLACE:
            self._metadata(self.tree.root_fd, b".", e, chmod=True, times=False)
            self.dirs.append((b"", e.atime_ns, e.mtime_ns))

    def _symlink(self, parent: int, name: bytes, e: Entry) -> None:
        try:
            os.symlink(e.linkname, name, dir_fd=parent)
        except FileExistsError:
            remove(self.tree, parent, name)
            os.symlink(e.linkname, name, dir_fd=parent)
        self._metadata(parent, name, e, chmod=False, times=True)

    def _node(self, parent: int, name: bytes, e: Entry) -> None:
        fmt = _FILE_TYPE_BITS[e.kind]
        device = os.makedev(e.devmajor, e.devminor) if e.kind in (CHR, BLK) else 0
        try:
            os.mknod(name, fmt | 0o600, device, dir_fd=parent)
        except FileExistsError:
            remove(self.tree, parent, name)
            os.mknod(name, fmt | 0o600, device, dir_fd=parent)
        self._metadata(parent, name, e, chmod=True, times=True)

    def _hardlink(self, parts: list[bytes], e: Entry) -> None:
        try:
            target = split_name(e.linkname)
        except ValueError as err:
            raise ArchiveError(
                f"layer tar entry {e.display!r}: "
                f"hard link target {os.fsdecode(e.linkname)!r}: {err}"
            ) from None
        if not target:
            raise ArchiveError(f"layer tar entry {e.display!r}: hard link to the root")
        name = parts[-1]
        if target[0] == WH_LINKDIR:
            self._plnk_link(self.tree.lookup(b"/".join(parts[:-1])), name, target, e)
            return
        target_dir = b"/".join(target[:-1])
        missing = ArchiveError(
            f"layer tar entry {e.display!r}: hard link target "
            f"{os.fsdecode(e.linkname)!r} is not in the layer"
        )
        parent = self.tree.lookup(b"/".join(parts[:-1]))
        for attempt in (1, 2):
            try:
                tparent = self.tree.lookup(target_dir)
                os.link(
                    target[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False
                )
                break
            except (FileNotFoundError, NotADirectoryError):
                raise missing from None
            except FileExistsError:
                if attempt == 2:
                    raise
                remove(self.tree, parent, name)
        # moby re-applies the header's metadata to the shared inode; a
        # chown, even to the same owner, drops file capabilities and
        # setuid, so it and chmod are only done when something differs.
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        is_link = stat.S_ISLNK(st.st_mode)
        if (st.st_uid, st.st_gid) != self.host_ids(e):
            os.chown(name, *self.host_ids(e), dir_fd=parent, follow_symlinks=False)
        if e.xattrs:
            self._set_xattrs(proc_path(parent, name), e)
        if not is_link:
            if stat.S_IMODE(st.st_mode) != e.mode or (st.st_uid, st.st_gid) != self.host_ids(e):
                os.chmod(name, e.mode, dir_fd=parent, follow_symlinks=False)
            os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _save_plnk(self, base: bytes, e: Entry, reader: TarReader) -> None:
        if self._plnk_dir is None:
            # In the backend's scratch directory when given (on the layer's
            # own filesystem, bounded by it), else in the default temporary
            # directory.
            self._plnk_dir = tempfile.mkdtemp(prefix="txgraph-plnk-", dir=self._scratch_dir)
        path = os.path.join(os.fsencode(self._plnk_dir), base)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            reader.copy_to(fd, e)
        finally:
            os.close(fd)
        self._plnk[base] = e

    def _plnk_link(self, parent: int, name: bytes, target: list[bytes], e: Entry) -> None:
        # AUFS kept hard links to files of lower branches in .wh..wh.plnk;
        # moby extracts each link as a copy of the file kept there.
        source = self._plnk.get(target[1]) if len(target) == 2 else None
        if source is None or self._plnk_dir is None:
            raise ArchiveError(f"layer tar entry {e.display!r}: invalid AUFS hard link")
        src = os.open(
            os.path.join(os.fsencode(self._plnk_dir), target[1]), os.O_RDONLY | os.O_CLOEXEC
        )
        try:
            fd = self._create_file(parent, name)
            try:
                size = os.fstat(src).st_size
                copied = 0
                while copied < size:
                    n = os.sendfile(fd, src, copied, size - copied)
                    if n == 0:
                        break
                    copied += n
                self._fd_metadata(fd, source)
            finally:
                os.close(fd)
        finally:
            os.close(src)

    def _whiteout(self, parts: list[bytes], e: Entry) -> None:
        base = parts[-1]
        dir_rel = b"/".join(parts[:-1])
        if base == WH_OPAQUE:
            dirfd = self.tree.ensure(dir_rel, self.owner())
            if self.mode is ApplyMode.OVERLAY:
                os.setxattr(b"/proc/self/fd/%d" % dirfd, OPAQUE_XATTR, b"y")
            else:
                self._opaque(dir_rel, dirfd)
            return
        if base.startswith(WH_META):
            return
        original = base[len(WH_PREFIX) :]
        if original in (b"", b".", b".."):
            raise ArchiveError(f"layer tar entry {e.display!r}: the whiteout names no file")
        if self.mode is ApplyMode.OVERLAY:
            uid, gid = self.host_ids(e)
            parent = self.tree.ensure(dir_rel, self.owner())
            try:
                os.mknod(original, stat.S_IFCHR, 0, dir_fd=parent)
            except FileExistsError:
                remove(self.tree, parent, original)
                os.mknod(original, stat.S_IFCHR, 0, dir_fd=parent)
            os.chown(original, uid, gid, dir_fd=parent, follow_symlinks=False)
            # moby leaves the time of creation; the header's makes a
            # re-export of the layer reproducible.
            os.utime(original, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)
            return
        try:
            parent = self.tree.ensure(dir_rel, self.owner())
            st = os.stat(original, dir_fd=parent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        remove(self.tree, parent, original, st)

    def _opaque(self, dir_rel: bytes, dirfd: int) -> None:
        """
        Remove everything below C{dir_rel} that this layer did not create,
        as moby's C{UnpackLayer} does for C{.wh..wh..opq}.
        """
        assert self.unpacked is not None
        removed = False
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        stack = [(dir_rel, os.open(b".", flags, dir_fd=dirfd))]
        try:
            while stack:
                rel, fd = stack.pop()
                try:
                    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
                        child = rel + b"/" + name if rel else name
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if child not in self.unpacked:
                            remove(None, fd, name, st)
                            removed = True
                        elif stat.S_ISDIR(st.st_mode):
                            stack.append((child, os.open(name, flags, dir_fd=fd)))
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
            if removed:
                self.tree.forget()

    def finish(self) -> None:
        """
        Set directory times last, so that creating their children does
        not change them.
        """
        for rel, atime_ns, mtime_ns in self.dirs:
            parts = rel.split(b"/") if rel else []
            try:
                if parts:
                    parent = self.tree.lookup(b"/".join(parts[:-1]))
                    name = parts[-1]
                else:
                    parent, name = self.tree.root_fd, b"."
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue


def apply_layer(
    stream: BinaryIO,
    root: str,
    mode: ApplyMode,
    id_map: IDMap | None = None,
    scratch_dir: str | None = None,
) -> ApplyStats:
    """
    Apply a layer tar, read from C{stream} in bounded memory, to C{root}.

    Reads the tar to its end-of-archive marker, then drains the stream to
    its end (dockerd's client may send more).  Entries of every type keep
    their numeric owners (shifted to host ids by C{id_map}), modes
    including setuid, setgid and sticky, extended attributes, and times;
    all-zero blocks become holes.  An existing entry is replaced unless
    both it and the new one are directories.  AUFS whiteouts are
    converted (L{ApplyMode.OVERLAY}) or applied (L{ApplyMode.INPLACE}).

    @param stream: anything with C{read(n) -> bytes} that returns C{b""}
        at its end.
    @param root: the directory to extract into.
    @param scratch_dir: where to keep the files of AUFS's C{.wh..wh.plnk}
        while the layer is applied (a private directory is made in it and
        removed); None for the default temporary directory (C{/tmp}).
        Backends pass a directory on the layer's own filesystem, so that
        those files count against it rather than against C{/tmp}.
    @raise ArchiveError: the tar is malformed or reaches outside C{root};
        the message names the entry.
    @raise OSError: the host failed (no space, I/O error...).
    """
    ids = id_map if id_map is not None else IDENTITY
    inp = Input(stream)
    reader = TarReader(inp)
    applier = _Applier(root, mode, ids, scratch_dir)
    try:
        while True:
            entry = reader.next()
            if entry is None:
                break
            try:
                applier.apply(entry, reader)
            except Truncated:
                raise ArchiveError(
                    f"layer tar entry {entry.display!r}: the stream ends inside its data"
                ) from None
            except OSError as err:
                if err.errno in _HOST_ERRNOS:
                    raise
                raise ArchiveError(
                    f"layer tar entry {entry.display!r}: {err.strerror or err}"
                ) from err
            except (ValueError, OverflowError) as err:
                raise ArchiveError(f"layer tar entry {entry.display!r}: {err}") from None
            except ArchiveError as err:
                if err.message.startswith("layer tar"):
                    raise
                raise ArchiveError(f"layer tar entry {entry.display!r}: {err}") from None
        applier.finish()
    finally:
        applier.close()
    inp.drain()
    return ApplyStats(reader.entries, reader.tar_bytes, reader.content_bytes)

