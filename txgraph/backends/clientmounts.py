"""
The overlay backend's answers to containerd, which mounts snapshots
itself: the mounts containerd's overlayfs snapshotter returns (its
C{mounts()} in overlay.go), the short links that name lower directories
in them, and continuity's C{fs.DiskUsage} for Usage.

Lower directories are named by links in one directory (C{.links/<name>},
20 characters of base 32), as moby's overlay2 does with C{l/}: containerd's
C{mount.All} makes them relative to their common directory when the
options exceed a page, and 128 of them fit in one only when they are this
short.  A link's name is derived from the layer's ID, never recorded, so
it is found again after a crash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat

from txgraph.backends import MountSpec
from txgraph.errors import BackendError


def link_name(layer_id: str) -> str:
    """
    The name of a layer's link: 20 base-32 characters of the SHA-256 of
    its ID (100 bits: no two layers meet).
    """
    digest = hashlib.sha256(layer_id.encode()).digest()
    return base64.b32encode(digest).decode().lower()[:20]


def ensure_link(links: str, name: str, directory: str) -> str:
    """
    The link C{links/name} to C{directory} (relative), made if missing;
    one that points elsewhere is a L{BackendError}.
    """
    link = os.path.join(links, name)
    target = os.path.relpath(directory, links)
    try:
        os.symlink(target, link)
    except FileExistsError:
        if os.readlink(link) != target:
            raise BackendError(
                f"overlay link {link} points to {os.readlink(link)}, not {target}"
            ) from None
    return link


def overlay_specs(
    own: str,
    work: str,
    parents: list[str],
    links: list[str],
    view: bool,
    extra: list[str],
) -> list[MountSpec]:
    """
    containerd's overlayfs mounts of a snapshot whose own directory is
    C{own} (C{work} its work directory) over C{parents} (nearest first;
    C{links} name them): without parents, a bind of C{own} (read-only for
    a view); a view of one parent, a read-only bind of it; otherwise an
    overlay with C{workdir} and C{upperdir} for an active snapshot and the
    parents as C{lowerdir}.
    """
    if not parents:
        return [MountSpec("bind", own, ("ro" if view else "rw", "rbind"))]
    if view and len(parents) == 1:
        return [MountSpec("bind", parents[0], ("ro", "rbind"))]
    options = [] if view else [f"workdir={work}", f"upperdir={own}"]
    options += extra
    options.append("lowerdir=" + ":".join(links))
    return [MountSpec("overlay", "overlay", tuple(options))]


def disk_usage(root: str) -> tuple[int, int]:
    """
    continuity's C{fs.DiskUsage}: every inode below C{root} (C{root} too)
    once, its allocated blocks in 512-byte units; (bytes, inodes).
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError), os.scandir(path) as listing:
                stack.extend(entry.path for entry in listing)
    return size, len(seen)
