"""
What the rbd backend writes on its images and reads back: the snapshot and
directory names, the image metadata keys (C{rbd image-meta list}), an
image's state as one look sees it (L{ImageState}), Ceph's encoding of
metadata for cls_rbd's C{metadata_set}, and how errors are described.
Nothing here talks to the cluster.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

from txgraph import faults
from txgraph.errors import BackendError, TxgraphError

#: The snapshot a committed layer (and the base) is cloned from.
SNAP = "txgraph"
#: The directory inside each filesystem that dockerd sees.
ROOTFS = "rootfs"
#: Image metadata keys.
K_OWNER = "txgraph.owner"
K_LAYER = "txgraph.layer"
K_PARENT = "txgraph.parent"
K_STATE = "txgraph.state"
K_FS = "txgraph.fs"
K_FORMATTED = "txgraph.formatted"
K_DEPTH = "txgraph.depth"
#: The OCI chain ID whose tree the image holds exactly (shared images, and
#: layers that are unchanged clones of one); NONE otherwise.
K_CHAIN = "txgraph.chain"
#: A metadata value meaning "none" (librbd's metadata listing misreads
#: empty values).
NONE = "-"
#: The owner of shared images: no node.
SHARED = "shared"

#: Crash point: a layer's own image was removed to be replaced by a clone
#: of a shared image (ApplyDiff of a shared or thin layer), and the clone
#: is not made yet.
CRASH_REPLACED = "rbd.replace.removed"
#: Crash point: a removed layer's image is in the RBD trash, not purged yet.
CRASH_TRASHED = "rbd.remove.trashed"
faults.declare(CRASH_REPLACED, CRASH_TRASHED)

#: gc's name for a trashed image of this node: this prefix and its trash id.
TRASH = "trash."

#: A layer's key (L{txgraph.backends.layer_key}), as its mapping tag.
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ImageState:
    """
    What one read-only look at an image tells.

    @ivar snaps: snapshot name -> (protected, size).
    """

    name: str
    meta: dict[str, str]
    snaps: dict[str, tuple[bool, int]] = field(default_factory=dict)
    size: int = 0
    parent: str | None = None

    @property
    def committed(self) -> bool:
        """
        Whether the image has its C{@txgraph} snapshot.
        """
        return SNAP in self.snaps

    @property
    def depth(self) -> int:
        """
        How many clones deep the image is below a flat image (the base, or
        a layer flattened when committed); unknown counts as deep.
        """
        try:
            return int(self.meta.get(K_DEPTH, ""))
        except ValueError:
            return 1 << 16

    def copy(self) -> ImageState:
        """
        An independent copy.
        """
        return ImageState(self.name, dict(self.meta), dict(self.snaps), self.size, self.parent)


def _encode_bytes(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def encode_metadata(values: dict[str, str]) -> bytes:
    """
    C{values} as cls_rbd's C{metadata_set} takes them: Ceph's encoding of
    a C{map<string, bufferlist>} (a little-endian u32 count, then each key
    and value as a u32 length and its bytes).
    """
    out = [struct.pack("<I", len(values))]
    for key, value in values.items():
        out.append(_encode_bytes(key.encode()))
        out.append(_encode_bytes(value.encode()))
    return b"".join(out)


def decode_string(raw: bytes) -> str:
    """
    A string in Ceph's encoding (a little-endian u32 length, then the
    bytes), as C{rbd_id.<name>} objects hold an image's id.
    """
    if len(raw) < 4:
        raise BackendError(f"malformed image id object ({len(raw)} bytes)")
    (length,) = struct.unpack_from("<I", raw)
    if len(raw) < 4 + length:
        raise BackendError(f"malformed image id object (length {length}, {len(raw)} bytes)")
    return raw[4 : 4 + length].decode()


def client_nonce(address: str) -> str:
    """
    The random nonce that tells librados clients apart, from an address
    however it is printed (C{127.0.0.1:0/2349162579}, C{[v2:...,v1:...]}).
    """
    return address.strip("[]").split(",")[0].rsplit("/", 1)[-1]


def describe(error: BaseException) -> str:
    """
    An error as a short text for a message.
    """
    if isinstance(error, TxgraphError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def remove_snap(image: Any) -> None:
    """
    Unprotect (librbd refuses while clones exist) and remove an open image's
    C{@txgraph}.
    """
    if image.snap_exists(SNAP):
        if image.is_protected_snap(SNAP):
            image.unprotect_snap(SNAP)
        image.remove_snap(SNAP)


class SharedGone(Exception):
    """
    A shared image vanished (or lost its protected snapshot) between a look
    and a clone: another node's gc removed it.  Callers look again.
    """

    def __init__(self, image: str) -> None:
        super().__init__(image)
        self.image = image
