"""
Thin images: a tiny, ordinary Docker image whose only layer holds a
descriptor of where the image's real layers already live, as protected
RBD snapshots shared by every node of a pool.

The descriptor is one JSON file at L{DESCRIPTOR_PATH} in the layer's root::

    {
      "kind": "txgraph.thin",
      "version": 1,
      "cluster": {"fsid": "<Ceph cluster fsid>", "pool": "rbd", "namespace": ""},
      "filesystem": "ext4",
      "layers": [
        {"snapshot": "<image>@txgraph", "chain_id": "sha256:...",
         "diff_id": "sha256:...", "size": 12345},
        ...
      ],
      "image": {"id": "sha256:...", "config": {...the original image config...}},
      "created": "2026-11-23T06:00:00Z"
    }

C{layers} lists the image's layers from the bottom up; each snapshot holds
the whole tree of the chain up to its layer (a clone of the one below), so
a thin layer becomes a clone of the last one.  Chain IDs follow the OCI
image spec (C{ChainID(L0) = DiffID(L0)}, C{ChainID(Ln) =
sha256(ChainID(Ln-1) + " " + DiffID(Ln))}), and L{parse} checks them
against the diff IDs.

This module is the pure part: the format, its validation, recognising a
layer tar that holds only a descriptor (L{sniff}), hashing a stream as it
is read, and building the thin layer's tar.  The rbd backend resolves
descriptors; C{txgraph-admin make-thin} writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from txgraph.errors import BadRequest

#: Where the descriptor lives in a thin layer (and in containers of it).
DESCRIPTOR_PATH = ".txgraph-thin.json"
KIND = "txgraph.thin"
#: The descriptor format this txgraph writes and reads.
VERSION = 1
#: A descriptor larger than this is not one.
MAX_DESCRIPTOR = 1 << 20
#: More layers than dockerd allows in an image is not a descriptor either.
MAX_LAYERS = 128

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FSID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,250}$")
_NAMES = {DESCRIPTOR_PATH, "./" + DESCRIPTOR_PATH}
BLOCK = 512
#: How often (bytes read) a L{HashingReader} reports progress.
PROGRESS_EVERY = 4 << 20


class ThinDescriptorError(BadRequest):
    """
    A thin descriptor is malformed, of an unknown version, or points at
    something this node cannot use; the message says which and why.
    """


def chain_id(parent: str | None, diff_id: str) -> str:
    """
    The OCI chain ID of a layer with diff ID C{diff_id} on a chain C{parent}
    (None for the first layer).
    """
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """
    The chain ID of every layer of an image, bottom up.
    """
    result: list[str] = []
    for diff_id in diff_ids:
        result.append(chain_id(result[-1] if result else None, diff_id))
    return result


@dataclass(frozen=True)
class ThinLayer:
    """
    One layer of a thin image: the shared snapshot holding its chain.
    """

    snapshot: str
    chain_id: str
    diff_id: str
    size: int

    @property
    def image(self) -> str:
        """
        The RBD image name (the snapshot without C{@name}).
        """
        return self.snapshot.split("@", 1)[0]


@dataclass(frozen=True)
class Descriptor:
    """
    A parsed, self-consistent thin descriptor.
    """

    version: int
    fsid: str
    pool: str
    namespace: str
    filesystem: str
    layers: tuple[ThinLayer, ...]
    image_id: str
    config: dict[str, Any]
    raw: bytes

    @property
    def top(self) -> ThinLayer:
        """
        The image's last layer: the snapshot a thin layer is cloned from.
        """
        return self.layers[-1]


def render(
    fsid: str,
    pool: str,
    namespace: str,
    filesystem: str,
    layers: list[ThinLayer],
    image_id: str,
    config: dict[str, Any],
    created: str,
) -> bytes:
    """
    The descriptor's bytes (checked by L{parse} before they are returned).
    """
    document = {
        "kind": KIND,
        "version": VERSION,
        "cluster": {"fsid": fsid, "pool": pool, "namespace": namespace},
        "filesystem": filesystem,
        "layers": [
            {"snapshot": t.snapshot, "chain_id": t.chain_id, "diff_id": t.diff_id, "size": t.size}
            for t in layers
        ],
        "image": {"id": image_id, "config": config},
        "created": created,
    }
    raw = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
    parse(raw)
    return raw


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise ThinDescriptorError(f"thin descriptor: {where} has no {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ThinDescriptorError(
            f"thin descriptor: {where}{key} must be a {kind.__name__}, not {type(value).__name__}"
        )
    return value


def parse(raw: bytes) -> Descriptor:
    """
    Parse and check a descriptor: JSON, kind, version, every field's type
    and form, and the chain IDs against the diff IDs.

    @raise ThinDescriptorError: naming the first thing that is wrong.
    """
    if len(raw) > MAX_DESCRIPTOR:
        raise ThinDescriptorError(f"thin descriptor: larger than {MAX_DESCRIPTOR} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ThinDescriptorError(f"thin descriptor: not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise ThinDescriptorError("thin descriptor: not a JSON object")
    if document.get("kind") != KIND:
        raise ThinDescriptorError(
            f"thin descriptor: kind is {document.get('kind')!r}, not {KIND!r}"
        )
    version = _field(document, "version", int, "")
    if version != VERSION:
        raise ThinDescriptorError(
            f"thin descriptor: unknown format version {version} (this txgraph reads "
            f"version {VERSION}; upgrade txgraph on this node)"
        )
    cluster = _field(document, "cluster", dict, "")
    fsid = _field(cluster, "fsid", str, "cluster.")
    if not _FSID.match(fsid):
        raise ThinDescriptorError(f"thin descriptor: cluster.fsid {fsid!r} is not a Ceph fsid")
    pool = _field(cluster, "pool", str, "cluster.")
    namespace = _field(cluster, "namespace", str, "cluster.")
    for what, value in (("pool", pool), ("namespace", namespace)):
        if (value or what == "pool") and not _IMAGE.match(value):
            raise ThinDescriptorError(f"thin descriptor: cluster.{what} {value!r} is not a valid name")
    filesystem = _field(document, "filesystem", str, "")
    if filesystem not in ("ext4", "xfs"):
        raise ThinDescriptorError(f"thin descriptor: filesystem {filesystem!r} is not ext4 or xfs")
    entries = _field(document, "layers", list, "")
    if not entries:
        raise ThinDescriptorError("thin descriptor: layers is empty")
    if len(entries) > MAX_LAYERS:
        raise ThinDescriptorError(f"thin descriptor: more than {MAX_LAYERS} layers")
    layers = []
    previous: str | None = None
    for i, entry in enumerate(entries):
        where = f"layers[{i}]."
        if not isinstance(entry, dict):
            raise ThinDescriptorError(f"thin descriptor: layers[{i}] is not an object")
        snapshot = _field(entry, "snapshot", str, where)
        image, _, snap = snapshot.partition("@")
        if not _IMAGE.match(image) or snap != "txgraph":
            raise ThinDescriptorError(
                f"thin descriptor: {where}snapshot {snapshot!r} is not IMAGE@txgraph"
            )
        digests = []
        for key in ("chain_id", "diff_id"):
            value = _field(entry, key, str, where)
            if not _DIGEST.match(value):
                raise ThinDescriptorError(
                    f"thin descriptor: {where}{key} {value!r} is not sha256:<64 hex>"
                )
            digests.append(value)
        size = _field(entry, "size", int, where)
        if size < 0:
            raise ThinDescriptorError(f"thin descriptor: {where}size is negative")
        expected = chain_id(previous, digests[1])
        if digests[0] != expected:
            raise ThinDescriptorError(
                f"thin descriptor: {where}chain_id {digests[0]} does not follow from the "
                f"diff IDs (expected {expected})"
            )
        previous = digests[0]
        layers.append(ThinLayer(snapshot, digests[0], digests[1], size))
    image_part = _field(document, "image", dict, "")
    image_id = _field(image_part, "id", str, "image.")
    if not _DIGEST.match(image_id):
        raise ThinDescriptorError(f"thin descriptor: image.id {image_id!r} is not sha256:<64 hex>")
    config = _field(image_part, "config", dict, "image.")
    return Descriptor(
        version, fsid, pool, namespace, filesystem, tuple(layers), image_id, config, raw
    )


# -- streams --------------------------------------------------------------------


class HashingReader:
    """
    Reads through to a stream, hashing every byte (the layer's diff ID is
    the sha256 of the whole uncompressed stream, trailing bytes included).
    """

    def __init__(
        self, stream: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._progress = progress
        self._reported = 0
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._hash.update(data)
        self.count += len(data)
        if self._progress is not None and (
            self.count - self._reported >= PROGRESS_EVERY or not data
        ):
            self._reported = self.count
            self._progress(self.count)
        return data

    def drain(self) -> None:
        """
        Read (and hash) the rest of the stream.
        """
        while self.read(1 << 20):
            pass

    def digest(self) -> str:
        """
        C{sha256:<hex>} of what was read so far.
        """
        return "sha256:" + self._hash.hexdigest()


class _Replay:
    """
    A stream that gives back bytes already read from another, then the rest.
    """

    def __init__(self, head: bytes, stream: Any) -> None:
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
                if n < 0:
                    return data + self._stream.read()
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._stream.read(n)


def _read_exactly(stream: Any, n: int) -> bytes:
    parts = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _octal(field: bytes) -> int | None:
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def sniff(stream: Any) -> tuple[bytes | None, Any]:
    """
    Recognise a layer tar that holds only a thin descriptor.

    Reads the first header; if it is a regular file named L{DESCRIPTOR_PATH}
    followed by the end of the archive, the stream is read to its end and
    C{(descriptor bytes, None)} is returned.  Otherwise nothing is lost:
    C{(None, stream')} where C{stream'} replays what was read.
    """
    head = _read_exactly(stream, BLOCK)
    if len(head) < BLOCK or not _is_descriptor_header(head):
        return None, _Replay(head, stream)
    size = _octal(head[124:136])
    assert size is not None
    padded = -(-size // BLOCK) * BLOCK
    body = _read_exactly(stream, padded)
    head += body
    if len(body) < padded:
        return None, _Replay(head, stream)
    end = _read_exactly(stream, BLOCK)
    head += end
    if end != b"\0" * BLOCK:
        return None, _Replay(head, stream)
    while stream.read(1 << 16):
        pass
    return body[:size], None


def _is_descriptor_header(block: bytes) -> bool:
    if block[257:262] != b"ustar":
        return False
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        return False
    if name.decode("utf-8", "replace") not in _NAMES:
        return False
    if block[156:157] not in (b"0", b"\0"):
        return False
    size = _octal(block[124:136])
    if size is None or size > MAX_DESCRIPTOR:
        return False
    stored = _octal(block[148:156])
    checksum = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == checksum


def layer_tar(descriptor: bytes) -> bytes:
    """
    The thin layer: a tar holding only the descriptor (root-owned, 0644,
    time 0), so that the same descriptor always gives the same diff ID.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(DESCRIPTOR_PATH)
        info.size = len(descriptor)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        tar.addfile(info, io.BytesIO(descriptor))
    return out.getvalue()
