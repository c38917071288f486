"""
The thin descriptor format, its checks, and recognising a layer tar that
holds only a descriptor (txgraph.thin).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import pytest

from txgraph import thin
from txgraph.testing.tars import files_tar
from txgraph.thin import ThinDescriptorError

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
FSID = "efc57dca-4fe7-49fd-8211-c07b4fcdd53d"


def _layers() -> list[thin.ThinLayer]:
    chains = thin.chain_ids([D1, D2])
    return [
        thin.ThinLayer(f"txgraph.shared.ext4.{c[7:]}@txgraph", c, d, 100 * (i + 1))
        for i, (c, d) in enumerate(zip(chains, [D1, D2], strict=True))
    ]


def _document() -> dict[str, Any]:
    raw = thin.render(
        FSID, "rbd", "ns", "ext4", _layers(), "sha256:" + "a" * 64, {"config": {"Cmd": ["sh"]}},
        "2026-11-23T00:00:00Z",
    )
    return json.loads(raw)


def _raw(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def test_chain_ids_follow_the_oci_rule() -> None:
    """
    The first chain ID is the diff ID; the next hashes "parent diff".
    """
    chains = thin.chain_ids([D1, D2])
    assert chains[0] == D1
    assert chains[1] == "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()


def test_render_and_parse_round_trip() -> None:
    """
    What render writes, parse reads back field for field.
    """
    descriptor = thin.parse(_raw(_document()))
    assert descriptor.version == thin.VERSION
    assert (descriptor.fsid, descriptor.pool, descriptor.namespace) == (FSID, "rbd", "ns")
    assert descriptor.layers == tuple(_layers())
    assert descriptor.top.image == _layers()[-1].snapshot.split("@")[0]
    assert descriptor.config == {"config": {"Cmd": ["sh"]}}


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = _document()
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"[" * 100000, "not valid JSON"),
        (_raw(_with(("kind",), "something")), "kind is 'something'"),
        (_raw(_with(("version",), 2)), "unknown format version 2"),
        (_raw(_with(("version",), True)), "version must be a int"),
        (_raw(_with(("version",), KeyError)), "has no 'version'"),
        (_raw(_with(("cluster", "fsid"), "nope")), "is not a Ceph fsid"),
        (_raw(_with(("cluster", "pool"), "a/b")), "cluster.pool 'a/b' is not a valid name"),
        (_raw(_with(("filesystem",), "btrfs")), "'btrfs' is not ext4 or xfs"),
        (_raw(_with(("layers",), [])), "layers is empty"),
        (_raw(_with(("layers", 0), "x")), "layers[0] is not an object"),
        (_raw(_with(("layers", 0, "snapshot"), "img@other")), "is not IMAGE@txgraph"),
        (_raw(_with(("layers", 1, "diff_id"), "sha256:zz")), "is not sha256:<64 hex>"),
        (_raw(_with(("layers", 1, "chain_id"), D2)), "does not follow from the diff IDs"),
        (_raw(_with(("layers", 0, "size"), -1)), "size is negative"),
        (_raw(_with(("image", "config"), [])), "image.config must be a dict"),
        (b" " * (thin.MAX_DESCRIPTOR + 1), "larger than"),
    ],
)
def test_bad_descriptors_name_what_is_wrong(document: bytes, message: str) -> None:
    """
    Every malformed descriptor is refused with a message naming the field.
    """
    with pytest.raises(ThinDescriptorError) as caught:
        thin.parse(document)
    assert message in caught.value.message
    assert caught.value.status == 400


def test_sniff_recognises_a_lone_descriptor() -> None:
    """
    The thin layer tar is recognised, and read to its end.
    """
    raw = _raw(_document())
    stream = io.BytesIO(thin.layer_tar(raw) + b"\0" * 4096)
    descriptor, rest = thin.sniff(stream)
    assert descriptor == raw and rest is None
    assert stream.read() == b""


@pytest.mark.parametrize(
    "layer",
    [
        files_tar({"etc/passwd": b"root:x:0:0\n"}, format=tarfile.USTAR_FORMAT),
        files_tar({thin.DESCRIPTOR_PATH: b"{}", "bin/sh": b"\x7fELF"}, format=tarfile.USTAR_FORMAT),
        files_tar({"x": b""}, format=tarfile.USTAR_FORMAT),
        b"",
        b"short",
    ],
    ids=["ordinary", "descriptor-and-more", "empty-file", "empty-stream", "truncated"],
)
def test_sniff_gives_back_everything_else_unchanged(layer: bytes) -> None:
    """
    Any other stream is replayed byte for byte, whatever was read to decide.
    """
    descriptor, rest = thin.sniff(io.BytesIO(layer))
    assert descriptor is None
    assert rest is not None
    replayed = b"".join(iter(lambda: rest.read(7), b""))
    assert replayed == layer


def test_hashing_reader_gives_the_diff_id() -> None:
    """
    The digest covers every byte read, trailing ones included, and progress
    is reported as the stream is read.
    """
    data = files_tar({"a": b"x" * 10000}, format=tarfile.USTAR_FORMAT) + b"\0" * 10240
    seen: list[int] = []
    reader = thin.HashingReader(io.BytesIO(data), seen.append)
    reader.read(100)
    reader.drain()
    assert reader.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert seen[-1] == len(data)


def test_layer_tar_is_deterministic() -> None:
    """
    The same descriptor always makes the same thin layer (the same diff ID).
    """
    raw = _raw(_document())
    assert thin.layer_tar(raw) == thin.layer_tar(raw)
    with tarfile.open(fileobj=io.BytesIO(thin.layer_tar(raw))) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.uid, member.mtime) == (
            thin.DESCRIPTOR_PATH, 0o644, 0, 0,
        )
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == raw
