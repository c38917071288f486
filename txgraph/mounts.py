"""
Mounting and unmounting, and reading the kernel's mount table.

mount(2) and umount2(2) are called directly through ctypes: a mount is on
the hot path of every C{docker run}, and forking mount(8) would cost more
than the mount itself.  All of this blocks and runs in backend threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from txgraph.errors import BackendError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

#: mount(2) takes at most one page of option data.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# linux/loop.h
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
#: struct loop_config: fd, block_size, struct loop_info64 (device, inode,
#: rdevice, offset, sizelimit, number, encrypt_type, encrypt_key_size,
#: flags, file_name[64], crypt_name[64], encrypt_key[32], init[2]), and
#: 8 reserved u64.
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s QQ 64x")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """
    mount(2); raises L{OSError} with the errno on failure.
    """
    if _libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode()
    ) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def unmount(target: str, attempts: int = 50, delay: float = 0.1) -> None:
    """
    Unmount C{target}, retrying while it is busy (a container's processes
    may still be exiting), then detaching it lazily as a last resort.  An
    already-unmounted target is not an error.
    """
    for _ in range(attempts):
        if _libc.umount2(target.encode(), UMOUNT_NOFOLLOW) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            # Not a mount point (any more), or gone.
            return
        if err != errno.EBUSY:
            raise BackendError(f"unmount {target}: {os.strerror(err)}")
        time.sleep(delay)
    if _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise BackendError(f"unmount {target}: {os.strerror(err)}")


def loop_backing_files() -> dict[str, str]:
    """
    Every attached loop device and the file behind it.
    """
    result: dict[str, str] = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return result
    for name in names:
        if not name.startswith("loop"):
            continue
        backing = _backing_file(name)
        if backing is not None:
            result[f"/dev/{name}"] = backing
    return result


def loop_backing_file(device: str) -> str | None:
    """
    The file behind one loop device (C{/dev/loopN}), or None if it is not
    attached: one read, where L{loop_backing_files} reads every loop
    device's (a host with a hundred mapped layers has a hundred).
    """
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    return _backing_file(name)


def _backing_file(name: str) -> str | None:
    try:
        with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
            backing = f.read().decode("utf-8", "surrogateescape").rstrip("\n")
    except OSError:
        return None
    if backing.endswith(" (deleted)"):
        backing = backing[: -len(" (deleted)")]
    return backing


def mount_loop(image: str, target: str, fstype: str, attempts: int = 8) -> None:
    """
    Mount the filesystem in the file C{image} at C{target} through a loop
    device that detaches itself when the last mount of it goes
    (C{LO_FLAGS_AUTOCLEAR}, as C{mount -o loop} does): a free one
    (C{LOOP_CTL_GET_FREE}, as C{losetup --find}), or the one that already
    serves C{image}, so that the filesystem is never mounted through two
    devices at once.  Raises L{OSError} on failure.
    """
    path = os.path.abspath(image)
    for device, backing in loop_backing_files().items():
        if backing == path:
            mount(device, target, fstype)
            return
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    backing_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(attempts):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                config = _LOOP_CONFIG.pack(
                    backing_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                    os.fsencode(path)[:63], b"", b"", 0, 0,
                )
                try:
                    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        continue  # Taken by someone else since GET_FREE.
                    raise
                # Our descriptor keeps the device until the mount holds it.
                mount(device, target, fstype)
                return
            finally:
                os.close(loop_fd)
        raise OSError(errno.EBUSY, "no free loop device", path)
    finally:
        os.close(backing_fd)
        os.close(control)


@dataclass(frozen=True)
class MountEntry:
    """
    One line of /proc/self/mountinfo.
    """

    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


#: Characters the kernel escapes in mountinfo's fields (as \ooo: space,
#: tab, newline and backslash in paths; options escape commas too, and
#: overlayfs separates its lower directories with colons).
_ESCAPED = " \t\n\\,:"


def mount_table(path: str = "/proc/self/mountinfo", naming: str | None = None) -> list[MountEntry]:
    """
    The current mounts, parsed; with C{naming}, only those whose line holds
    that path (as mount point, root, source or in the options): the lines
    that cannot are skipped before they are parsed.  On a host with a
    hundred containers (about 220 lines, overlay options of ~1 KB) a full
    parse took 570 us, the filtered one 100 us.  A path holding one of
    the characters the kernel escapes is looked for in every line.
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        # Lines end in "\n" only (a path's newline is escaped); not
        # splitlines(), which also splits at characters a path may hold.
        lines = f.read().split("\n")
    if naming is not None and not any(c in naming for c in _ESCAPED):
        lines = [line for line in lines if naming in line]
    entries = []
    for line in lines:
        # Fields are separated by one space (a path's spaces are escaped);
        # not split(), which also splits at other whitespace a path may hold.
        fields = line.split(" ")
        if not line:
            continue
        sep = fields.index("-")
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                options=fields[sep + 3] if len(fields) > sep + 3 else "",
            )
        )
    return entries


def mounted_under(prefix: str) -> list[str]:
    """
    Mount points at or below C{prefix}, deepest first (the order to
    unmount them in).
    """
    prefix = prefix.rstrip("/")
    points = {
        e.mountpoint
        for e in mount_table(naming=prefix)
        if e.mountpoint == prefix or e.mountpoint.startswith(prefix + "/")
    }
    return sorted(points, key=lambda p: (-p.count("/"), p))


class MountWatch:
    """
    Wakes when the mount table changes: the kernel marks an open
    C{/proc/self/mountinfo} with POLLPRI on every mount or unmount in the
    namespace, so a waiter sleeps until then rather than polling on a
    timer.  Open it I{before} looking at the table: a change after the open
    is never missed.
    """

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI | select.POLLERR)

    def wait(self, timeout: float) -> None:
        """
        Return when the table changed since the last call (or the open),
        or after C{timeout} seconds.
        """
        self._poll.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> MountWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def syncfs(fd: int) -> None:
    """
    syncfs(2): write the filesystem holding the open file C{fd} back to
    its device, and wait for it; raises L{OSError} with the errno.
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def written_back(path: str, pause: float = 0.02) -> Iterator[None]:
    """
    While the body runs, write the filesystem mounted at C{path} back to
    its device again and again: L{syncfs} in a thread of its own, C{pause}
    seconds apart.

    For a bulk write onto a device whose writes are slow (an extraction
    onto an RBD mapping): the kernel starts writeback only when a share of
    all memory is dirty (gigabytes) or after 30 s, so the whole extraction
    would otherwise wait in the page cache and be written at the unmount,
    after the writer is done.  Here the writeback runs alongside the
    writer without throttling it, and the unmount finds little left.  A
    failing syncfs only ends the loop: the unmount still writes everything.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stop = threading.Event()

    def loop() -> None:
        with contextlib.suppress(OSError):
            while True:
                syncfs(fd)
                if stop.wait(pause):
                    return

    thread = threading.Thread(target=loop, name=f"txgraph writeback {path}", daemon=True)
    try:
        thread.start()
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        os.close(fd)


def is_mountpoint(path: str) -> bool:
    """
    Whether something is mounted exactly at C{path}.
    """
    return any(e.mountpoint == path for e in mount_table(naming=path))
