"""
Producing layer tars as moby does: C{TarWithOptions} with the overlay
whiteout format for an overlay upper directory (L{export_overlay}) and
C{ExportChanges} for a full tree (L{export_changes}), each file added as
moby's C{tarAppender} adds it.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import BinaryIO, Iterator

from twisted.logger import Logger

from txgraph.archive.changes import sorted_changes
from txgraph.archive.fs import Tree, proc_path, split_name
from txgraph.archive.tarformat import (
    BLK,
    CAPABILITY,
    CHR,
    DIR,
    FIFO,
    IDENTITY,
    LINK,
    NS,
    OPAQUE_XATTR,
    REG,
    SYMLINK,
    WH_OPAQUE,
    WH_PREFIX,
)
from txgraph.archive.writer import OwnerNames, TarWriter, tar_header
from txgraph.errors import ArchiveError
from txgraph.model import Change, ChangeKind, IDMap

log = Logger()

_NOT_EXPORTED = ("security.selinux",)


def _export_xattrs(target: int | bytes) -> tuple[dict[bytes, bytes], bool]:
    """
    The attributes to put in the tar, and whether the directory is opaque.
    """
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}, False
        raise
    xattrs: dict[bytes, bytes] = {}
    opaque = False
    for key in names:
        if key.startswith("trusted.overlay.") or key in _NOT_EXPORTED:
            if key == OPAQUE_XATTR:
                opaque = _xattr_value(target, key) == b"y"
            continue
        value = _xattr_value(target, key)
        if value is None:
            continue
        if key == CAPABILITY and len(value) > 3 and value[3] == 3:
            # VFS_CAP_REVISION_3 names a namespace root that means nothing
            # outside this host: store revision 2, as moby does.
            value = value[:3] + b"\x02" + value[4:20]
        xattrs[os.fsencode(key)] = value
    return xattrs, opaque


def _xattr_value(target: int | bytes, key: str) -> bytes | None:
    try:
        if isinstance(target, int):
            return os.getxattr(target, key)
        return os.getxattr(target, key, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise


class _Exporter:
    """
    Adds files to a tar the way moby's C{tarAppender} does.
    """

    def __init__(self, out: BinaryIO, ids: IDMap, overlay: bool) -> None:
        self.writer = TarWriter(out)
        self.ids = ids
        self.overlay = overlay
        self.seen: dict[int, bytes] = {}
        self.names = OwnerNames()

    def container_ids(self, st: os.stat_result, tarname: bytes) -> tuple[int, int]:
        """
        The file's owner in the container.
        """
        if self.ids.identity:
            return st.st_uid, st.st_gid
        try:
            return self.ids.to_container(st.st_uid, st.st_gid)
        except ArchiveError as e:
            raise ArchiveError(f"{os.fsdecode(tarname)!r}: {e}") from None

    def add(self, dirfd: int, name: bytes, tarname: bytes, st: os.stat_result) -> None:
        """
        Add the file C{name} of the directory open as C{dirfd}, whose
        C{lstat} is C{st}, as C{tarname}.  Files that vanish are left out.
        """
        mode = st.st_mode
        fmt = stat.S_IFMT(mode)
        uname, gname = self.names.of(st)
        if self.overlay and fmt == stat.S_IFCHR and st.st_rdev == 0:
            directory, _, base = tarname.rpartition(b"/")
            wh = (directory + b"/" if directory else b"") + WH_PREFIX + base
            # Whiteouts keep the owner the kernel gave them: no remapping.
            self.writer.write(
                tar_header(
                    wh, 0o600, st.st_uid, st.st_gid, 0, st.st_mtime_ns // NS, REG,
                    uname=uname, gname=gname,
                )
            )
            return
        if fmt == stat.S_IFSOCK:
            log.info("socket {name} left out of the layer tar", name=os.fsdecode(tarname))
            return
        header_mode = stat.S_IMODE(mode) | fmt
        mtime = st.st_mtime_ns // NS
        linkname = b""
        devmajor = devminor = 0
        size = 0
        fd: int | None = None
        xattr_target: int | bytes = proc_path(dirfd, name)
        if fmt == stat.S_IFDIR:
            typeflag = DIR
            tarname += b"/"
        elif fmt == stat.S_IFLNK:
            typeflag = SYMLINK
            linkname = os.readlink(name, dir_fd=dirfd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            typeflag = CHR if fmt == stat.S_IFCHR else BLK
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif fmt == stat.S_IFIFO:
            typeflag = FIFO
        else:
            typeflag = REG
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            first = self.seen.get(st.st_ino)
            if first is not None:
                # Attributes too, as moby does: whoever applies this may
                # chown the inode again, which drops its capabilities.
                uid, gid = self.container_ids(st, tarname)
                xattrs, _ = _export_xattrs(xattr_target)
                self.writer.write(
                    tar_header(
                        tarname, header_mode, uid, gid, 0, mtime, LINK, first,
                        devmajor, devminor, xattrs, uname=uname, gname=gname,
                    )
                )
                return
        if typeflag == REG:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dirfd)
            fst = os.fstat(fd)
            if fst.st_ino != st.st_ino or not stat.S_ISREG(fst.st_mode):
                os.close(fd)
                return
            size = fst.st_size
            xattr_target = fd
        try:
            if fmt != stat.S_IFDIR and st.st_nlink > 1:
                self.seen[st.st_ino] = tarname
            xattrs, opaque = _export_xattrs(xattr_target)
            uid, gid = self.container_ids(st, tarname)
            self.writer.write(
                tar_header(
                    tarname,
                    header_mode,
                    uid,
                    gid,
                    size,
                    mtime,
                    typeflag,
                    linkname,
                    devmajor,
                    devminor,
                    xattrs,
                    uname=uname, gname=gname,
                )
            )
            if fd is not None:
                self.writer.content(fd, size)
            if opaque and self.overlay:
                marker = tarname + WH_OPAQUE
                self.writer.write(
                    tar_header(
                        marker, stat.S_IMODE(mode) & 0o777, uid, gid, 0, 0, REG,
                        uname=uname, gname=gname,
                    )
                )
        finally:
            if fd is not None:
                os.close(fd)

    def whiteout(self, tarname: bytes) -> None:
        """
        The AUFS whiteout entry for a deleted path (moby's ExportChanges).
        """
        directory, _, base = tarname.rpartition(b"/")
        wh = (directory + b"/" if directory else b"") + WH_PREFIX + base
        self.writer.write(tar_header(wh, 0, 0, 0, 0, round(time.time()), REG))


def export_overlay(upper: str, out: BinaryIO, id_map: IDMap | None = None) -> None:
    """
    Write the tar of an overlay upper directory to C{out}, as moby's
    C{TarWithOptions} with the overlay whiteout format does: files in
    C{filepath.Walk} order (lexical, a directory before its content),
    0:0 character devices as C{.wh.NAME} entries, opaque directories
    followed by a C{.wh..wh..opq} entry, owners shifted back to container
    ids by C{id_map}, a link entry for each further name of a hard-linked
    file.
    """
    exporter = _Exporter(out, id_map if id_map is not None else IDENTITY, overlay=True)
    root = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, bytes, Iterator[bytes]]] = [(root, b"", iter(_sorted_names(root)))]
    try:
        while stack:
            dirfd, rel_dir, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(dirfd)
                stack.pop()
                continue
            rel = rel_dir + b"/" + name if rel_dir else name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                exporter.add(dirfd, name, rel, st)
                if stat.S_ISDIR(st.st_mode):
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    child = os.open(name, flags, dir_fd=dirfd)
                    try:
                        listing = _sorted_names(child)
                    except BaseException:
                        os.close(child)
                        raise
                    stack.append((child, rel, iter(listing)))
            except (FileNotFoundError, NotADirectoryError) as e:
                log.debug("{name} vanished during export: {error}", name=os.fsdecode(rel), error=e)
        exporter.writer.close()
    finally:
        for dirfd, _, _ in stack:
            os.close(dirfd)


def _sorted_names(dirfd: int) -> list[bytes]:
    return sorted(os.fsencode(n) for n in os.listdir(dirfd))


def export_changes(
    root: str, changes: list[Change], out: BinaryIO, id_map: IDMap | None = None
) -> None:
    """
    Write moby's C{ExportChanges} tar to C{out}: for each change, sorted
    by path, the file as it is under C{root}, or a C{.wh.NAME} entry for a
    deletion.  Files that vanish meanwhile are left out, as moby does.
    """
    exporter = _Exporter(out, id_map if id_map is not None else IDENTITY, overlay=False)
    tree = Tree(root)
    try:
        for change in sorted_changes(changes):
            tree.release()
            try:
                parts = split_name(os.fsencode(change.path))
            except ValueError as e:
                raise ArchiveError(f"change {change.path!r}: {e}") from None
            if not parts:
                raise ArchiveError("a change cannot name the root")
            tarname = b"/".join(parts)
            if change.kind == ChangeKind.DELETE:
                exporter.whiteout(tarname)
                continue
            try:
                dirfd = tree.lookup(b"/".join(parts[:-1]))
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                exporter.add(dirfd, parts[-1], tarname, st)
            except (FileNotFoundError, NotADirectoryError) as e:
                log.debug("{path} vanished during export: {error}", path=change.path, error=e)
        exporter.writer.close()
    finally:
        tree.close()

