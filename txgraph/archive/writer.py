"""
Writing tars byte for byte as Go's C{archive/tar} writes moby's: the header
blocks of an entry (ustar, or PAX records and a ustar header), the stream
writer that gathers small writes into large ones, and the owner names a
header carries, from the host's user and group databases.
"""

from __future__ import annotations

import grp
import os
import pwd
import zlib
from typing import BinaryIO, Callable, Mapping

from txgraph.archive.tarformat import BLOCK, HEADER, READ_SIZE

_WRITE_SIZE = 1 << 20


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
    block = HEADER.pack(
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


def tar_header(
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
        + bytes(-len(records) % BLOCK)
        + header
    )


class TarWriter:
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
            data = os.read(fd, min(left, READ_SIZE))
            if not data:
                break
            left -= len(data)
            if len(data) >= _WRITE_SIZE:
                self.flush()
                self._out.write(data)
            else:
                self.write(data)
        padding = left + (-size % BLOCK)
        while padding > 0:
            n = min(padding, READ_SIZE)
            self.write(bytes(n))
            padding -= n

    def close(self) -> None:
        """
        Write the end-of-archive marker (two zero blocks) and flush.
        """
        self.write(bytes(2 * BLOCK))
        self.flush()


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

