"""
The rbd backend's own encoding of cls_rbd arguments: metadata written in
one C{metadata_set} call, and image ids read from C{rbd_id.<name>}.  The
integration tests check the same against a real cluster (every layer's
state is in that metadata); these pin the bytes.
"""

from __future__ import annotations

import struct

import pytest

from txgraph.backends.rbd.metadata import decode_string, encode_metadata
from txgraph.errors import BackendError


def test_metadata_map_encoding() -> None:
    """
    A count, then each key and value with its length, little-endian, in
    the order given.
    """
    assert encode_metadata({"txgraph.owner": "node-a", "k": "-"}) == (
        struct.pack("<I", 2)
        + struct.pack("<I", 13) + b"txgraph.owner"
        + struct.pack("<I", 6) + b"node-a"
        + struct.pack("<I", 1) + b"k"
        + struct.pack("<I", 1) + b"-"
    )


def test_metadata_is_utf8() -> None:
    assert encode_metadata({"k": "é"}) == struct.pack("<I", 1) + (
        struct.pack("<I", 1) + b"k" + struct.pack("<I", 2) + "é".encode()
    )


def test_empty_metadata() -> None:
    assert encode_metadata({}) == b"\0\0\0\0"


def test_image_id() -> None:
    assert decode_string(struct.pack("<I", 12) + b"10b6d2ab4d31") == "10b6d2ab4d31"


def test_image_id_ignores_trailing_bytes() -> None:
    assert decode_string(struct.pack("<I", 2) + b"abXYZ") == "ab"


@pytest.mark.parametrize("raw", [b"", b"\x05\x00", struct.pack("<I", 9) + b"short"])
def test_malformed_image_id(raw: bytes) -> None:
    with pytest.raises(BackendError, match="malformed image id object"):
        decode_string(raw)
