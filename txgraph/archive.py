"""
Layer tars in and out: the one place where txgraph applies a Docker layer
tar to a directory and produces one from a directory.

Every backend shares this code, so that a layer has the same content, the
same Changes and the same sizes whether it lives in an overlay upper
directory or as a full tree on an RBD block device.  The semantics are
moby's (C{pkg/archive}: C{Untar} with the overlay whiteout converter,
C{UnpackLayer}, C{TarWithOptions}, C{ExportChanges}, C{ChangesDirs},
C{ChangesSize}, and C{pkg/directory.Size}), because dockerd computes layer
digests, C{docker diff} output and sizes from what we return.  Tar headers
are written byte for byte as Go's C{archive/tar} writes moby's (owner
names from the host's user and group databases included), so that the same
content gets the same layer digest as on moby's own overlay2.

Everything here is blocking and runs in worker threads, never in the
reactor.

Safety: txgraph runs as root and applies tars from anywhere.  Containment
is enforced by the kernel, not by string checks: every parent directory is
opened with C{openat2(2)} and C{RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS}
relative to the root, so a symlink in the tree (even to C{/} or
C{../../..}) resolves as if the root were C{/}, exactly as in moby's
C{chroot}-ed extraction; the last component is then created or changed
with C{*at} calls relative to that directory without following symlinks.
Names whose normalised form climbs above the root are rejected outright.

Sizes (the rule callers follow for DiffSize and ApplyDiff, which must agree):

  - an overlay layer's size is C{directory_size(upper)};
  - a full tree's size is C{changes_size(root, changes_dirs(root,
    parent_root))}.

ApplyDiff returns that same number, computed after L{apply_layer}, or by
L{apply_layer} itself with C{track_changes}: a tar applied in place onto a
copy of its parent can only change the paths it names, so the stat of each
of them before it was first touched (the parent's) and after the apply give
the same changes as comparing the whole trees, without a view of the
parent.  Where that is not known for certain (a path first touched below a
directory this layer removed, or reached through a symlink), it says so and
the caller compares the trees.

Errors: a malformed tar, or one that tries to reach outside its layer,
raises L{ArchiveError} naming the entry.  Failures of the host rather than
of the tar (C{ENOSPC}, C{EDQUOT}, C{EIO}, C{EROFS}, C{ENOMEM}, running out
of file descriptors, a kernel without C{openat2}) propagate as L{OSError}
for the backend to report.

Deliberate differences from moby, all for safety or robustness: symlinks are
created whatever their target (moby refuses targets that lexically leave the
root; C{RESOLVE_IN_ROOT} makes them harmless); C{trusted.overlay.*}
attributes, overlayfs's private namespace, are never taken from a tar nor
put into one; export carries every extended attribute except those and
C{security.selinux} (moby carries only C{security.capability}, so a file
with C{user.*} attributes gives a different digest than moby's); sparse
files are extracted sparse (moby writes every zero); a whiteout
naming C{""}, C{"."} or C{".."} is an error (moby would delete the
directory itself); a name with C{".."} climbing above the root is an error
even when it starts with C{"/"}; a hard link entry re-applies owner and
mode to the shared inode only when they differ (a C{chown} drops its file
capabilities); overlay whiteouts get the time of their C{.wh.} entry, so
that exporting a layer again gives the same tar.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import grp
import os
import pwd
import shutil
import stat
import struct
import tempfile
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

from twisted.logger import Logger

from txgraph.errors import ArchiveError
from txgraph.model import Change, ChangeKind, IDMap

log = Logger()

__all__ = [
    "ApplyMode",
    "ApplyStats",
    "apply_layer",
    "changes_dirs",
    "changes_size",
    "directory_size",
    "export_changes",
    "export_overlay",
]


_IDENTITY = IDMap()


# -- public value types ---------------------------------------------------------


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
    What L{apply_layer} read, for logs and metrics.  Not the layer's size:
    see the module docstring for that.

    @ivar entries: tar entries applied or skipped (headers of real files,
        not PAX or GNU extension records).
    @ivar tar_bytes: bytes of the tar up to its end-of-archive marker.
    @ivar content_bytes: the sum of the entries' sizes, as moby's
        C{UnpackLayer} counts them.
    @ivar changes_size: see L{apply_layer}'s C{track_changes}.
    """

    entries: int
    tar_bytes: int
    content_bytes: int
    #: with C{track_changes}: C{changes_size} of the tree against the tree
    #: it was applied to, or None if only comparing the trees can tell
    changes_size: int | None = None


# -- constants --------------------------------------------------------------------

_WH_PREFIX = b".wh."
_WH_META = b".wh..wh."
_WH_OPAQUE = b".wh..wh..opq"
_WH_LINKDIR = b".wh..wh.plnk"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTRS = b"trusted.overlay."
_CAPABILITY = "security.capability"
_NOT_EXPORTED = ("security.selinux",)

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_SIZE = 1 << 20
_WRITE_SIZE = 1 << 20
_HOLE = 4096
_ZERO_HOLE = bytes(_HOLE)
_MAX_META = 1 << 20
# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic and
# version, uname, gname, devmajor, devminor, prefix (or GNU atime...).
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_NS = 1_000_000_000

_REG, _LINK, _SYMLINK, _CHR, _BLK, _DIR, _FIFO = (b"0", b"1", b"2", b"3", b"4", b"5", b"6")
_TYPES = {
    b"0": _REG,
    b"\0": _REG,
    b"7": _REG,
    b"S": _REG,
    b"1": _LINK,
    b"2": _SYMLINK,
    b"3": _CHR,
    b"4": _BLK,
    b"5": _DIR,
    b"6": _FIFO,
}
_FILE_TYPE_BITS = {
    _REG: stat.S_IFREG,
    _LINK: stat.S_IFREG,
    _SYMLINK: stat.S_IFLNK,
    _CHR: stat.S_IFCHR,
    _BLK: stat.S_IFBLK,
    _DIR: stat.S_IFDIR,
    _FIFO: stat.S_IFIFO,
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

# -- kernel-confined path resolution -------------------------------------------

_SYS_OPENAT2 = 437  # the same number on every architecture but alpha
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _openat2(
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


def _proc_path(dirfd: int, name: bytes) -> bytes:
    """
    A path naming C{name} in the directory open as C{dirfd}, for the calls
    that have no C{*at} form (the xattr calls).
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


class _Tree:
    """
    A root directory, held open, and a bounded cache of O_PATH descriptors
    of directories below it, each found by C{openat2} inside the root.
    """

    def __init__(self, root: str, cache_size: int = 64) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        self._retired: list[int] = []
        #: how many times the cache was dropped (a directory or symlink
        #: was removed)
        self.generation = 0
        try:
            os.close(_openat2(self.root_fd, b".", _DIR_FLAGS))
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
        self.generation += 1
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
        fd = _openat2(self.root_fd, rel, _DIR_FLAGS)
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


def _remove(tree: _Tree | None, dirfd: int, name: bytes, st: os.stat_result | None = None) -> None:
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


def _split_name(name: bytes) -> list[bytes]:
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


# -- reading tars ---------------------------------------------------------------


class _Truncated(Exception):
    """
    The stream ended inside a tar record.
    """


class _Input:
    """
    The layer stream, read in large chunks; file data is handed out as
    slices of those chunks, without copying.
    """

    __slots__ = ("_stream", "_buf", "_pos", "consumed", "_eof")

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self.consumed = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._stream.read(_READ_SIZE)
        if not chunk:
            self._eof = True
            return False
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + chunk
        else:
            self._buf = chunk
        self._pos = 0
        return True

    def take(self, n: int) -> bytes | None:
        """
        The next C{n} bytes; None if the stream ended before the first of
        them, L{_Truncated} if it ended after.
        """
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if self._pos == len(self._buf):
                    return None
                raise _Truncated()
        p = self._pos
        self._pos = p + n
        self.consumed += n
        return self._buf[p : p + n]

    def pieces(self, n: int) -> Iterator[tuple[bytes, int, int]]:
        """
        The next C{n} bytes as C{(buffer, start, end)} slices.
        """
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                if not self._fill():
                    raise _Truncated()
                continue
            k = avail if avail < n else n
            start = self._pos
            yield self._buf, start, start + k
            self._pos = start + k
            self.consumed += k
            n -= k

    def skip(self, n: int) -> None:
        """
        Discard the next C{n} bytes.
        """
        if len(self._buf) - self._pos >= n:
            self._pos += n
            self.consumed += n
            return
        for _ in self.pieces(n):
            pass

    def drain(self) -> None:
        """
        Read and discard the stream to its end.
        """
        self._buf = b""
        self._pos = 0
        while not self._eof:
            self._eof = not self._stream.read(_READ_SIZE)


@dataclass(slots=True)
class _Entry:
    """
    One tar entry, its extension records applied.
    """

    name: bytes
    kind: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] | None = None
    sparse: list[tuple[int, int]] | None = None
    realsize: int = 0

    @property
    def display(self) -> str:
        return os.fsdecode(self.name)


def _num(field: bytes) -> int:
    """
    A numeric header field: octal text, or GNU base-256.
    """
    try:
        return int(field.strip(b" \0"), 8)
    except ValueError:
        return _num_slow(field)


def _num_slow(field: bytes) -> int:
    if field and field[0] & 0x80:
        n = 0
        for b in field[1:]:
            n = (n << 8) | b
        if field[0] == 0xFF:
            n -= 256 ** (len(field) - 1)
        return n
    s = field.strip(b" \0")
    if b"\0" in s:
        s = s.split(b"\0", 1)[0].rstrip(b" ")
    if not s:
        return 0
    if not s.isdigit():
        raise ValueError(f"invalid numeric field {field!r}")
    return int(s, 8)


def _pax_time(value: bytes) -> int:
    """
    A PAX time (decimal seconds, optionally with a fraction) in nanoseconds.
    """
    negative = value.startswith(b"-")
    seconds, _, fraction = (value[1:] if negative else value).partition(b".")
    if not (seconds or fraction) or not (seconds + fraction).isdigit():
        raise ValueError(f"invalid PAX time {value!r}")
    ns = int(seconds or b"0") * _NS + (int(fraction[:9].ljust(9, b"0")) if fraction else 0)
    return -ns if negative else ns


def _checksum_ok(block: bytes, field: bytes) -> bool:
    stored = _num(field)
    # Adler-32's first half is 1 + the byte sum modulo 65521, exact for
    # 256 bytes (at most 65280): two C calls instead of a Python sum.
    view = memoryview(block)
    unsigned = (
        (zlib.adler32(view[:256]) & 0xFFFF)
        + (zlib.adler32(view[256:]) & 0xFFFF)
        - 2
        - sum(field)
        + 8 * 32
    )
    if stored == unsigned:
        return True
    high = sum(1 for b in block[:148] + block[156:] if b & 0x80)
    return stored == unsigned - 256 * high


def _parse_pax(data: bytes, into: dict[bytes, bytes], sparse00: list[int]) -> None:
    pos = 0
    end = len(data)
    while pos < end:
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            if not data[pos:].strip(b"\0"):
                return
            raise ValueError("malformed PAX record")
        length = int(data[pos:space])
        if length <= space - pos + 1 or pos + length > end or data[pos + length - 1] != 0x0A:
            raise ValueError("malformed PAX record")
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise ValueError("malformed PAX record")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            sparse00.append(int(value))
        elif value:
            into[key] = value
        else:
            into.pop(key, None)
        pos += length


def _sparse_pairs(numbers: Sequence[int]) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise ValueError("odd number of values in a sparse map")
    return [(numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2)]


class _TarReader:
    """
    A streaming tar parser: ustar, GNU and PAX headers, GNU long names,
    GNU and PAX sparse files.  Data left unread by the caller is skipped.
    """

    def __init__(self, inp: _Input) -> None:
        self.inp = inp
        self._left = 0
        self._pad = 0
        self.entries = 0
        self.content_bytes = 0
        self.tar_bytes = 0
        # The metadata read so far for the next entry (PAX records, global
        # ones included, GNU long names, old-GNU sparse extension blocks),
        # and the offset of its first header: limited to _MAX_META in all.
        self._meta_used = 0
        self._meta_at = 0

    def _count_meta(self, size: int, name: bytes | None) -> None:
        self._meta_used += size
        if self._meta_used > _MAX_META:
            whose = (
                f"entry {os.fsdecode(name)!r}"
                if name is not None
                else f"entry whose header starts at byte {self._meta_at}"
            )
            raise ArchiveError(
                f"layer tar {whose}: more than {_MAX_META} bytes of metadata "
                "(PAX records, GNU long names, sparse maps)"
            )

    def _meta(self, size: int, what: str, name: bytes | None) -> bytes:
        if size > _MAX_META:
            raise ArchiveError(f"layer tar: {what} record of {size} bytes is too large")
        self._count_meta(size, name)
        data = self.inp.take(size)
        if data is None:
            raise _Truncated()
        self.inp.skip(-size % _BLOCK)
        return data

    def next(self) -> _Entry | None:
        """
        The next entry, or None at the end of the archive.
        """
        try:
            return self._next()
        except _Truncated:
            raise ArchiveError(
                f"layer tar: the stream ends inside a record at byte {self.inp.consumed}"
            ) from None
        except (ValueError, UnicodeDecodeError, OverflowError) as e:
            raise ArchiveError(
                f"layer tar: malformed header before byte {self.inp.consumed}: {e}"
            ) from None

    def _next(self) -> _Entry | None:
        inp = self.inp
        if self._left or self._pad:
            inp.skip(self._left + self._pad)
            self._left = self._pad = 0
        pax: dict[bytes, bytes] = {}
        sparse00: list[int] = []
        longname: bytes | None = None
        longlink: bytes | None = None
        self._meta_used = 0
        self._meta_at = inp.consumed
        while True:
            at = inp.consumed
            block = inp.take(_BLOCK)
            if block is None:
                if pax or longname is not None or longlink is not None:
                    raise _Truncated()
                self.tar_bytes = at
                return None
            if block == _ZERO_BLOCK:
                following = inp.take(_BLOCK)
                if following is None or following == _ZERO_BLOCK:
                    self.tar_bytes = inp.consumed
                    return None
                raise ArchiveError(f"layer tar: data follows an end-of-archive block at byte {at}")
            fields = _HEADER.unpack_from(block)
            if not _checksum_ok(block, fields[6]):
                raise ArchiveError(f"layer tar: invalid header checksum at byte {at}")
            flag = fields[7]
            size = _num(fields[4])
            if size < 0:
                raise ValueError("negative size")
            # The entry's name, if a record before its header gave it.
            known = pax.get(b"path", longname)
            if flag == b"x":
                _parse_pax(self._meta(size, "PAX", known), pax, sparse00)
            elif flag == b"g":
                self._meta(size, "PAX global", known)
            elif flag == b"L":
                longname = self._meta(size, "GNU long name", known).split(b"\0", 1)[0]
            elif flag == b"K":
                longlink = self._meta(size, "GNU long link", known).split(b"\0", 1)[0]
            else:
                return self._entry(block, fields, size, pax, sparse00, longname, longlink)

    def _entry(
        self,
        block: bytes,
        fields: tuple[bytes, ...],
        size: int,
        pax: dict[bytes, bytes],
        sparse00: list[int],
        longname: bytes | None,
        longlink: bytes | None,
    ) -> _Entry:
        flag = fields[7]
        magic = fields[9]
        if longname is not None:
            name = longname
        else:
            name = fields[0].split(b"\0", 1)[0]
            if magic == b"ustar\x0000" and fields[14][0]:
                name = fields[14].split(b"\0", 1)[0] + b"/" + name
        kind = _TYPES.get(flag)
        if kind is None:
            raise ArchiveError(
                f"layer tar entry {os.fsdecode(name)!r}: unsupported entry type {flag!r}"
            )
        if flag == b"\0" and name.endswith(b"/"):
            kind = _DIR
        atime_ns: int | None = None
        if magic == b"ustar  \0" and block[345]:
            atime_ns = _num(block[345:357]) * _NS
        entry = _Entry(
            name,
            kind,
            _num(fields[1]) & 0o7777,
            _num(fields[2]),
            _num(fields[3]),
            size,
            _num(fields[5]) * _NS,
            0,
            longlink if longlink is not None else fields[8].split(b"\0", 1)[0],
        )
        if kind is _CHR or kind is _BLK:
            entry.devmajor = _num(fields[12])
            entry.devminor = _num(fields[13])
        if flag == b"S":
            entry.sparse, entry.realsize = self._old_gnu_sparse(block, pax.get(b"path", name))
        if pax or sparse00:
            atime_ns = self._apply_pax(entry, pax, sparse00, atime_ns)
        if entry.uid < 0 or entry.gid < 0:
            raise ValueError("negative owner")
        # moby: the access time is never before the modification time.
        if atime_ns is None or atime_ns < entry.mtime_ns:
            atime_ns = entry.mtime_ns
        entry.atime_ns = atime_ns
        self._left = entry.size
        self._pad = -entry.size % _BLOCK
        if entry.sparse is not None and pax.get(b"GNU.sparse.major") == b"1":
            entry.sparse = self._sparse_map_1_0(entry)
        if entry.sparse is not None:
            self._check_sparse(entry)
        self.entries += 1
        self.content_bytes += entry.size
        return entry

    def _apply_pax(
        self, entry: _Entry, pax: dict[bytes, bytes], sparse00: list[int], atime_ns: int | None
    ) -> int | None:
        for key, value in pax.items():
            if key == b"path":
                entry.name = value
            elif key == b"linkpath":
                entry.linkname = value
            elif key == b"size":
                entry.size = int(value)
            elif key == b"uid":
                entry.uid = int(value)
            elif key == b"gid":
                entry.gid = int(value)
            elif key == b"mtime":
                entry.mtime_ns = _pax_time(value)
            elif key == b"atime":
                atime_ns = _pax_time(value)
            elif key.startswith(b"SCHILY.xattr."):
                if entry.xattrs is None:
                    entry.xattrs = {}
                entry.xattrs[key[13:]] = value
        if entry.size < 0:
            raise ValueError("negative size")
        if b"GNU.sparse.name" in pax:
            entry.name = pax[b"GNU.sparse.name"]
        realsize = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
        if pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            entry.sparse = []
        elif b"GNU.sparse.map" in pax:
            entry.sparse = _sparse_pairs([int(v) for v in pax[b"GNU.sparse.map"].split(b",")])
        elif sparse00:
            entry.sparse = _sparse_pairs(sparse00)
        if entry.sparse is not None:
            if realsize is None:
                raise ValueError("sparse file without a real size")
            entry.realsize = int(realsize)
            entry.kind = _REG
        return atime_ns

    def _old_gnu_sparse(self, block: bytes, name: bytes) -> tuple[list[tuple[int, int]], int]:
        numbers: list[int] = []

        def collect(area: bytes, count: int) -> None:
            for i in range(count):
                field = area[i * 24 : i * 24 + 24]
                if field[0] == 0:
                    return
                numbers.extend((_num(field[:12]), _num(field[12:])))

        collect(block[386:482], 4)
        extended = block[482] != 0
        while extended:
            self._count_meta(_BLOCK, name)
            ext = self.inp.take(_BLOCK)
            if ext is None:
                raise _Truncated()
            collect(ext[:504], 21)
            extended = ext[504] != 0
        return _sparse_pairs(numbers), _num(block[483:495])

    def _sparse_map_1_0(self, entry: _Entry) -> list[tuple[int, int]]:
        numbers: list[int] = []
        needed: int | None = None
        text = b""
        used = 0
        while needed is None or len(numbers) < needed:
            if used >= entry.size or used >= _MAX_META:
                raise ValueError("malformed sparse map")
            block = self.inp.take(_BLOCK)
            if block is None:
                raise _Truncated()
            used += _BLOCK
            lines = (text + block).split(b"\n")
            text = lines.pop()
            for line in lines:
                numbers.append(int(line))
                if needed is None:
                    needed = 1 + 2 * numbers[0]
        entry.size -= used
        self._left = entry.size
        return _sparse_pairs(numbers[1:needed])

    def _check_sparse(self, entry: _Entry) -> None:
        assert entry.sparse is not None
        end = 0
        total = 0
        for offset, length in entry.sparse:
            if offset < end or length < 0:
                raise ValueError("sparse map out of order")
            end = offset + length
            total += length
        if end > entry.realsize or total != entry.size:
            raise ValueError("sparse map does not match the entry's size")

    def copy_to(self, fd: int, entry: _Entry) -> None:
        """
        Write the entry's content into C{fd}, all-zero blocks as holes.
        """
        holes = False
        if entry.sparse is None:
            holes = self._copy(fd, entry.size, 0)
            final = entry.size
        else:
            for offset, length in entry.sparse:
                self._copy(fd, length, offset)
            holes = True
            final = entry.realsize
        if holes:
            os.ftruncate(fd, final)

    def _copy(self, fd: int, n: int, offset: int) -> bool:
        inp = self.inp
        start = inp._pos
        self._left -= n
        if len(inp._buf) - start >= n:
            inp._pos = start + n
            inp.consumed += n
            return _write_sparse(fd, inp._buf, start, start + n, offset)
        # The data spans several reads: the bytes after the last block
        # boundary of each piece are carried into the next, so that zero
        # blocks straddling two reads still become holes.
        holes = False
        carry = b""
        for buf, start, end in inp.pieces(n):
            if carry:
                fill = min(_HOLE - len(carry), end - start)
                carry += buf[start : start + fill]
                start += fill
                if len(carry) < _HOLE:
                    continue
                holes |= _write_sparse(fd, carry, 0, _HOLE, offset)
                offset += _HOLE
                carry = b""
            cut = max(start, end - (offset + end - start) % _HOLE)
            holes |= _write_sparse(fd, buf, start, cut, offset)
            offset += cut - start
            carry = buf[cut:end]
        if carry:
            holes |= _write_sparse(fd, carry, 0, len(carry), offset)
        return holes


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _write_sparse(fd: int, buf: bytes, start: int, end: int, offset: int) -> bool:
    """
    Write C{buf[start:end]} at C{offset} in C{fd}, leaving every all-zero
    block aligned in the file as a hole; whether any hole was left.
    """
    view = memoryview(buf)
    pos = start + (-offset % _HOLE)
    if pos + _HOLE > end:
        _write_at(fd, view[start:end], offset)
        return False
    # startswith is a memcmp that stops at the first non-zero byte, so
    # testing each aligned block costs little on ordinary data.
    is_zero = buf.startswith
    holes = False
    done = start
    while pos + _HOLE <= end:
        if not is_zero(_ZERO_HOLE, pos):
            pos += _HOLE
            continue
        stop = pos + _HOLE
        while stop + _HOLE <= end and is_zero(_ZERO_HOLE, stop):
            stop += _HOLE
        if pos > done:
            _write_at(fd, view[done:pos], offset + done - start)
        holes = True
        done = stop
        pos = stop + _HOLE
    if done < end:
        _write_at(fd, view[done:end], offset + done - start)
    return holes


# -- applying tars --------------------------------------------------------------


class _ChangeTracker:
    """
    What each path a layer touches was before it first did (the parent's
    file, since the layer is applied onto a copy of its parent), to tell
    at the end which of them changed as L{changes_dirs} would.

    Only the paths the tar names can differ from the parent: an entry's
    own path, a hard link's target (the link re-applies owner, mode and
    times to the inode), and what whiteouts and opaque directories remove.
    A path first touched below a directory the layer already removed or
    replaced had a parent state nobody can see any more, and a path
    reached through a symlink is not where changes_dirs looks: either makes
    the result unknown (None), and the caller compares the trees.
    """

    def __init__(self, tree: _Tree) -> None:
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
                fd = _openat2(
                    self._tree.root_fd, parent or b".", _DIR_FLAGS,
                    _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS,
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
        return st, _lgetxattr(_proc_path(held[1], name), _CAPABILITY) or b""

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
        sizes = _ChangedSizes()
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
                    and not _stat_different(old, new)
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


class _Applier:
    """
    Applies entries one by one to a root, with moby's replacement and
    whiteout rules for the given mode.
    """

    def __init__(
        self, root: str, mode: ApplyMode, ids: IDMap, scratch_dir: str | None = None
    ) -> None:
        self.tree = _Tree(root)
        self._scratch_dir = scratch_dir
        self.mode = mode
        self.ids = ids
        self._identity = ids.identity
        self._owner: tuple[int, int] | None = None
        self.dirs: list[tuple[bytes, int, int]] = []
        self.unpacked: set[bytes] | None = set() if mode is ApplyMode.INPLACE else None
        self._plnk_dir: str | None = None
        self._plnk: dict[bytes, _Entry] = {}
        self.changes: _ChangeTracker | None = None

    def track_changes(self) -> None:
        """
        Record what each path was before this layer first touched it (see
        L{apply_layer}'s C{track_changes}); in place only.
        """
        assert self.mode is ApplyMode.INPLACE
        self.changes = _ChangeTracker(self.tree)

    def close(self) -> None:
        if self.changes is not None:
            self.changes.close()
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

    def host_ids(self, e: _Entry) -> tuple[int, int]:
        """
        The entry's owner on the host.
        """
        if self._identity:
            return e.uid, e.gid
        return self.ids.to_host(e.uid, e.gid)

    def apply(self, e: _Entry, reader: _TarReader) -> None:
        """
        Apply one entry, its data read from C{reader}.
        """
        self.tree.release()
        try:
            parts = _split_name(e.name)
        except ValueError as err:
            raise ArchiveError(f"layer tar entry {e.display!r}: {err}") from None
        if parts and parts[0].startswith(_WH_META) and parts != [_WH_OPAQUE]:
            # AUFS metadata at the top (.wh..wh.plnk, .wh..wh.aufs, ...):
            # only hard link targets in .wh..wh.plnk are kept, aside.
            if parts[0] == _WH_LINKDIR and len(parts) == 2 and e.kind == _REG:
                self._save_plnk(parts[1], e, reader)
            return
        if not parts:
            self._root_entry(e)
            return
        base = parts[-1]
        if base.startswith(_WH_PREFIX):
            self._whiteout(parts, e)
            return
        rel = b"/".join(parts)
        kind = e.kind
        if self.changes is not None:
            self.changes.touch(rel, replaced=kind != _DIR)
        parent = self.tree.ensure(b"/".join(parts[:-1]), self.owner())
        if kind == _REG:
            self._regular(parent, base, e, reader)
        elif kind == _DIR:
            self._directory(parent, base, rel, e)
        elif kind == _SYMLINK:
            self._symlink(parent, base, e)
        elif kind == _LINK:
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
            _remove(self.tree, parent, name)
            return os.open(name, flags, 0o600, dir_fd=parent)

    def _regular(self, parent: int, name: bytes, e: _Entry, reader: _TarReader) -> None:
        fd = self._create_file(parent, name)
        try:
            reader.copy_to(fd, e)
            self._fd_metadata(fd, e)
        finally:
            os.close(fd)

    def _fd_metadata(self, fd: int, e: _Entry) -> None:
        os.fchown(fd, *self.host_ids(e))
        if e.xattrs:
            self._set_xattrs(fd, e)
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.atime_ns, e.mtime_ns))

    def _metadata(self, parent: int, name: bytes, e: _Entry, *, chmod: bool, times: bool) -> None:
        # chown first: it clears setuid/setgid and file capabilities.
        os.chown(name, *self.host_ids(e), dir_fd=parent, follow_symlinks=False)
        if e.xattrs:
            self._set_xattrs(_proc_path(parent, name), e)
        if chmod:
            os.chmod(name, e.mode, dir_fd=parent, follow_symlinks=False)
        if times:
            os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, target: int | bytes, e: _Entry) -> None:
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

    def _directory(self, parent: int, name: bytes, rel: bytes, e: _Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                _remove(self.tree, parent, name, st)
                os.mkdir(name, 0o700, dir_fd=parent)
        self._metadata(parent, name, e, chmod=True, times=False)
        self.dirs.append((rel, e.atime_ns, e.mtime_ns))

    def _root_entry(self, e: _Entry) -> None:
        if e.kind != _DIR:
            raise ArchiveError(f"layer tar entry {e.display!r}: the root can only be a directory")
        # moby's Untar (overlay) skips the root; UnpackLayer (full trees)
        # applies its metadata.
        if self.mode is ApplyMode.INPLACE:
            self._metadata(self.tree.root_fd, b".", e, chmod=True, times=False)
            self.dirs.append((b"", e.atime_ns, e.mtime_ns))

    def _symlink(self, parent: int, name: bytes, e: _Entry) -> None:
        try:
            os.symlink(e.linkname, name, dir_fd=parent)
        except FileExistsError:
            _remove(self.tree, parent, name)
            os.symlink(e.linkname, name, dir_fd=parent)
        self._metadata(parent, name, e, chmod=False, times=True)

    def _node(self, parent: int, name: bytes, e: _Entry) -> None:
        fmt = _FILE_TYPE_BITS[e.kind]
        device = os.makedev(e.devmajor, e.devminor) if e.kind in (_CHR, _BLK) else 0
        try:
            os.mknod(name, fmt | 0o600, device, dir_fd=parent)
        except FileExistsError:
            _remove(self.tree, parent, name)
            os.mknod(name, fmt | 0o600, device, dir_fd=parent)
        self._metadata(parent, name, e, chmod=True, times=True)

    def _hardlink(self, parts: list[bytes], e: _Entry) -> None:
        try:
            target = _split_name(e.linkname)
        except ValueError as err:
            raise ArchiveError(
                f"layer tar entry {e.display!r}: "
                f"hard link target {os.fsdecode(e.linkname)!r}: {err}"
            ) from None
        if not target:
            raise ArchiveError(f"layer tar entry {e.display!r}: hard link to the root")
        name = parts[-1]
        if target[0] == _WH_LINKDIR:
            self._plnk_link(self.tree.lookup(b"/".join(parts[:-1])), name, target, e)
            return
        if self.changes is not None:
            # The link changes the target's inode (owner, mode, times).
            self.changes.touch(b"/".join(target), replaced=False)
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
                _remove(self.tree, parent, name)
        # moby re-applies the header's metadata to the shared inode; a
        # chown, even to the same owner, drops file capabilities and
        # setuid, so it and chmod are only done when something differs.
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        is_link = stat.S_ISLNK(st.st_mode)
        if (st.st_uid, st.st_gid) != self.host_ids(e):
            os.chown(name, *self.host_ids(e), dir_fd=parent, follow_symlinks=False)
        if e.xattrs:
            self._set_xattrs(_proc_path(parent, name), e)
        if not is_link:
            if stat.S_IMODE(st.st_mode) != e.mode or (st.st_uid, st.st_gid) != self.host_ids(e):
                os.chmod(name, e.mode, dir_fd=parent, follow_symlinks=False)
            os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _save_plnk(self, base: bytes, e: _Entry, reader: _TarReader) -> None:
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

    def _plnk_link(self, parent: int, name: bytes, target: list[bytes], e: _Entry) -> None:
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

    def _whiteout(self, parts: list[bytes], e: _Entry) -> None:
        base = parts[-1]
        dir_rel = b"/".join(parts[:-1])
        if base == _WH_OPAQUE:
            dirfd = self.tree.ensure(dir_rel, self.owner())
            if self.mode is ApplyMode.OVERLAY:
                os.setxattr(b"/proc/self/fd/%d" % dirfd, _OPAQUE_XATTR, b"y")
            else:
                self._opaque(dir_rel, dirfd)
            return
        if base.startswith(_WH_META):
            return
        original = base[len(_WH_PREFIX) :]
        if original in (b"", b".", b".."):
            raise ArchiveError(f"layer tar entry {e.display!r}: the whiteout names no file")
        if self.mode is ApplyMode.OVERLAY:
            uid, gid = self.host_ids(e)
            parent = self.tree.ensure(dir_rel, self.owner())
            try:
                os.mknod(original, stat.S_IFCHR, 0, dir_fd=parent)
            except FileExistsError:
                _remove(self.tree, parent, original)
                os.mknod(original, stat.S_IFCHR, 0, dir_fd=parent)
            os.chown(original, uid, gid, dir_fd=parent, follow_symlinks=False)
            # moby leaves the time of creation; the header's makes a
            # re-export of the layer reproducible.
            os.utime(original, ns=(e.atime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)
            return
        if self.changes is not None:
            self.changes.touch(dir_rel + b"/" + original if dir_rel else original, replaced=True)
        try:
            parent = self.tree.ensure(dir_rel, self.owner())
            st = os.stat(original, dir_fd=parent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        _remove(self.tree, parent, original, st)

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
                            if self.changes is not None:
                                self.changes.touch(child, replaced=True)
                            _remove(None, fd, name, st)
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
    track_changes: bool = False,
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
    @param track_changes: (L{ApplyMode.INPLACE} onto a copy of the tree
        the layer applies to) return in L{ApplyStats.changes_size} what
        C{changes_size(root, changes_dirs(root, parent))} would, or None
        where that takes comparing the trees.
    @raise ArchiveError: the tar is malformed or reaches outside C{root};
        the message names the entry.
    @raise OSError: the host failed (no space, I/O error...).
    """
    ids = id_map if id_map is not None else _IDENTITY
    inp = _Input(stream)
    reader = _TarReader(inp)
    applier = _Applier(root, mode, ids, scratch_dir)
    if track_changes:
        applier.track_changes()
    changes_size = None
    try:
        while True:
            entry = reader.next()
            if entry is None:
                break
            try:
                applier.apply(entry, reader)
            except _Truncated:
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
        if applier.changes is not None:
            changes_size = applier.changes.size()
    finally:
        applier.close()
    inp.drain()
    return ApplyStats(reader.entries, reader.tar_bytes, reader.content_bytes, changes_size)


# -- sizes ------------------------------------------------------------------------


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
    root = os.open(path, _WALK_FLAGS)
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
        return _openat2(
            root, rel or b".", _WALK_FLAGS, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS
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
    sizes = _ChangedSizes()
    root_fd = os.open(root, _WALK_FLAGS)
    try:
        for change in changes:
            if change.kind == ChangeKind.DELETE:
                continue
            rel = os.fsencode(change.path.lstrip("/"))
            parent, _, name = rel.rpartition(b"/")
            try:
                fd = _openat2(
                    root_fd, parent or b".", _DIR_FLAGS, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS
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
            sizes.add(st)
    finally:
        os.close(root_fd)
    return sizes.total


class _ChangedSizes:
    """
    moby's C{ChangesSize} sum: the sizes of changed non-directories, a
    file with several links counted once.
    """

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def add(self, st: os.stat_result) -> None:
        if st.st_nlink > 1:
            if st.st_ino in self._seen:
                return
            self._seen.add(st.st_ino)
        self.total += st.st_size


# -- changes ----------------------------------------------------------------------


def _same_fs_time(a: int, b: int) -> bool:
    # tar keeps whole seconds: equal, or the same second with either side
    # having no fraction (moby's sameFsTime).
    return a == b or (a // _NS == b // _NS and (a % _NS == 0 or b % _NS == 0))


def _sorted_changes(changes: list[Change]) -> list[Change]:
    return sorted(changes, key=lambda c: os.fsencode(c.path))


def _lgetxattr(path: str | bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise


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
    top1 = os.open(old_dir, _WALK_FLAGS) if stat.S_ISDIR(old_st.st_mode) else None
    try:
        top2 = os.open(new_dir, _WALK_FLAGS) if stat.S_ISDIR(new_st.st_mode) else None
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
    capability = _lgetxattr(_proc_path(dirfd, os.fsencode(name)), _CAPABILITY)
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
    return _sorted_changes(changes)


# -- writing tars -----------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    # GNU base-256, for device numbers too large for octal.
    return b"\x80" + value.to_bytes(width - 1, "big")


def _to_ascii(value: bytes) -> bytes:
    """
    Go's C{toASCII}: what a PAX writer puts in a header field whose real
    value is in a PAX record (non-ASCII bytes and NULs dropped).
    """
    if value.isascii():
        return value
    return bytes(c for c in value if 0 < c < 0x80)


def _fit(value: bytes, size: int) -> bytes:
    """
    Go's C{formatString}: C{value} cut to the field; a cut that leaves the
    field ending in slashes ends at the first of them instead.
    """
    if len(value) > size and value[size - 1 : size] == b"/":
        return value[: size - 1].rstrip(b"/")
    return value[:size]


def _ustar_split(name: bytes) -> tuple[bytes, bytes] | None:
    """
    C{(prefix, name)} fields for a ustar header whose name does not fit the
    name field, or None if it cannot be split (Go's C{splitUSTARPath}).
    """
    length = len(name)
    if length <= 100 or not name.isascii():
        return None
    if length > 156:
        length = 156
    elif name[length - 1 : length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    suffix = len(name) - i - 1
    if i <= 0 or suffix > 100 or suffix == 0 or i > 155:
        return None
    return name[:i], name[i + 1 :]


def _ustar_block(
    name: bytes,
    prefix: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    uname: bytes = b"",
    gname: bytes = b"",
    devices: bool = True,
) -> bytes:
    block = _HEADER.pack(
        _fit(name, 100),
        _octal(mode, 8),
        _octal(uid, 8),
        _octal(gid, 8),
        _octal(size, 12),
        _octal(mtime, 12),
        b" " * 8,
        typeflag,
        _fit(linkname, 100),
        b"ustar\x0000",
        uname,
        gname,
        _octal(devmajor, 8) if devices else b"",
        _octal(devminor, 8) if devices else b"",
        prefix,
    )
    view = memoryview(block)
    checksum = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
    return block[:148] + b"%06o\0 " % checksum + block[156:]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    size = len(body) + len(str(len(body)))
    if len(str(size)) > len(str(len(body))):
        size += 1
    return b"%d" % size + body


def _pax_header_name(name: bytes) -> bytes:
    """
    The name of an entry's PAX extended header, as Go writes it:
    C{path.Join(dir, "PaxHeaders.0", file)}, ASCII, one field, no
    trailing slash.
    """
    directory, _, base = name.rpartition(b"/")
    parts = [p for p in (directory, b"PaxHeaders.0", base) if p]
    return _to_ascii(b"/".join(parts))[:100].rstrip(b"/")


def _tar_header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: Mapping[bytes, bytes] | None = None,
    uname: bytes = b"",
    gname: bytes = b"",
) -> bytes:
    """
    The header blocks of one entry, byte for byte as Go's C{archive/tar}
    writes moby's headers (C{Format: FormatPAX}, whole-second times, no
    access or change time): a ustar header when it can say everything
    (a long name split into prefix and name), else a PAX extended header
    (records sorted by key) followed by a header whose fields hold what
    fits of the values (ASCII only, no prefix).
    """
    pax: dict[bytes, bytes] = {}
    ustar = True
    if len(name) > 100 or not name.isascii():
        pax[b"path"] = name
        ustar = _ustar_split(name) is not None
    for key, text, limit in (
        (b"linkpath", linkname, 100),
        (b"uname", uname, 32),
        (b"gname", gname, 32),
    ):
        if len(text) > limit or not text.isascii():
            pax[key] = text
            ustar = False
    for key, value, limit in (
        (b"uid", uid, 0o7777777),
        (b"gid", gid, 0o7777777),
        (b"size", size, 0o77777777777),
        (b"mtime", mtime, 0o77777777777),
    ):
        if not 0 <= value <= limit:
            pax[key] = b"%d" % value
            ustar = False
    if xattrs:
        for attribute, content in xattrs.items():
            pax[b"SCHILY.xattr." + attribute] = content
        ustar = False

    def field(value: int, limit: int) -> int:
        return value if 0 <= value <= limit else 0

    numbers = (
        mode,
        field(uid, 0o7777777),
        field(gid, 0o7777777),
        field(size, 0o77777777777),
        field(mtime, 0o77777777777),
        typeflag,
    )
    if ustar:
        prefix, base = _ustar_split(name) or (b"", name)
        return _ustar_block(
            base, prefix, *numbers, linkname, devmajor, devminor, uname, gname
        )
    records = b"".join(_pax_record(k, v) for k, v in sorted(pax.items()))
    header = _ustar_block(
        _to_ascii(name),
        b"",
        *numbers,
        _to_ascii(linkname),
        devmajor,
        devminor,
        _fit(_to_ascii(uname), 32),
        _fit(_to_ascii(gname), 32),
    )
    return (
        _ustar_block(
            _pax_header_name(name), b"", 0, 0, 0, len(records), 0, b"x", devices=False
        )
        + records
        + bytes(-len(records) % _BLOCK)
        + header
    )


class _TarWriter:
    """
    Streams tar entries to C{out}, gathering small writes into large ones.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._chunks: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= _WRITE_SIZE:
            self.flush()

    def flush(self) -> None:
        if self._chunks:
            self._out.write(b"".join(self._chunks))
            self._chunks = []
            self._size = 0

    def content(self, fd: int, size: int) -> None:
        """
        C{size} bytes of the file open as C{fd} (zeros if it shrank since
        its header was written), padded to a block.
        """
        left = size
        while left > 0:
            data = os.read(fd, min(left, _READ_SIZE))
            if not data:
                break
            left -= len(data)
            if len(data) >= _WRITE_SIZE:
                self.flush()
                self._out.write(data)
            else:
                self.write(data)
        padding = left + (-size % _BLOCK)
        while padding > 0:
            n = min(padding, _READ_SIZE)
            self.write(bytes(n))
            padding -= n

    def close(self) -> None:
        """
        Write the end-of-archive marker (two zero blocks) and flush.
        """
        self.write(bytes(2 * _BLOCK))
        self.flush()


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
            if key == _OPAQUE_XATTR:
                opaque = _xattr_value(target, key) == b"y"
            continue
        value = _xattr_value(target, key)
        if value is None:
            continue
        if key == _CAPABILITY and len(value) > 3 and value[3] == 3:
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


class OwnerNames:
    """
    The user and group names a layer tar gives each file, as moby's does:
    Go's C{tar.FileInfoHeader} names the file's owner on the host (its
    uid and gid on disk, before any user namespace remapping) from the
    host's user and group databases, and leaves a name empty when there is
    none.  Lookups (NSS, possibly remote) are cached for one tar, where
    thousands of files share a few owners; they block, like the rest of
    tar production, in a backend thread.
    """

    def __init__(self) -> None:
        self._users: dict[int, bytes] = {}
        self._groups: dict[int, bytes] = {}

    def user(self, uid: int) -> bytes:
        """
        The name of host user C{uid}, or C{b""}.
        """
        return self._name(self._users, uid, lambda: pwd.getpwuid(uid).pw_name)

    def group(self, gid: int) -> bytes:
        """
        The name of host group C{gid}, or C{b""}.
        """
        return self._name(self._groups, gid, lambda: grp.getgrgid(gid).gr_name)

    @staticmethod
    def _name(cache: dict[int, bytes], number: int, lookup: Callable[[], str]) -> bytes:
        name = cache.get(number)
        if name is None:
            try:
                name = os.fsencode(lookup())
            except (KeyError, OverflowError):
                name = b""
            cache[number] = name
        return name

    def of(self, st: os.stat_result) -> tuple[bytes, bytes]:
        """
        C{(uname, gname)} for a file's header, from its C{lstat}.
        """
        return self.user(st.st_uid), self.group(st.st_gid)


class _Exporter:
    """
    Adds files to a tar the way moby's C{tarAppender} does.
    """

    def __init__(self, out: BinaryIO, ids: IDMap, overlay: bool) -> None:
        self.writer = _TarWriter(out)
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
            wh = (directory + b"/" if directory else b"") + _WH_PREFIX + base
            # Whiteouts keep the owner the kernel gave them: no remapping.
            self.writer.write(
                _tar_header(
                    wh, 0o600, st.st_uid, st.st_gid, 0, st.st_mtime_ns // _NS, _REG,
                    uname=uname, gname=gname,
                )
            )
            return
        if fmt == stat.S_IFSOCK:
            log.info("socket {name} left out of the layer tar", name=os.fsdecode(tarname))
            return
        header_mode = stat.S_IMODE(mode) | fmt
        mtime = st.st_mtime_ns // _NS
        linkname = b""
        devmajor = devminor = 0
        size = 0
        fd: int | None = None
        xattr_target: int | bytes = _proc_path(dirfd, name)
        if fmt == stat.S_IFDIR:
            typeflag = _DIR
            tarname += b"/"
        elif fmt == stat.S_IFLNK:
            typeflag = _SYMLINK
            linkname = os.readlink(name, dir_fd=dirfd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            typeflag = _CHR if fmt == stat.S_IFCHR else _BLK
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif fmt == stat.S_IFIFO:
            typeflag = _FIFO
        else:
            typeflag = _REG
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            first = self.seen.get(st.st_ino)
            if first is not None:
                # Attributes too, as moby does: whoever applies this may
                # chown the inode again, which drops its capabilities.
                uid, gid = self.container_ids(st, tarname)
                xattrs, _ = _export_xattrs(xattr_target)
                self.writer.write(
                    _tar_header(
                        tarname, header_mode, uid, gid, 0, mtime, _LINK, first,
                        devmajor, devminor, xattrs, uname=uname, gname=gname,
                    )
                )
                return
        if typeflag == _REG:
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
                _tar_header(
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
                marker = tarname + _WH_OPAQUE
                self.writer.write(
                    _tar_header(
                        marker, stat.S_IMODE(mode) & 0o777, uid, gid, 0, 0, _REG,
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
        wh = (directory + b"/" if directory else b"") + _WH_PREFIX + base
        self.writer.write(_tar_header(wh, 0, 0, 0, 0, round(time.time()), _REG))


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
    exporter = _Exporter(out, id_map if id_map is not None else _IDENTITY, overlay=True)
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
    exporter = _Exporter(out, id_map if id_map is not None else _IDENTITY, overlay=False)
    tree = _Tree(root)
    try:
        for change in _sorted_changes(changes):
            tree.release()
            try:
                parts = _split_name(os.fsencode(change.path))
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
