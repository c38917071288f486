"""
Reading layer tars: a streaming parser (ustar, GNU and PAX headers, GNU
long names, GNU and PAX sparse files) over a stream read in large chunks,
in bounded memory, and the writing of an entry's data into a file with its
all-zero blocks left as holes.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

from txgraph.archive.tarformat import BLK, BLOCK, CHR, DIR, HEADER, NS, READ_SIZE, REG, TYPES
from txgraph.errors import ArchiveError

_ZERO_BLOCK = bytes(BLOCK)
_HOLE = 4096
_ZERO_HOLE = bytes(_HOLE)
_MAX_META = 1 << 20


class Truncated(Exception):
    """
    The stream ended inside a tar record.
    """


class Input:
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
        chunk = self._stream.read(READ_SIZE)
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
        them, L{Truncated} if it ended after.
        """
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if self._pos == len(self._buf):
                    return None
                raise Truncated()
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
                    raise Truncated()
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
            self._eof = not self._stream.read(READ_SIZE)


@dataclass(slots=True)
class Entry:
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
    ns = int(seconds or b"0") * NS + (int(fraction[:9].ljust(9, b"0")) if fraction else 0)
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


class TarReader:
    """
    A streaming tar parser: ustar, GNU and PAX headers, GNU long names,
    GNU and PAX sparse files.  Data left unread by the caller is skipped.
    """

    def __init__(self, inp: Input) -> None:
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
            raise Truncated()
        self.inp.skip(-size % BLOCK)
        return data

    def next(self) -> Entry | None:
        """
        The next entry, or None at the end of the archive.
        """
        try:
            return self._next()
        except Truncated:
            raise ArchiveError(
                f"layer tar: the stream ends inside a record at byte {self.inp.consumed}"
            ) from None
        except (ValueError, UnicodeDecodeError, OverflowError) as e:
            raise ArchiveError(
                f"layer tar: malformed header before byte {self.inp.consumed}: {e}"
            ) from None

    def _next(self) -> Entry | None:
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
            block = inp.take(BLOCK)
            if block is None:
                if pax or longname is not None or longlink is not None:
                    raise Truncated()
                self.tar_bytes = at
                return None
            if block == _ZERO_BLOCK:
                following = inp.take(BLOCK)
                if following is None or following == _ZERO_BLOCK:
                    self.tar_bytes = inp.consumed
                    return None
                raise ArchiveError(f"layer tar: data follows an end-of-archive block at byte {at}")
            fields = HEADER.unpack_from(block)
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
    ) -> Entry:
        flag = fields[7]
        magic = fields[9]
        if longname is not None:
            name = longname
        else:
            name = fields[0].split(b"\0", 1)[0]
            if magic == b"ustar\x0000" and fields[14][0]:
                name = fields[14].split(b"\0", 1)[0] + b"/" + name
        kind = TYPES.get(flag)
        if kind is None:
            raise ArchiveError(
                f"layer tar entry {os.fsdecode(name)!r}: unsupported entry type {flag!r}"
            )
        if flag == b"\0" and name.endswith(b"/"):
            kind = DIR
        atime_ns: int | None = None
        if magic == b"ustar  \0" and block[345]:
            atime_ns = _num(block[345:357]) * NS
        entry = Entry(
            name,
            kind,
            _num(fields[1]) & 0o7777,
            _num(fields[2]),
            _num(fields[3]),
            size,
            _num(fields[5]) * NS,
            0,
            longlink if longlink is not None else fields[8].split(b"\0", 1)[0],
        )
        if kind is CHR or kind is BLK:
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
        self._pad = -entry.size % BLOCK
        if entry.sparse is not None and pax.get(b"GNU.sparse.major") == b"1":
            entry.sparse = self._sparse_map_1_0(entry)
        if entry.sparse is not None:
            self._check_sparse(entry)
        self.entries += 1
        # moby's UnpackLayer sums Go's hdr.Size: a sparse file's logical
        # size (Go's reader sets it from the real size), not its data's.
        self.content_bytes += entry.realsize if entry.sparse is not None else entry.size
        return entry

    def _apply_pax(
        self, entry: Entry, pax: dict[bytes, bytes], sparse00: list[int], atime_ns: int | None
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
        # Go's order: the 0.x size record first, then 1.0's real size.
        realsize = pax.get(b"GNU.sparse.size", pax.get(b"GNU.sparse.realsize"))
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
            entry.kind = REG
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
            self._count_meta(BLOCK, name)
            ext = self.inp.take(BLOCK)
            if ext is None:
                raise Truncated()
            collect(ext[:504], 21)
            extended = ext[504] != 0
        return _sparse_pairs(numbers), _num(block[483:495])

    def _sparse_map_1_0(self, entry: Entry) -> list[tuple[int, int]]:
        numbers: list[int] = []
        needed: int | None = None
        text = b""
        used = 0
        while needed is None or len(numbers) < needed:
            if used >= entry.size or used >= _MAX_META:
                raise ValueError("malformed sparse map")
            block = self.inp.take(BLOCK)
            if block is None:
                raise Truncated()
            used += BLOCK
            lines = (text + block).split(b"\n")
            text = lines.pop()
            for line in lines:
                numbers.append(int(line))
                if needed is None:
                    needed = 1 + 2 * numbers[0]
        entry.size -= used
        self._left = entry.size
        return _sparse_pairs(numbers[1:needed])

    def _check_sparse(self, entry: Entry) -> None:
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

    def copy_to(self, fd: int, entry: Entry) -> None:
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

