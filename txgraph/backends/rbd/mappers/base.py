"""
What every mapper shares: how command-line tools reach the cluster
(L{ClusterAccess}), running a tool under a timeout (L{run}), a Ceph admin
socket command, waiting for a device node, unmounting a device, whether a
device is read-only, and the L{Mapper} interface itself.
"""

from __future__ import annotations

import abc
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from txgraph import mounts
from txgraph.errors import BackendError

#: What a mapping dict looks like (persisted as JSON by the layer machine).
Mapping = dict[str, Any]


@dataclass(frozen=True)
class ClusterAccess:
    """
    How command-line tools reach the cluster and the pool.

    @ivar client: the client id, without C{client.}.
    @ivar keyring: a keyring path, or None to use the one ceph.conf names.
    @ivar namespace: the RBD namespace, or None for the pool's default one.
    @ivar timeout: seconds allowed to each command.
    """

    conf: str
    client: str
    keyring: str | None
    pool: str
    namespace: str | None
    timeout: float

    def cli_args(self) -> list[str]:
        """
        The options every Ceph tool takes to reach the cluster as our client.
        """
        args = ["--conf", self.conf, "--id", self.client]
        if self.keyring:
            args += ["--keyring", self.keyring]
        return args

    def image_spec(self, image: str) -> str:
        """
        C{pool/[namespace/]image}, as the rbd CLI writes it.
        """
        if self.namespace:
            return f"{self.pool}/{self.namespace}/{image}"
        return f"{self.pool}/{image}"


def run(
    command: Sequence[str],
    what: str,
    timeout: float,
    env: dict[str, str] | None = None,
    ok: Sequence[int] = (0,),
) -> str:
    """
    Run a command to completion within C{timeout} seconds and return its
    standard output; a failure (an exit status not in C{ok}) or timeout is
    a L{BackendError} saying C{what} was being done and the command's last
    line of error output.
    """
    try:
        proc = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"{what}: {command[0]} did not finish within {timeout:g} s"
        ) from None
    except OSError as e:
        raise BackendError(f"{what}: cannot run {command[0]}: {e.strerror}") from None
    if proc.returncode not in ok:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else "no error message"
        raise BackendError(
            f"{what}: {command[0]} failed (exit {proc.returncode}): {detail}"
        )
    return proc.stdout


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise ValueError("the admin socket closed early")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def admin_socket_command(path: str, command: dict[str, Any], timeout: float = 2.0) -> Any:
    """
    One command on a Ceph admin socket (what C{ceph daemon PATH ...} does):
    the JSON command and a NUL out, a 4-byte big-endian length and the JSON
    reply back.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(command).encode() + b"\0")
        (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
        return json.loads(_recv_exactly(sock, length))


def wait_for_device(device: str, timeout: float, what: str) -> None:
    """
    Wait until the block device node exists (udev may create it late).
    """
    deadline = time.monotonic() + timeout
    while not os.path.exists(device):
        if time.monotonic() > deadline:
            raise BackendError(f"{what}: device {device} did not appear within {timeout:g} s")
        time.sleep(0.01)


def unmount_device(device: str) -> None:
    """
    Unmount every mount of C{device} (deepest first).
    """
    points = [e.mountpoint for e in mounts.mount_table(naming=device) if e.source == device]
    for point in sorted(set(points), key=lambda p: (-p.count("/"), p)):
        for sub in mounts.mounted_under(point):
            mounts.unmount(sub)


class Mapper(abc.ABC):
    """
    Attaches RBD images of one pool (and namespace) as local block devices.

    @cvar name: the mapper's name, as the C{mapper} option spells it.
    """

    name: ClassVar[str]

    def __init__(self, access: ClusterAccess, workdir: str) -> None:
        self.access = access
        self.workdir = workdir
        #: Told the image name when a client of it was found dead or had to
        #: be killed (it may have left its lock behind).
        self.dead: Callable[[str], None] = lambda image: None

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """
        Why this mapper cannot work on this host, or None if it can.
        """

    @abc.abstractmethod
    def map(
        self,
        image: str,
        *,
        readonly: bool,
        tag: str,
        bulk_write: bool = False,
        started: Mapping | None = None,
    ) -> Mapping:
        """
        Attach C{image}; wait for its device node; return the mapping.
        C{tag} names the mapping's purpose (a layer ID for a layer's own
        mapping, a unique name for a temporary one) where the mapper can
        record it.  C{bulk_write}: the mapping will mostly be written (an
        extraction), where a mapper has a faster way for that.
        C{started}: what L{start} returned for this image and tag.  On
        failure, nothing of the attempt is left behind.
        """

    def start(self, image: str, *, tag: str) -> Mapping | None:
        """
        Begin a mapping of C{image} under C{tag} before the image exists,
        where the mapper has slow work that does not need it (rbd-fuse's
        start and connection), so that it overlaps the image's creation.
        Returns what to pass to L{map} as C{started}, and to L{unmap} if
        the image is not made after all; None where there is nothing to
        start early.
        """
        return None

    @abc.abstractmethod
    def unmap(self, mapping: Mapping) -> None:
        """
        Detach a mapping: unmount what is still mounted from its device,
        then release the device.  Idempotent: what is gone is not an error.
        """

    @abc.abstractmethod
    def find(self, image: str, tag: str | None = None) -> list[Mapping]:
        """
        The mappings of C{image} that exist on this host (with C{tag}, if
        the mapper records tags), found from the kernel and the processes
        rather than from records; each has C{alive}: whether it still works.
        """

    def alive(self, mapping: Mapping) -> bool:
        """
        Whether a recorded mapping still exists and works.
        """
        return any(
            m["device"] == mapping.get("device") and m["alive"]
            for m in self.find(mapping.get("image", ""), mapping.get("tag"))
        )

    def cleanup_tags(self, prefix: str) -> None:
        """
        Unmap every mapping whose tag starts with C{prefix} (temporary
        mappings a crash left behind).  Mappers without tags do nothing.
        """

    def read_counters(self, mapping: Mapping) -> dict[str, int] | None:
        """
        How much the mapping read from the cluster (C{rd_bytes}, C{rd}), if
        the mapper can tell.  The kernel's rbd has no per-image counters
        that a host can read: None.
        """
        return None


def device_readonly(device: str) -> bool:
    """
    Whether a block device is read-only (C{/sys/block/NAME/ro}).
    """
    try:
        with open(f"/sys/block/{os.path.basename(device)}/ro") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
