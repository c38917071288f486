"""
rbd-nbd daemons behind the kernel's nbd driver (C{/dev/nbdN}), driven
through C{rbd device map -t nbd} like the kernel's rbd client.
"""

from __future__ import annotations

import os
import shutil

from txgraph.backends.rbd.mappers.krbd import RBDDeviceMapper, modprobe


class NBDMapper(RBDDeviceMapper):
    """
    rbd-nbd daemons behind the kernel's nbd driver (C{/dev/nbdN}).
    """

    name = "nbd"
    device_type = "nbd"

    def unavailable(self) -> str | None:
        if shutil.which("rbd") is None:
            return "the rbd command is missing (install ceph-common)"
        if shutil.which("rbd-nbd") is None:
            return "rbd-nbd is not installed (install rbd-nbd)"
        if not os.path.isdir("/sys/module/nbd"):
            modprobe("nbd")
        if not os.path.isdir("/sys/module/nbd") or not os.path.exists("/sys/block/nbd0"):
            return "this kernel has no nbd module (/sys/module/nbd is missing)"
        return None
