"""containerd's ``mount`` package (v1.6.20, Linux), ported for the suite:
``mount.All`` mounts what a snapshotter returns exactly as containerd does
(option parsing, propagation flags, the read-only bind remount, the chdir
that keeps a long overlay ``lowerdir`` under a page), and ``UnmountAll``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from txgraph import mounts
from txgraph.api.containerd.proto import mount_pb2

#: containerd's mount option table (mount/mount_linux.go): option -> (clear, flag).
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, 16),  # MS_SYNCHRONOUS
    "atime": (True, 1024),  # MS_NOATIME
    "bind": (False, 4096),
    "defaults": (False, 0),
    "dev": (True, 4),
    "diratime": (True, 2048),
    "dirsync": (False, 128),
    "exec": (True, 8),
    "mand": (False, 64),
    "noatime": (False, 1024),
    "nodev": (False, 4),
    "nodiratime": (False, 2048),
    "noexec": (False, 8),
    "nomand": (True, 64),
    "norelatime": (True, 1 << 21),
    "nostrictatime": (True, 1 << 24),
    "nosuid": (False, 2),
    "rbind": (False, 4096 | 16384),
    "relatime": (False, 1 << 21),
    "remount": (False, 32),
    "ro": (False, 1),
    "rw": (True, 1),
    "strictatime": (False, 1 << 24),
    "suid": (True, 2),
    "sync": (False, 16),
}
_PROPAGATION = {
    "private": 1 << 18, "rprivate": (1 << 18) | 16384,
    "shared": 1 << 20, "rshared": (1 << 20) | 16384,
    "slave": 1 << 19, "rslave": (1 << 19) | 16384,
    "unbindable": 1 << 17, "runbindable": (1 << 17) | 16384,
}
_PTYPES = (1 << 18) | (1 << 20) | (1 << 19) | (1 << 17)
_MS_REC, _MS_SILENT, _MS_REMOUNT = 16384, 32768, 32
_MS_BIND, _MS_RDONLY = 4096, 1


def parse_mount_options(options: Sequence[str]) -> tuple[int, str]:
    """(flags, data) from fstab-style options, as containerd's parseMountOptions."""
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            flags |= _PROPAGATION[option]
        elif option == "loop":
            raise NotImplementedError("loop mounts are not supported by the suite's mounter")
        else:
            data.append(option)
    return flags, ",".join(data)


def compact_lowerdir_option(options: Sequence[str]) -> tuple[str, list[str]]:
    """containerd's compactLowerdirOption: (directory to chdir into, options
    with ``lowerdir`` relative to it), or ("", options) if there is nothing to gain."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return "", list(options)
    dirs = options[index].removeprefix("lowerdir=").split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = os.path.commonprefix(dirs)
    if not common:
        return "", list(options)
    # containerd assumes ${root}/snapshots/<id>/fs: step back to the parent dir.
    common = os.path.dirname(common)
    if common in ("/", ""):
        return "", list(options)
    common += "/"
    new = [o for i, o in enumerate(options) if i != index]
    new.append("lowerdir=" + ":".join(d[len(common):] for d in dirs))
    return common, new


_MOUNT_IN_CWD = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
source, target, fstype, flags, data = sys.argv[1:]
if libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(int(flags)),
              data.encode()) != 0:
    err = ctypes.get_errno()
    sys.exit(f"mount {fstype} on {target}: {os.strerror(err)}")
"""


def mount_one(m: mount_pb2.Mount, target: str) -> None:
    """Mount ``m`` on ``target`` as containerd's (*Mount).Mount does on Linux.

    An option string too long for mount(2)'s one page has its lowerdirs made
    relative and is mounted from a child process that chdirs first (Go forks
    too: the working directory is the whole process's).
    """
    options = list(m.options)
    chdir = ""
    if sum(len(o) + 1 for o in options) >= mounts.PAGE_SIZE - 512:
        chdir, options = compact_lowerdir_option(options)
    flags, data = parse_mount_options(options)
    if len(data) > mounts.PAGE_SIZE:
        raise OSError(f"mount options too long for {target}: {len(data)} bytes")
    oflags = flags & ~_PTYPES
    if not flags & _MS_REMOUNT or data:
        if chdir:
            result = subprocess.run(
                [sys.executable, "-c", _MOUNT_IN_CWD, m.source, target, m.type, str(oflags), data],
                cwd=chdir, capture_output=True, text=True, timeout=60,
            )
            if result.returncode != 0:
                raise OSError(result.stderr.strip())
        else:
            mounts.mount(m.source, target, m.type, oflags, data)
    if flags & _PTYPES:
        mounts.mount("", target, "", flags & (_PTYPES | _MS_REC | _MS_SILENT))
    if oflags & (_MS_BIND | _MS_RDONLY) == _MS_BIND | _MS_RDONLY:
        mounts.mount("", target, "", oflags | _MS_REMOUNT)


def mount_all(ms: Sequence[mount_pb2.Mount], target: str | Path) -> None:
    """Mount every mount on ``target``, in order (mount.All)."""
    for m in ms:
        mount_one(m, os.fspath(target))


def unmount_all(target: str | Path) -> None:
    """Unmount ``target`` until nothing is mounted there (mount.UnmountAll)."""
    path = os.path.realpath(target)
    while mounts.is_mountpoint(path):
        mounts.unmount(path)


# -- helpers.go ----------------------------------------------------------------------
