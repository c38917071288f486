"""
Tests for L{txgraph.archive}: applying and producing layer tars with
Docker's semantics, computing Changes and sizes as moby does, and never
touching anything outside the layer whatever the tar says.

Tars are crafted here with L{tarfile}; the tests run as root (devices,
ownership, C{trusted.*} attributes).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import os
import shutil
import stat
import struct
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

from txgraph.archive import (
    ApplyMode,
    ApplyStats,
    apply_layer,
    changes_dirs,
    changes_size,
    directory_size,
    export_changes,
    export_overlay,
)
from txgraph.archive.writer import _pax_record, tar_header
from txgraph.errors import ArchiveError, BadRequest
from txgraph.model import Change, ChangeKind, IDMap

M, A, D = ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE

# VFS_CAP_REVISION_2 | effective, cap_net_bind_service permitted.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
T0 = 1_600_000_000

Entry = tuple[tarfile.TarInfo, bytes | None]


# -- helpers ----------------------------------------------------------------------


def entry(
    name: str,
    type: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = T0,
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: dict[str, bytes] | None = None,
    pax: dict[str, str] | None = None,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.linkname = linkname
    info.devmajor, info.devminor = devmajor, devminor
    headers = dict(pax or {})
    for key, value in (xattrs or {}).items():
        headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = headers
    if type == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def make_tar(entries: list[Entry], format: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


class Stream:
    """
    A non-seekable stream handing out at most C{chunk} bytes per read.
    """

    def __init__(self, data: bytes, chunk: int = 1 << 20) -> None:
        self._data = data
        self._pos = 0
        self._chunk = chunk

    def read(self, n: int = -1) -> bytes:
        size = min(n if n >= 0 else len(self._data), self._chunk)
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece

    @property
    def exhausted(self) -> bool:
        return self._pos == len(self._data)


def apply(data: bytes, root: Path, mode: ApplyMode = ApplyMode.OVERLAY, **kw: Any) -> ApplyStats:
    """
    Apply a tar, read in chunks of C{chunk} bytes (default 1 MiB).
    """
    root.mkdir(parents=True, exist_ok=True)
    stream = Stream(data, kw.pop("chunk", 1 << 20))
    return apply_layer(stream, str(root), mode, **kw)  # type: ignore[arg-type]


def export(func: Callable[..., None], *args: Any, **kw: Any) -> bytes:
    out = io.BytesIO()
    func(*args, out, **kw)
    return out.getvalue()


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        return tar.getmembers()


def xattrs_of(path: str) -> dict[str, bytes]:
    return {
        key: os.getxattr(path, key, follow_symlinks=False)
        for key in os.listxattr(path, follow_symlinks=False)
    }


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """
    Everything a layer preserves about each file below C{root}.
    """
    files: dict[str, tuple[Any, ...]] = {}
    by_inode: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                by_inode.setdefault(st.st_ino, []).append(rel)
            files[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_rdev,
                st.st_mtime_ns,
                None if stat.S_ISDIR(st.st_mode) else st.st_size,
                content,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
                xattrs_of(path),
                st.st_ino,
            )
    for rel, info in files.items():
        names = by_inode.get(info[-1])
        files[rel] = info[:-1] + (tuple(sorted(names)) if names else None,)
    return files


def outside_state(outside: Path) -> dict[str, tuple[Any, ...]]:
    """
    The outside sentinel tree, including the link count of each file.
    """
    state = snapshot(outside)
    for rel in state:
        state[rel] = state[rel] + (os.lstat(outside / rel).st_nlink,)
    return state


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """
    A directory outside every layer root, holding a sentinel file.
    """
    out = tmp_path / "outside"
    out.mkdir()
    (out / "sentinel").write_bytes(b"secret")
    (out / "sub").mkdir()
    (out / "sub" / "keep").write_bytes(b"keep")
    return out


def rich_layer() -> list[Entry]:
    """
    A layer with every entry type and attribute a layer can hold.
    """
    sparse = b"head" + bytes(4092) + bytes(8 << 20) + b"tail" + bytes(4092)
    long_dir = "deep/" + "d" * 90 + "/" + "e" * 90
    return [
        entry("d/", tarfile.DIRTYPE, mode=0o1705, uid=1, gid=2, mtime=T0 + 1),
        entry(
            "d/file",
            data=b"hello world\n",
            mode=0o4755,
            uid=1000,
            gid=1001,
            mtime=T0 + 2,
            xattrs={"user.foo": b"bar", "trusted.baz": b"qux\x00\xff", "security.capability": CAPABILITY},
        ),
        entry("d/hard", tarfile.LNKTYPE, linkname="d/file", mode=0o4755, uid=1000, gid=1001, mtime=T0 + 2),
        entry("sgid", data=b"x", mode=0o2711, uid=5, gid=6, mtime=T0 + 3),
        entry("link", tarfile.SYMTYPE, linkname="d/file", uid=7, gid=8, mtime=T0 + 4, xattrs={"trusted.sym": b"1"}),
        entry("abs", tarfile.SYMTYPE, linkname="/etc/passwd", mtime=T0 + 5),
        entry("dev/", tarfile.DIRTYPE, mode=0o755, mtime=T0 + 6),
        entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3, mtime=T0 + 7),
        entry("dev/loop9", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=7, devminor=9, mtime=T0 + 8),
        entry("fifo", tarfile.FIFOTYPE, mode=0o620, uid=3, mtime=T0 + 9),
        entry("sparse", data=sparse, mode=0o600, mtime=T0 + 10),
        entry("deep/", tarfile.DIRTYPE, mtime=T0 + 11),
        entry(long_dir.rsplit("/", 1)[0] + "/", tarfile.DIRTYPE, mtime=T0 + 11),
        entry(long_dir + "/", tarfile.DIRTYPE, mode=0o750, mtime=T0 + 11),
        entry(long_dir + "/file-with-a-long-name-" + "f" * 60, data=b"long", mtime=T0 + 12),
        entry("longlink", tarfile.SYMTYPE, linkname="/" + "l" * 200, mtime=T0 + 13),
        entry("ünïcödé", data=b"utf-8", mtime=T0 + 14),
        entry("empty", data=b"", mode=0o000, mtime=T0 + 15),
    ]


# -- IDMap ------------------------------------------------------------------------


def test_idmap_identity() -> None:
    """None or empty maps are the identity in both directions."""
    for maps in (None, []):
        ids = IDMap.from_docker(maps, maps)
        assert ids.identity
        assert ids.to_host(70000, 5) == (70000, 5)
        assert ids.to_container(70000, 5) == (70000, 5)


def test_idmap_ranges() -> None:
    """Ids map through the range that contains them, and out-of-range ids are errors."""
    ids = IDMap.from_docker(
        [{"container_id": 0, "host_id": 100000, "size": 1000}, {"container_id": 1000, "host_id": 300000, "size": 10}],
        [{"container_id": 0, "host_id": 200000, "size": 65536}],
    )
    assert not ids.identity
    assert ids.to_host(0, 0) == (100000, 200000)
    assert ids.to_host(1005, 7) == (300005, 200007)
    assert ids.to_container(300005, 200007) == (1005, 7)
    with pytest.raises(ArchiveError, match="container uid 1010"):
        ids.to_host(1010, 0)
    with pytest.raises(ArchiveError, match="host gid 5"):
        ids.to_container(100000, 5)


def test_idmap_malformed() -> None:
    """A map missing a key or with a negative or zero value is a bad request."""
    for bad in ([{"container_id": 0, "host_id": 1}], [{"container_id": -1, "host_id": 1, "size": 1}],
                [{"container_id": 0, "host_id": 1, "size": 0}], ["x"]):
        with pytest.raises(BadRequest):
            IDMap.from_docker(bad, None)


# -- apply and export round trip ---------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    """Apply, export and apply elsewhere gives identical trees for every entry type and attribute."""
    first, second = tmp_path / "first", tmp_path / "second"
    stats = apply(make_tar(rich_layer()), first)
    assert stats.entries == len(rich_layer())

    st = os.lstat(first / "d" / "file")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and (st.st_uid, st.st_gid) == (1000, 1001)
    assert os.lstat(first / "d" / "hard").st_ino == st.st_ino and st.st_nlink == 2
    assert xattrs_of(str(first / "d" / "file")) == {
        "user.foo": b"bar", "trusted.baz": b"qux\x00\xff", "security.capability": CAPABILITY
    }
    assert stat.S_IMODE(os.lstat(first / "d").st_mode) == 0o1705
    assert stat.S_IMODE(os.lstat(first / "sgid").st_mode) == 0o2711
    assert os.readlink(first / "link") == "d/file"
    assert os.lstat(first / "link").st_mtime_ns == (T0 + 4) * 10**9
    assert (os.lstat(first / "link").st_uid, os.lstat(first / "link").st_gid) == (7, 8)
    assert xattrs_of(str(first / "link")) == {"trusted.sym": b"1"}
    null = os.lstat(first / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(first / "dev" / "loop9")
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 9)
    assert stat.S_ISFIFO(os.lstat(first / "fifo").st_mode)
    assert os.lstat(first / "d").st_mtime_ns == (T0 + 1) * 10**9
    assert stat.S_IMODE(os.lstat(first / "empty").st_mode) == 0

    tar = export(export_overlay, str(first))
    apply(tar, second)
    assert snapshot(first) == snapshot(second)


def test_sparse_file_stays_sparse(tmp_path: Path) -> None:
    """All-zero blocks are written as holes: same content, few blocks, in both directions."""
    first, second = tmp_path / "first", tmp_path / "second"
    content = b"head" + bytes((8 << 20) + 8188) + b"tail" + bytes(4092)
    apply(make_tar([entry("sparse", data=content)]), first, chunk=100_000)
    for root in (first,):
        assert (root / "sparse").read_bytes() == content
        assert os.lstat(root / "sparse").st_blocks * 512 <= 64 << 10
    apply(export(export_overlay, str(first)), second)
    assert (second / "sparse").read_bytes() == content
    assert os.lstat(second / "sparse").st_blocks * 512 <= 64 << 10


def test_zero_runs_keep_content(tmp_path: Path) -> None:
    """Data mixing zero runs of every length and alignment is written exactly."""
    pieces = []
    for i in range(1, 40):
        pieces.append(os.urandom(i * 131))
        pieces.append(bytes(i * 997))
    content = b"".join(pieces) + bytes(20000)
    apply(make_tar([entry("f", data=content)]), tmp_path / "r", chunk=7000)
    assert (tmp_path / "r" / "f").read_bytes() == content
    assert os.lstat(tmp_path / "r" / "f").st_size == len(content)


def test_pax_sparse_formats(tmp_path: Path) -> None:
    """GNU sparse files in PAX formats 1.0 and 0.1 are extracted as sparse files."""
    size = 1 << 20
    head, tail = b"H" * 4096, b"T" * 4096
    sparse_map = b"2\n0\n4096\n%d\n4096\n" % (size - 4096)
    data_10 = sparse_map + bytes(-len(sparse_map) % 512) + head + tail
    v10 = entry("GNUSparseFile.0/v10", data=data_10, pax={
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "v10",
        "GNU.sparse.realsize": str(size)})
    v01 = entry("GNUSparseFile.0/v01", data=head + tail, pax={
        "GNU.sparse.map": f"0,4096,{size - 4096},4096", "GNU.sparse.name": "v01",
        "GNU.sparse.size": str(size)})
    apply(make_tar([v10, v01]), tmp_path / "r")
    for name in ("v10", "v01"):
        path = tmp_path / "r" / name
        assert path.read_bytes() == head + bytes(size - 8192) + tail
        assert os.lstat(path).st_blocks * 512 <= 64 << 10
    assert not (tmp_path / "r" / "GNUSparseFile.0").exists()


def test_content_bytes_as_moby_sums_them(tmp_path: Path) -> None:
    """
    content_bytes is what moby's UnpackLayer returns: the sum of Go's
    hdr.Size over the entries, so a sparse file counts its logical size
    (not its stored data, nor a PAX 1.0 map), links and directories their
    header's 0, and PAX records and GNU long names nothing.  Python's
    tarfile reports the same sizes, so it is the oracle.
    """
    size = 1 << 20
    head, tail = b"H" * 4096, b"T" * 4096
    sparse_map = b"2\n0\n4096\n%d\n4096\n" % (size - 4096)
    v10 = entry("GNUSparseFile.0/v10", data=sparse_map + bytes(-len(sparse_map) % 512) + head + tail, pax={
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "v10",
        "GNU.sparse.realsize": str(size)})
    v01 = entry("GNUSparseFile.0/v01", data=head + tail, pax={
        "GNU.sparse.map": f"0,4096,{size - 4096},4096", "GNU.sparse.name": "v01",
        "GNU.sparse.size": str(size)})
    tar = make_tar([
        entry("d", tarfile.DIRTYPE), entry("d/" + "n" * 150, data=b"12345"), v10, v01,
        entry("sym", tarfile.SYMTYPE, linkname="t" * 200), entry("hard", tarfile.LNKTYPE, linkname="d/" + "n" * 150),
        entry(".wh.gone", data=b""),
    ])
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        expected = sum(m.size for m in t.getmembers())
    assert expected == 5 + 2 * size
    stats = apply(tar, tmp_path / "r")
    assert stats.content_bytes == expected
    assert stats.entries == 7


def test_long_names_gnu_format(tmp_path: Path) -> None:
    """GNU long names and long link names are applied in full."""
    name = "a" * 120 + "/" + "b" * 120
    target = "t" * 300
    tar = make_tar([entry(name, data=b"x"), entry("sym", tarfile.SYMTYPE, linkname=target)], tarfile.GNU_FORMAT)
    apply(tar, tmp_path / "r")
    assert (tmp_path / "r" / name).read_bytes() == b"x"
    assert os.readlink(tmp_path / "r" / "sym") == target


def test_pax_times_and_implied_parents(tmp_path: Path) -> None:
    """PAX sub-second times are applied, atime never before mtime, and missing parents made 0755."""
    tar = make_tar([
        entry("a/b/c", data=b"x", pax={"mtime": "1600000000.123456789", "atime": "1700000000.5"}),
        entry("old-atime", data=b"x", pax={"mtime": "1600000000.5", "atime": "1500000000"}),
    ])
    apply(tar, tmp_path / "r")
    st = os.lstat(tmp_path / "r" / "a" / "b" / "c")
    assert st.st_mtime_ns == 1600000000_123456789
    assert st.st_atime_ns == 1700000000_500000000
    assert os.lstat(tmp_path / "r" / "old-atime").st_atime_ns == 1600000000_500000000
    parent = os.lstat(tmp_path / "r" / "a" / "b")
    assert stat.S_IMODE(parent.st_mode) == 0o755 and (parent.st_uid, parent.st_gid) == (0, 0)


def test_directory_names_with_and_without_slash(tmp_path: Path) -> None:
    """Directories are recognised whether their names end with a slash or not, and old-style by the slash."""
    info, _ = entry("v7dir/", tarfile.AREGTYPE)
    tar = make_tar([entry("withslash/", tarfile.DIRTYPE), entry("./noslash", tarfile.DIRTYPE), (info, None)],
                   tarfile.USTAR_FORMAT)
    apply(tar, tmp_path / "r")
    for name in ("withslash", "noslash", "v7dir"):
        assert (tmp_path / "r" / name).is_dir()


def test_replace_rules(tmp_path: Path) -> None:
    """An existing entry is replaced unless both are directories, which are merged."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "file-to-dir").write_bytes(b"x")
    (root / "dir-to-file").mkdir()
    (root / "dir-to-file" / "child").write_bytes(b"x")
    (root / "merged").mkdir(mode=0o700)
    (root / "merged" / "kept").write_bytes(b"kept")
    os.symlink("/etc/passwd", root / "symlink-to-file")
    tar = make_tar([
        entry("file-to-dir/", tarfile.DIRTYPE),
        entry("dir-to-file", data=b"now a file"),
        entry("merged/", tarfile.DIRTYPE, mode=0o751, uid=9),
        entry("symlink-to-file", data=b"plain"),
    ])
    apply(tar, root, ApplyMode.INPLACE)
    assert (root / "file-to-dir").is_dir()
    assert (root / "dir-to-file").read_bytes() == b"now a file"
    assert (root / "merged" / "kept").read_bytes() == b"kept"
    assert stat.S_IMODE(os.lstat(root / "merged").st_mode) == 0o751 and os.lstat(root / "merged").st_uid == 9
    assert not (root / "symlink-to-file").is_symlink()
    assert (root / "symlink-to-file").read_bytes() == b"plain"


def test_root_entry(tmp_path: Path) -> None:
    """A "./" entry sets the root's metadata in place, and is skipped on an overlay upper as moby does."""
    tar = make_tar([entry("./", tarfile.DIRTYPE, mode=0o711, mtime=T0), entry("./f", data=b"x")])
    apply(tar, tmp_path / "inplace", ApplyMode.INPLACE)
    apply(tar, tmp_path / "overlay", ApplyMode.OVERLAY)
    assert stat.S_IMODE(os.lstat(tmp_path / "inplace").st_mode) == 0o711
    assert os.lstat(tmp_path / "inplace").st_mtime_ns == T0 * 10**9
    assert stat.S_IMODE(os.lstat(tmp_path / "overlay").st_mode) == 0o755
    assert (tmp_path / "overlay" / "f").read_bytes() == b"x"


def test_stream_drained_and_small_reads(tmp_path: Path) -> None:
    """The tar is read to its end marker in small reads, then the rest of the stream is drained."""
    tar = make_tar(rich_layer())
    stream = Stream(tar + b"trailing bytes dockerd may send" * 100, chunk=997)
    (tmp_path / "r").mkdir()
    stats = apply_layer(stream, str(tmp_path / "r"), ApplyMode.OVERLAY)  # type: ignore[arg-type]
    assert stream.exhausted
    assert stats.tar_bytes <= len(tar)
    apply(tar, tmp_path / "s")
    assert snapshot(tmp_path / "r") == snapshot(tmp_path / "s")


def test_no_end_marker(tmp_path: Path) -> None:
    """A tar that simply stops after an entry is accepted, as Go's reader does."""
    tar = make_tar([entry("f", data=b"x" * 700)])
    end = 512 * 3
    apply(tar[:end], tmp_path / "r")
    assert (tmp_path / "r" / "f").read_bytes() == b"x" * 700


def test_malformed_tars(tmp_path: Path) -> None:
    """Truncated data, a bad checksum and unknown entry types are errors naming what is wrong."""
    tar = make_tar([entry("file", data=b"x" * 5000)])
    with pytest.raises(ArchiveError, match="'file'.*ends inside"):
        apply(tar[:2048], tmp_path / "a")
    corrupt = bytearray(tar)
    corrupt[10] ^= 1
    with pytest.raises(ArchiveError, match="checksum"):
        apply(bytes(corrupt), tmp_path / "b")
    info, _ = entry("weird", b"V")
    with pytest.raises(ArchiveError, match="'weird'.*unsupported"):
        apply(make_tar([(info, None)]), tmp_path / "c")


def test_aufs_plnk_hardlinks(tmp_path: Path) -> None:
    """Hard links into AUFS's .wh..wh.plnk become copies of the file kept there, and the directory is not extracted."""
    tar = make_tar([
        entry(".wh..wh.plnk/", tarfile.DIRTYPE),
        entry(".wh..wh.plnk/123.456", data=b"shared", mode=0o751, uid=4),
        entry("a", tarfile.LNKTYPE, linkname=".wh..wh.plnk/123.456"),
        entry("b", tarfile.LNKTYPE, linkname="/.wh..wh.plnk/123.456"),
        entry(".wh..wh.aufs", data=b"meta"),
    ])
    apply(tar, tmp_path / "r", ApplyMode.INPLACE)
    assert sorted(os.listdir(tmp_path / "r")) == ["a", "b"]
    for name in ("a", "b"):
        st = os.lstat(tmp_path / "r" / name)
        assert (tmp_path / "r" / name).read_bytes() == b"shared"
        assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_uid == 4


def test_aufs_plnk_kept_in_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With scratch_dir, the .wh..wh.plnk files are kept in a private directory made there, removed afterwards."""

    made: list[str] = []
    real = tempfile.mkdtemp

    def spy(*args: Any, **kw: Any) -> str:
        path = real(*args, **kw)
        made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tar = make_tar([
        entry(".wh..wh.plnk/1.2", data=b"shared"),
        entry("a", tarfile.LNKTYPE, linkname=".wh..wh.plnk/1.2"),
    ])
    apply(tar, tmp_path / "r", ApplyMode.INPLACE, scratch_dir=str(scratch))
    assert (tmp_path / "r" / "a").read_bytes() == b"shared"
    assert len(made) == 1 and os.path.dirname(made[0]) == str(scratch)
    assert os.listdir(scratch) == []


def _raw_header(name: bytes, size: int, flag: bytes, extended: bool = False) -> bytes:
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"%07o\0" % 0o644
    header[108:116] = header[116:124] = b"%07o\0" % 0
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % T0
    header[156:157] = flag
    header[257:265] = b"ustar  \0"
    if extended:
        header[482] = 1
        header[483:495] = b"%011o\0" % (1 << 30)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _record(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _pax(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    if len(str(length)) > len(str(len(body))):
        length += 1
    return b"%d" % length + body


def test_metadata_limited_per_entry(tmp_path: Path) -> None:
    """An entry's metadata records, each under the limit, are refused when they exceed it together."""
    end = bytes(1024)
    half = _pax("comment", "x" * 600_000)
    other = _pax("txgraph.other", "y" * 600_000)
    plain = make_tar([entry("file", data=b"x")])
    # Two PAX headers before the name is known: the error gives the offset.
    tar = (
        _raw_header(b"pax1", len(half), b"x") + _record(half)
        + _raw_header(b"pax2", len(other), b"x") + _record(other) + plain
    )
    with pytest.raises(ArchiveError, match="layer tar entry whose header starts at byte 0: more than"):
        apply(tar, tmp_path / "a")
    # Global PAX headers count, and the name is used once known.
    named = _pax("path", "named") + half
    tar = (
        _raw_header(b"pax", len(named), b"x") + _record(named)
        + _raw_header(b"glob", len(other), b"g") + _record(other) + plain
    )
    with pytest.raises(ArchiveError, match="layer tar entry 'named': more than"):
        apply(tar, tmp_path / "b")
    # GNU long names and links.
    long = b"n" * 600_000
    tar = (
        _raw_header(b"././@LongLink", len(long), b"L") + _record(long)
        + _raw_header(b"././@LongLink", len(long), b"K") + _record(long) + plain
    )
    with pytest.raises(ArchiveError, match="layer tar entry 'n+': more than"):
        apply(tar, tmp_path / "c")
    # An endless chain of old-GNU sparse extension blocks.
    ext = bytearray(512)
    ext[0:24] = b"%011o\0%011o\0" % (0, 4)
    ext[504] = 1
    tar = _raw_header(b"sparse", 0, b"S", extended=True) + bytes(ext) * 4096 + end
    with pytest.raises(ArchiveError, match="layer tar entry 'sparse': more than"):
        apply(tar, tmp_path / "d")
    # Metadata below the limit is counted afresh for each entry.
    tar = (
        _raw_header(b"pax1", len(half), b"x") + _record(half) + plain[:-1024]
        + _raw_header(b"pax2", len(other), b"x") + _record(other) + plain
    )
    apply(tar, tmp_path / "e")
    assert (tmp_path / "e" / "file").read_bytes() == b"x"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.E2BIG, errno.ERANGE])
def test_oversized_xattr_is_an_archive_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """An attribute the filesystem cannot store is an error of the tar naming the entry and the attribute."""
    real = os.setxattr

    def setxattr(target: Any, key: Any, value: bytes, *args: Any, **kw: Any) -> None:
        if os.fsencode(key) == b"user.big":
            raise OSError(code, os.strerror(code))
        real(target, key, value, *args, **kw)

    monkeypatch.setattr(os, "setxattr", setxattr)
    for name, kind in (("big", tarfile.REGTYPE), ("bigdir/", tarfile.DIRTYPE)):
        tar = make_tar([entry(name, kind, data=b"x" if kind == tarfile.REGTYPE else b"",
                              xattrs={"user.big": b"v" * 65536})])
        with pytest.raises(ArchiveError) as info:
            apply(tar, tmp_path / name.rstrip("/"))
        assert info.value.message == (
            f"layer tar entry {name!r}: extended attribute user.big (65536 bytes) "
            f"cannot be stored on this filesystem: {os.strerror(code)}"
        )


# -- whiteouts ----------------------------------------------------------------------


def whiteout_layer() -> list[Entry]:
    return [
        entry("a/", tarfile.DIRTYPE, mtime=T0),
        entry("a/.wh.b", mtime=T0),
        entry("d/", tarfile.DIRTYPE, mode=0o750, uid=3, mtime=T0),
        entry("d/.wh..wh..opq", mode=0o750, uid=3),
        entry("d/new", data=b"new", mtime=T0),
        entry(".wh..wh.plnk/", tarfile.DIRTYPE),
        entry(".wh..wh.aufs", data=b"x"),
        entry("e/.wh..wh.orph", data=b"x"),
    ]


def test_overlay_whiteouts(tmp_path: Path) -> None:
    """AUFS whiteouts become 0:0 character devices and the opaque attribute; other AUFS metadata is skipped."""
    upper = tmp_path / "upper"
    apply(make_tar(whiteout_layer()), upper)
    st = os.lstat(upper / "a" / "b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(upper)) == ["a", "d"]
    assert os.lstat(upper / "a").st_mtime_ns == T0 * 10**9


def test_overlay_whiteouts_exported(tmp_path: Path) -> None:
    """Exporting an upper turns whiteout devices and opaque directories back into .wh. entries, in walk order."""
    upper = tmp_path / "upper"
    apply(make_tar(whiteout_layer()), upper)
    tar = export(export_overlay, str(upper))
    got = [(m.name, m.type, m.size) for m in members(tar)]
    assert got == [
        ("a", tarfile.DIRTYPE, 0),
        ("a/.wh.b", tarfile.REGTYPE, 0),
        ("d", tarfile.DIRTYPE, 0),
        ("d/.wh..wh..opq", tarfile.REGTYPE, 0),
        ("d/new", tarfile.REGTYPE, 3),
    ]
    raw = [m for m in members(tar)]
    assert "trusted.overlay.opaque" not in str(raw[2].pax_headers)
    assert tar.count(b"d/\0") == 1 and tar.count(b"a/\0") == 1
    assert raw[3].uid == 3 and raw[3].mode == 0o750
    second = tmp_path / "second"
    apply(tar, second)
    assert snapshot(upper) == snapshot(second)


def test_inplace_whiteouts(tmp_path: Path) -> None:
    """In place, .wh.NAME removes NAME recursively and an opaque directory loses what the layer did not create."""
    root = tmp_path / "root"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "f").write_bytes(b"x")
    (root / "a" / "other").write_bytes(b"x")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"x")
    (root / "d" / "sub" / "old2").write_bytes(b"x")
    (root / "keep").write_bytes(b"x")
    tar = make_tar([
        entry("a/.wh.b"),
        entry("d/", tarfile.DIRTYPE),
        entry("d/.wh..wh..opq"),
        entry("d/new", data=b"new"),
        entry("d/sub/", tarfile.DIRTYPE),
        entry("d/sub/n2", data=b"n2"),
    ])
    apply(tar, root, ApplyMode.INPLACE)
    assert sorted(os.listdir(root)) == ["a", "d", "keep"]
    assert os.listdir(root / "a") == ["other"]
    assert sorted(os.listdir(root / "d")) == ["new", "sub"]
    assert os.listdir(root / "d" / "sub") == ["n2"]


def test_inplace_opaque_after_children(tmp_path: Path) -> None:
    """Entries the layer created before its opaque marker survive it, old content below them does not."""
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"x")
    (root / "d" / "sub" / "old2").write_bytes(b"x")
    tar = make_tar([
        entry("d/new", data=b"new"),
        entry("d/sub/", tarfile.DIRTYPE),
        entry("d/.wh..wh..opq"),
    ])
    apply(tar, root, ApplyMode.INPLACE)
    assert sorted(os.listdir(root / "d")) == ["new", "sub"]
    assert os.listdir(root / "d" / "sub") == []


def test_whiteout_naming_nothing(tmp_path: Path) -> None:
    """A whiteout of "", "." or ".." is an error rather than the deletion of a directory."""
    for name in ("d/.wh.", "d/.wh..", "d/.wh..."):
        root = tmp_path / str(len(name))
        (root / "d").mkdir(parents=True)
        with pytest.raises(ArchiveError, match="names no file"):
            apply(make_tar([entry(name)]), root, ApplyMode.INPLACE)
        assert (root / "d").is_dir()


# -- user namespaces -------------------------------------------------------------------


REMAP = IDMap.from_docker(
    [{"container_id": 0, "host_id": 100000, "size": 65536}],
    [{"container_id": 0, "host_id": 200000, "size": 65536}],
)


def test_id_map_shifts(tmp_path: Path) -> None:
    """Owners are shifted to host ids on apply, implied parents included, and back on export."""
    tar = make_tar([
        entry("f", data=b"x"),
        entry("g", data=b"x", uid=1000, gid=2000),
        entry("implied/s", tarfile.SYMTYPE, linkname="f", uid=1, gid=1),
        entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3, uid=2, gid=3),
    ])
    root = tmp_path / "r"
    apply(tar, root, id_map=REMAP)
    owner = lambda p: (os.lstat(root / p).st_uid, os.lstat(root / p).st_gid)  # noqa: E731
    assert owner("f") == (100000, 200000)
    assert owner("g") == (101000, 202000)
    assert owner("implied") == (100000, 200000)
    assert owner("implied/s") == (100001, 200001)
    assert owner("dev") == (100002, 200003)
    out = {m.name: (m.uid, m.gid) for m in members(export(export_overlay, str(root), id_map=REMAP))}
    assert out == {"f": (0, 0), "g": (1000, 2000), "implied": (0, 0), "implied/s": (1, 1), "dev": (2, 3)}


def test_id_map_out_of_range(tmp_path: Path) -> None:
    """An owner outside the map is an error on apply and on export, naming the file."""
    with pytest.raises(ArchiveError, match="'big'.*70000"):
        apply(make_tar([entry("big", data=b"x", uid=70000)]), tmp_path / "r", id_map=REMAP)
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "f").write_bytes(b"x")
    with pytest.raises(ArchiveError, match="'f'.*host uid 0"):
        export(export_overlay, str(tmp_path / "host"), id_map=REMAP)


# -- changes ---------------------------------------------------------------------------


def build_parent(root: Path) -> None:
    """
    The image the trace's container ran: /bin/ls, /bin/sh, /etc/passwd.
    """
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "ls").write_bytes(b"ls binary")
    (root / "bin" / "sh").write_bytes(b"sh binary")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    for path in ("bin/ls", "bin/sh", "etc/passwd", "bin", "etc"):
        os.utime(root / path, ns=(T0 * 10**9, T0 * 10**9))


TRACE_CHANGES = [
    Change("/bin", M),
    Change("/bin/ls", D),
    Change("/etc", M),
    Change("/etc/x", A),
    Change("/etc/x/y", A),
    Change("/newfile", A),
]


def make_child(parent: Path, child: Path) -> None:
    shutil.copytree(parent, child, symlinks=True)
    os.unlink(child / "bin" / "ls")
    (child / "etc" / "x").mkdir()
    (child / "etc" / "x" / "y").write_bytes(b"y")
    (child / "newfile").write_bytes(b"new")


def test_changes_dirs_trace(tmp_path: Path) -> None:
    """Comparing full trees gives the same list for the trace's container, directories with changes as modified."""
    old, new = tmp_path / "old", tmp_path / "new"
    build_parent(old)
    make_child(old, new)
    assert changes_dirs(str(new), str(old)) == TRACE_CHANGES


def test_changes_dirs_same_size_rewrite(tmp_path: Path) -> None:
    """A same-size rewrite with a new mtime, or a new capability, is a modification; a whole-second time is not."""
    old, new = tmp_path / "old", tmp_path / "new"
    build_parent(old)
    shutil.copytree(old, new, symlinks=True)
    (new / "etc" / "passwd").write_bytes(b"ROOT:x:0:0::/root:/bin/sh\n")
    os.utime(new / "etc" / "passwd", ns=((T0 + 5) * 10**9, (T0 + 5) * 10**9))
    os.setxattr(new / "bin" / "sh", "security.capability", CAPABILITY)
    os.utime(new / "bin" / "sh", ns=(T0 * 10**9, T0 * 10**9))
    os.utime(old / "bin" / "ls", ns=(T0 * 10**9 + 5, T0 * 10**9 + 5))
    assert changes_dirs(str(new), str(old)) == [
        Change("/bin", M),
        Change("/bin/sh", M),
        Change("/etc", M),
        Change("/etc/passwd", M),
    ]


def test_changes_dirs_against_nothing(tmp_path: Path) -> None:
    """Without a parent every file is added."""
    build_parent(tmp_path / "t")
    assert changes_dirs(str(tmp_path / "t"), None) == [
        Change(p, A) for p in ("/bin", "/bin/ls", "/bin/sh", "/etc", "/etc/passwd")
    ]


def test_changes_dirs_type_change(tmp_path: Path) -> None:
    """A file replaced by a directory is modified and its content added; a removed directory is one deletion."""
    old, new = tmp_path / "old", tmp_path / "new"
    build_parent(old)
    shutil.copytree(old, new, symlinks=True)
    os.unlink(new / "etc" / "passwd")
    (new / "etc" / "passwd").mkdir()
    (new / "etc" / "passwd" / "f").write_bytes(b"f")
    shutil.rmtree(new / "bin")
    assert changes_dirs(str(new), str(old)) == [
        Change("/bin", D),
        Change("/etc", M),
        Change("/etc/passwd", M),
        Change("/etc/passwd/f", A),
    ]


def test_changes_dirs_leaves_nothing_for_the_garbage_collector(tmp_path: Path) -> None:
    """
    Comparing two trees frees everything it made as soon as it returns:
    no reference cycles (moby-style trees linked both ways lingered until
    the collector's next full pass, about 180,000 objects for a layer of
    10,000 files), and nothing but the answer is kept.
    """
    old, new = tmp_path / "old", tmp_path / "new"
    build_parent(old)
    make_child(old, new)
    for i in range(300):
        (new / "etc" / "x" / f"f{i}").write_bytes(b"f")
    (new / "etc" / "sub").mkdir()
    gc.collect()
    gc.disable()
    try:
        before = sys.getallocatedblocks()
        changes = changes_dirs(str(new), str(old))
        assert len(changes) == len(TRACE_CHANGES) + 301
        del changes
        kept = sys.getallocatedblocks() - before
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
    assert kept < 50


# -- sizes -------------------------------------------------------------------------------


def test_sizes_count_hardlinks_once(tmp_path: Path) -> None:
    """directory_size and changes_size count a file with several names once, and ignore directories."""
    root = tmp_path / "r"
    (root / "dir").mkdir(parents=True)
    (root / "a").write_bytes(b"a" * 100)
    os.link(root / "a", root / "dir" / "b")
    (root / "c").write_bytes(b"c" * 50)
    (root / "empty").write_bytes(b"")
    os.symlink("target-of-len-16", root / "sym")
    assert directory_size(str(root)) == 100 + 50 + 16
    changes = [Change("/a", A), Change("/dir/b", A), Change("/c", M), Change("/dir", M),
               Change("/gone", D), Change("/missing", A)]
    assert changes_size(str(root), changes) == 150


def test_walks_handle_paths_near_path_max(tmp_path: Path) -> None:
    """Sizes and Changes work for a 4,000-byte path inside a layer whose absolute path exceeds PATH_MAX."""
    base = tmp_path
    for i in range(3):
        base = base / (str(i) * 200)
    parts = ["%02d" % i + "d" * 253 for i in range(15)]
    dirs = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    name = dirs[-1] + "/" + "f" * (4000 - len(dirs[-1]) - 1)
    assert len(name) == 4000 and len(str(base)) + len(name) > 4096
    tar = make_tar([entry(name, data=b"x" * 1234)])
    upper, full = base / "upper", base / "full"
    apply(tar, upper)
    apply(tar, full, ApplyMode.INPLACE)
    expected = [Change("/" + d, A) for d in dirs] + [Change("/" + name, A)]
    assert directory_size(str(upper)) == 1234
    changes = changes_dirs(str(full), None)
    assert changes == expected
    assert changes_size(str(full), changes) == 1234
    assert changes_dirs(str(full), str(upper)) == []


def test_walks_never_follow_a_symlinked_directory(tmp_path: Path) -> None:
    """A directory that became a symlink is not entered: sizes and Changes never look outside the tree."""
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "big").write_bytes(b"x" * 5000)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside), root / "link")
    assert directory_size(str(root)) == len(str(outside))
    assert changes_size(str(root), [Change("/link/d/big", A)]) == 0
    assert changes_dirs(str(root), None) == [Change("/link", A)]


def test_diff_size_rules_agree(tmp_path: Path) -> None:
    """An overlay upper and the same layer applied in place to its parent's tree have the same size."""
    old, new, upper = tmp_path / "old", tmp_path / "new", tmp_path / "upper"
    build_parent(old)
    make_child(old, new)
    tar = export(export_changes, str(new), changes_dirs(str(new), str(old)))
    apply(tar, upper, ApplyMode.OVERLAY)
    inplace = tmp_path / "inplace"
    shutil.copytree(old, inplace, symlinks=True)
    apply(tar, inplace, ApplyMode.INPLACE)
    assert directory_size(str(upper)) == changes_size(str(inplace), changes_dirs(str(inplace), str(old))) == 4


def test_apply_in_place_through_a_symlinked_directory(tmp_path: Path) -> None:
    """An entry below a symlinked directory inside the root is written where the symlink leads."""
    root = tmp_path / "r"
    (root / "usr" / "lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    apply(make_tar([entry("lib/x", data=b"x")]), root, ApplyMode.INPLACE)
    assert (root / "usr" / "lib" / "x").read_bytes() == b"x"


# -- export_changes ----------------------------------------------------------------------


def test_export_changes_trace(tmp_path: Path) -> None:
    """The naive diff tar of the trace holds the six entries dockerd committed, and reproduces the child tree."""
    old, new = tmp_path / "old", tmp_path / "new"
    build_parent(old)
    make_child(old, new)
    tar = export(export_changes, str(new), changes_dirs(str(new), str(old)))
    got = [(m.name, m.type, m.size) for m in members(tar)]
    assert got == [
        ("bin", tarfile.DIRTYPE, 0),
        ("bin/.wh.ls", tarfile.REGTYPE, 0),
        ("etc", tarfile.DIRTYPE, 0),
        ("etc/x", tarfile.DIRTYPE, 0),
        ("etc/x/y", tarfile.REGTYPE, 1),
        ("newfile", tarfile.REGTYPE, 3),
    ]
    result = tmp_path / "result"
    shutil.copytree(old, result, symlinks=True)
    apply(tar, result, ApplyMode.INPLACE)
    assert sorted(snapshot(result)) == sorted(snapshot(new))
    assert (result / "etc" / "x" / "y").read_bytes() == b"y"


def test_export_walk_order_and_hardlinks(tmp_path: Path) -> None:
    """Entries come in filepath.Walk order and later names of a hard-linked file are link entries."""
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "c").write_bytes(b"c")
    (root / "a-b").write_bytes(b"ab")
    os.link(root / "a-b", root / "b")
    tar = members(export(export_overlay, str(root)))
    assert [m.name for m in tar] == ["a", "a/c", "a-b", "b"]
    assert tar[3].type == tarfile.LNKTYPE and tar[3].linkname == "a-b" and tar[3].size == 0


# -- tar headers as Go writes moby's ----------------------------------------------------------


def go_block(fields: dict[str, bytes]) -> bytes:
    """
    A 512-byte header laid out by hand from the ustar spec, the way Go's
    writer fills it (numbers in octal with a NUL, strings NUL-padded), with
    its checksum: the reference the writer's bytes are compared with.
    """
    layout = [("name", 100), ("mode", 8), ("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12),
              ("chksum", 8), ("type", 1), ("linkname", 100), ("magic", 8), ("uname", 32),
              ("gname", 32), ("devmajor", 8), ("devminor", 8), ("prefix", 155), ("pad", 12)]
    block = bytearray()
    for key, size in layout:
        value = b" " * 8 if key == "chksum" else fields.get(key, b"")
        assert len(value) <= size
        block += value + bytes(size - len(value))
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def go_octal(value: int, size: int) -> bytes:
    return b"%0*o\0" % (size - 1, value)


def test_header_ustar_bytes() -> None:
    """A plain file's header is Go's ustar block: type bits in the mode, owner names, devices in octal."""
    got = tar_header(b"t/dir1/b", 0o104755, 1, 2, 5, T0, b"0", uname=b"daemon", gname=b"bin")
    assert got == go_block({
        "name": b"t/dir1/b", "mode": go_octal(0o104755, 8), "uid": go_octal(1, 8),
        "gid": go_octal(2, 8), "size": go_octal(5, 12), "mtime": go_octal(T0, 12),
        "type": b"0", "magic": b"ustar\x0000", "uname": b"daemon", "gname": b"bin",
        "devmajor": go_octal(0, 8), "devminor": go_octal(0, 8),
    })


def test_header_long_names() -> None:
    """A long name splits into prefix and name (a directory's trailing slash stays with its last component); an unsplittable one takes a PAX path record."""
    directory = b"p" * 120 + b"/" + b"q" * 30 + b"/"
    got = tar_header(directory, 0o40755, 0, 0, 0, T0, b"5", uname=b"root", gname=b"root")
    assert got[345:345 + 155].rstrip(b"\0") == b"p" * 120
    assert got[:100].rstrip(b"\0") == b"q" * 30 + b"/"
    assert len(got) == 512
    long = b"t/" + b"p" * 150 + b"/" + b"q" * 150
    got = tar_header(long, 0o40755, 0, 0, 0, T0, b"5")
    [member] = members(got + bytes(1024))
    assert member.name == long.decode() and len(got) == 3 * 512


def test_header_pax_as_go_writes_it() -> None:
    """With PAX records the extended header is Go's: named dir/PaxHeaders.0/file (a directory's own name for one), zero fields and no device numbers; the main header holds the ASCII of each value, no prefix."""
    directory = b"a" * 120 + b"/"
    xattrs = {b"user.k": b"v"}
    got = tar_header(directory, 0o40755, 0, 0, 0, T0, b"5", xattrs=xattrs, uname=b"r\xc3\xb6ot", gname=b"root")
    records = b"".join(_pax_record(k, v) for k, v in [
        (b"SCHILY.xattr.user.k", b"v"), (b"path", directory), (b"uname", b"r\xc3\xb6ot"),
    ])
    assert got[:512] == go_block({
        "name": (b"a" * 120 + b"/PaxHeaders.0")[:100], "mode": go_octal(0, 8),
        "uid": go_octal(0, 8), "gid": go_octal(0, 8), "size": go_octal(len(records), 12),
        "mtime": go_octal(0, 12), "type": b"x", "magic": b"ustar\x0000",
    })
    assert got[512:512 + len(records)] == records
    main = got[-512:]
    assert main == go_block({
        "name": b"a" * 100, "mode": go_octal(0o40755, 8), "uid": go_octal(0, 8),
        "gid": go_octal(0, 8), "size": go_octal(0, 12), "mtime": go_octal(T0, 12),
        "type": b"5", "magic": b"ustar\x0000", "uname": b"rot", "gname": b"root",
        "devmajor": go_octal(0, 8), "devminor": go_octal(0, 8),
    })
    [member] = members(got + bytes(1024))
    assert member.name == directory.decode().rstrip("/") and member.uname == "r\u00f6ot"


def test_export_owner_names_from_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exported entries carry the host's names for their owners (empty for an unknown id), whiteouts and opaque markers too; each id is looked up once per tar."""
    import grp
    import pwd

    root = tmp_path / "upper"
    (root / "opaque").mkdir(parents=True)
    os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
    for i in range(50):
        (root / f"f{i}").write_bytes(b"x")
        os.chown(root / f"f{i}", 1, 2)
    (root / "nobody-known").write_bytes(b"")
    os.chown(root / "nobody-known", 4_000_000, 4_000_001)
    os.mknod(root / "gone", stat.S_IFCHR, 0)
    calls: list[int] = []
    real = pwd.getpwuid

    def counting(uid: int) -> Any:
        calls.append(uid)
        return real(uid)

    monkeypatch.setattr(pwd, "getpwuid", counting)
    got = {m.name: (m.uname, m.gname) for m in members(export(export_overlay, str(root)))}

    def names(uid: int, gid: int) -> tuple[str, str]:
        try:
            user = real(uid).pw_name
        except KeyError:
            user = ""
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = ""
        return user, group

    assert got["f7"] == names(1, 2) and got["f7"][0]
    assert got["opaque"] == got["opaque/.wh..wh..opq"] == got[".wh.gone"] == names(0, 0)
    assert got["nobody-known"] == names(4_000_000, 4_000_001) == ("", "")
    assert sorted(calls) == [0, 1, 4_000_000]


def test_changes_a_hard_link_does_not_change_its_target(tmp_path: Path) -> None:
    """After ln hard1 hard3 only the new name is added (nlink and ctime are not compared): moby's naive differ."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "t").mkdir(parents=True)
    (old / "t" / "hard1").write_bytes(b"h")
    shutil.copytree(old, new, symlinks=True)
    os.link(new / "t" / "hard1", new / "t" / "hard3")
    assert changes_dirs(str(new), str(old)) == [Change("/t", M), Change("/t/hard3", A)]


def test_changes_report_every_directory_above_a_change(tmp_path: Path) -> None:
    """A chmod deep down reports each directory above it modified, and a file added to a directory reports the directory."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "t" / "dir1").mkdir(parents=True)
    (old / "t" / "dir1" / "b").write_bytes(b"b")
    shutil.copytree(old, new, symlinks=True)
    os.chmod(new / "t" / "dir1" / "b", 0o600)
    assert changes_dirs(str(new), str(old)) == [
        Change("/t", M), Change("/t/dir1", M), Change("/t/dir1/b", M),
    ]
    shutil.rmtree(new)
    shutil.copytree(old, new, symlinks=True)
    (new / "t" / "copied").write_bytes(b"c")
    assert changes_dirs(str(new), str(old)) == [Change("/t", M), Change("/t/copied", A)]


# -- attacks ---------------------------------------------------------------------------------


def assert_contained(outside: Path, before: dict[str, tuple[Any, ...]], tmp_path: Path, roots: set[str]) -> None:
    """
    Nothing outside changed, and nothing new appeared beside the roots.
    """
    assert outside_state(outside) == before
    assert set(os.listdir(tmp_path)) == roots | {"outside"}


def test_attack_absolute_names(tmp_path: Path, outside: Path) -> None:
    """Absolute names are taken relative to the root."""
    before = outside_state(outside)
    root = tmp_path / "root"
    tar = make_tar([entry(str(outside / "sentinel"), data=b"pwned"), entry("/etc/passwd", data=b"pwned")])
    apply(tar, root)
    assert (root / str(outside / "sentinel").lstrip("/")).read_bytes() == b"pwned"
    assert (root / "etc" / "passwd").read_bytes() == b"pwned"
    assert_contained(outside, before, tmp_path, {"root"})


@pytest.mark.parametrize("name", ["../outside/sentinel", "a/../../outside/sentinel", "/../outside/x"])
def test_attack_dotdot_names(tmp_path: Path, outside: Path, name: str) -> None:
    """Names climbing above the root are rejected."""
    before = outside_state(outside)
    with pytest.raises(ArchiveError, match="outside the layer"):
        apply(make_tar([entry(name, data=b"pwned")]), tmp_path / "root")
    assert_contained(outside, before, tmp_path, {"root"})


@pytest.mark.parametrize("target", ["/", "../../..", "../../../../../../../../.."])
def test_attack_symlink_to_root(tmp_path: Path, outside: Path, target: str) -> None:
    """A symlink to / or ../../.. followed by names through it writes inside the root."""
    before = outside_state(outside)
    root = tmp_path / "root"
    relative = os.path.relpath(outside, "/")
    tar = make_tar([
        entry("x/y/evil", tarfile.SYMTYPE, linkname=target),
        entry(f"x/y/evil/{relative}/", tarfile.DIRTYPE),
        entry(f"x/y/evil/{relative}/sentinel", data=b"pwned"),
        entry("x/y/evil/outside/sentinel", data=b"pwned"),
        entry(f"x/y/evil/{relative}/hard", tarfile.LNKTYPE, linkname=f"x/y/evil/{relative}/sentinel"),
    ])
    apply(tar, root)
    assert (root / relative / "sentinel").read_bytes() == b"pwned"
    assert os.lstat(root / relative / "hard").st_ino == os.lstat(root / relative / "sentinel").st_ino
    assert (root / "outside" / "sentinel").read_bytes() == b"pwned"
    assert_contained(outside, before, tmp_path, {"root"})


@pytest.mark.parametrize("mode", [ApplyMode.OVERLAY, ApplyMode.INPLACE])
def test_attack_symlinked_parent(tmp_path: Path, outside: Path, mode: ApplyMode) -> None:
    """A symlink to an outside directory used as a parent never reaches that directory."""
    before = outside_state(outside)
    root = tmp_path / "root"
    tar = make_tar([entry("link", tarfile.SYMTYPE, linkname=str(outside)), entry("link/sentinel", data=b"pwned")])
    with pytest.raises(ArchiveError, match="'link/sentinel'"):
        apply(tar, root, mode)
    for name in ("new", "sub/keep"):
        with pytest.raises(ArchiveError):
            apply(make_tar([entry(f"link/{name}", data=b"pwned")]), root, mode)
    assert_contained(outside, before, tmp_path, {"root"})


def test_attack_replace_symlink_to_outside(tmp_path: Path, outside: Path) -> None:
    """A file entry over an existing symlink to an outside file replaces the symlink, not the file."""
    before = outside_state(outside)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "sentinel", root / "s")
    os.symlink(outside, root / "dirlink")
    tar = make_tar([entry("s", data=b"pwned"), entry("dirlink/", tarfile.DIRTYPE, mode=0o777)])
    apply(tar, root, ApplyMode.INPLACE)
    assert (root / "s").read_bytes() == b"pwned" and not (root / "s").is_symlink()
    assert (root / "dirlink").is_dir() and not (root / "dirlink").is_symlink()
    assert_contained(outside, before, tmp_path, {"root"})


@pytest.mark.parametrize("mode", [ApplyMode.OVERLAY, ApplyMode.INPLACE])
def test_attack_hardlinks(tmp_path: Path, outside: Path, mode: ApplyMode) -> None:
    """Hard links to absolute, climbing, symlinked or missing targets never link an outside file."""
    before = outside_state(outside)
    root = tmp_path / "root"
    cases = [
        (entry("h", tarfile.LNKTYPE, linkname="/etc/shadow"), "not in the layer"),
        (entry("h", tarfile.LNKTYPE, linkname=str(outside / "sentinel")), "not in the layer"),
        (entry("h", tarfile.LNKTYPE, linkname="../outside/sentinel"), "outside the layer"),
        (entry("h", tarfile.LNKTYPE, linkname="a/../../x"), "outside the layer"),
        (entry("h", tarfile.LNKTYPE, linkname="evil/sentinel"), "not in the layer"),
        (entry("h", tarfile.LNKTYPE, linkname="up/outside/sentinel"), "not in the layer"),
    ]
    for link, message in cases:
        tar = make_tar([
            entry("evil", tarfile.SYMTYPE, linkname=str(outside)),
            entry("up", tarfile.SYMTYPE, linkname="../../.."),
            link,
        ])
        with pytest.raises(ArchiveError, match=message):
            apply(tar, root, mode)
    assert_contained(outside, before, tmp_path, {"root"})


@pytest.mark.parametrize("mode", [ApplyMode.OVERLAY, ApplyMode.INPLACE])
def test_attack_whiteouts_through_symlinks(tmp_path: Path, outside: Path, mode: ApplyMode) -> None:
    """Whiteouts and opaque markers below a symlink to an outside directory delete or create nothing there."""
    before = outside_state(outside)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "evil")
    os.symlink("../../../../..", root / "up")
    (root / "tmp").mkdir()
    attacks = [
        [entry("evil/.wh.sentinel")],
        [entry("evil/.wh.sub")],
        [entry("evil/.wh..wh..opq")],
        [entry("evil/sub/.wh.keep")],
        [entry(f"up/{os.path.relpath(outside, '/')}/.wh.sentinel")],
        [entry("up/outside/.wh..wh..opq")],
        [entry(".wh.evil")],
    ]
    for tar in attacks:
        try:
            apply(make_tar(tar), root, mode)
        except ArchiveError:
            pass
        assert outside_state(outside) == before
    assert_contained(outside, before, tmp_path, {"root"})


def test_descriptors_closed(tmp_path: Path) -> None:
    """Every descriptor opened by apply and export is closed, on success and on failure."""
    before = len(os.listdir("/proc/self/fd"))
    apply(make_tar(rich_layer() + whiteout_layer()), tmp_path / "ok")
    apply(make_tar(whiteout_layer()), tmp_path / "ok2", ApplyMode.INPLACE)
    with pytest.raises(ArchiveError):
        apply(make_tar(rich_layer() + [entry("../x", data=b"x")]), tmp_path / "bad")
    with pytest.raises(ArchiveError):
        apply(make_tar(rich_layer())[:30000], tmp_path / "truncated")
    export(export_overlay, str(tmp_path / "ok"))
    export(export_changes, str(tmp_path / "ok"), changes_dirs(str(tmp_path / "ok"), str(tmp_path / "ok2")))
    with pytest.raises(ArchiveError):
        export(export_overlay, str(tmp_path / "ok"), id_map=REMAP)
    assert len(os.listdir("/proc/self/fd")) == before
