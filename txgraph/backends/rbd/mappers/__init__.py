"""
Mappers: how an RBD image becomes a local block device for the rbd backend.

One interface (L{Mapper}), three implementations:

  - L{KernelMapper} (C{krbd}): C{rbd device map}, the kernel's rbd module,
    giving C{/dev/rbdN}.  The fastest, where the module exists.
  - L{NBDMapper} (C{nbd}): C{rbd device map -t nbd}, an C{rbd-nbd} daemon per
    image behind the kernel's nbd module, giving C{/dev/nbdN}.
  - L{FuseMapper} (C{fuse}): C{rbd-fuse} exposes the image as a file, and
    C{losetup --find --show} attaches a loop device to it, giving
    C{/dev/loopN}.  Needs only FUSE and loop devices: the mapper for hosts
    with neither kernel module.

A mapping is described by a JSON-able dict (the layer machine persists it,
so that recovery can unmap after a crash): at least C{mapper}, C{device},
C{image} and C{readonly}.  Every mapper can also find the mappings of an
image I{by reality} (the devices and processes that exist), for when the
persisted dict is missing or stale: C{unmap} never trusts a recorded device
number blindly, because after a crash the number may belong to someone else.

rbd-fuse: one process per mapping, not one per pool.  Ceph 16's rbd-fuse has
no C{release} handler: an image opened through a pool-wide mount stays open
(with its watch, and its exclusive lock once written) until the process
exits, so C{rbd rm} then fails with "image still has watchers"; it keeps at
most 128 open images (later opens fail with ENOENT); and every C{open} and
C{getattr} lists the whole pool.  A per-mapping C{rbd-fuse -r IMAGE} closes
its image when it is unmounted, so every unmap releases the image cleanly,
and a dead process means exactly one image may hold a stale lock.  Measured
here: about 34 MB of RSS each (up to ~50 MB while librbd's 32 MB cache
fills), map in ~130 ms (rbd-fuse start 50-70 ms, losetup ~30 ms), unmap in
~35 ms.  The processes run in their own session: they must outlive a
txgraph restart, as mounted containers depend on them (a systemd unit needs
C{KillMode=process} or C{mixed}).

Nothing here looks into a FUSE mount with stat(2) or open(2) in-process: a
FUSE request blocks until rbd-fuse answers, which it may never do while the
cluster is down.  Mounts are found in the mount table and loop devices in
C{/sys/block/loop*/loop/backing_file} (what C{losetup -l} prints), and the
one open that must go through FUSE is losetup's, in a killable process
under a timeout.

Every external command runs with a timeout; all of this blocks and runs in
backend threads.  The modules: L{base} (the interface and what every mapper
shares), L{krbd}, L{nbd} and L{fuse}; L{MAPPERS} names them for the
C{mapper} option.
"""

from __future__ import annotations

from txgraph.backends.rbd.mappers.base import Mapper
from txgraph.backends.rbd.mappers.fuse import FuseMapper
from txgraph.backends.rbd.mappers.krbd import KernelMapper
from txgraph.backends.rbd.mappers.nbd import NBDMapper

MAPPERS: dict[str, type[Mapper]] = {
    m.name: m for m in (KernelMapper, NBDMapper, FuseMapper)
}

#: The order C{mapper=auto} tries them in: fastest first.
AUTO_ORDER = ("krbd", "nbd", "fuse")
