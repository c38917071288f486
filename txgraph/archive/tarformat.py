"""
The layer tar format that reading, applying and producing tars share: tar's
block and header layout and entry types, AUFS whiteout names, the extended
attributes with a meaning for layers, and the ID map used when none is
given.
"""

from __future__ import annotations

import struct

from txgraph.model import IDMap

#: The ID map of a layer applied or exported without one: ids unchanged.
IDENTITY = IDMap()

WH_PREFIX = b".wh."
WH_META = b".wh..wh."
WH_OPAQUE = b".wh..wh..opq"
WH_LINKDIR = b".wh..wh.plnk"
OPAQUE_XATTR = "trusted.overlay.opaque"
CAPABILITY = "security.capability"

BLOCK = 512
READ_SIZE = 1 << 20
# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic and
# version, uname, gname, devmajor, devminor, prefix (or GNU atime...).
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
NS = 1_000_000_000

REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = (b"0", b"1", b"2", b"3", b"4", b"5", b"6")
TYPES = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,
    b"S": REG,
    b"1": LINK,
    b"2": SYMLINK,
    b"3": CHR,
    b"4": BLK,
    b"5": DIR,
    b"6": FIFO,
}
