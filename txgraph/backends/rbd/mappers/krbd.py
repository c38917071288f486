"""
Mappers driven through C{rbd device map/unmap/list -t TYPE}
(L{RBDDeviceMapper}), and the kernel's rbd client (L{KernelMapper},
C{/dev/rbdN}).  rbd-nbd (L{txgraph.backends.rbd.mappers.nbd}) is driven the
same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import ClassVar

from txgraph.backends.rbd.mappers.base import (
    Mapper,
    Mapping,
    device_readonly,
    run,
    unmount_device,
    wait_for_device,
)
from txgraph.errors import BackendError


class RBDDeviceMapper(Mapper):
    """
    Mappers driven through C{rbd device map/unmap/list -t TYPE}.
    """

    device_type: ClassVar[str]

    def _rbd(self, *args: str, what: str) -> str:
        return run(
            ["rbd", *self.access.cli_args(), "device", *args, "-t", self.device_type],
            what,
            self.access.timeout,
        )

    def map(
        self,
        image: str,
        *,
        readonly: bool,
        tag: str,
        bulk_write: bool = False,
        started: Mapping | None = None,
    ) -> Mapping:
        args = ["map", "--pool", self.access.pool]
        if self.access.namespace:
            args += ["--namespace", self.access.namespace]
        if readonly:
            args.append("--read-only")
        what = f"map {self.access.image_spec(image)} with {self.name}"
        device = self._rbd(*args, image, what=what).strip().splitlines()[-1:]
        if not device or not device[0].startswith("/dev/"):
            # Some versions print nothing: look the device up.
            found = [m for m in self.find(image) if m["alive"]]
            if not found:
                raise BackendError(f"{what}: rbd printed no device")
            return found[0] | {"readonly": readonly, "tag": tag}
        try:
            wait_for_device(device[0], self.access.timeout, what)
        except BackendError:
            self.unmap({"device": device[0], "image": image})
            raise
        return {
            "mapper": self.name,
            "device": device[0],
            "image": image,
            "readonly": readonly,
            "tag": tag,
        }

    def unmap(self, mapping: Mapping) -> None:
        device = mapping.get("device")
        image = mapping.get("image", "")
        if not device:
            return
        current = [m for m in self.find(image) if m["device"] == device]
        if not current:
            return
        unmount_device(device)
        self._rbd("unmap", device, what=f"unmap {device} ({self.access.image_spec(image)})")

    def find(self, image: str, tag: str | None = None) -> list[Mapping]:
        out = self._rbd("list", "--format", "json", what=f"list {self.name} devices")
        try:
            entries = json.loads(out or "[]")
        except ValueError:
            raise BackendError(f"list {self.name} devices: unexpected output {out[:200]!r}") from None
        found = []
        for entry in entries:
            name = entry.get("name", entry.get("image"))
            if (
                name == image
                and entry.get("pool") == self.access.pool
                and (entry.get("namespace") or None) == self.access.namespace
                and entry.get("snap", "-") in ("-", "", None)
            ):
                found.append(
                    {
                        "mapper": self.name,
                        "device": entry["device"],
                        "image": image,
                        "readonly": device_readonly(entry["device"]),
                        "tag": tag,
                        "alive": os.path.exists(entry["device"]),
                    }
                )
        return found


def modprobe(module: str) -> None:
    """
    Load a kernel module if modprobe exists (failures are left to the check
    that follows).
    """
    modprobe = shutil.which("modprobe")
    if modprobe is None:
        return
    try:
        subprocess.run(
            [modprobe, module],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


class KernelMapper(RBDDeviceMapper):
    """
    The kernel's rbd client (C{/dev/rbdN}).
    """

    name = "krbd"
    device_type = "krbd"

    def unavailable(self) -> str | None:
        if shutil.which("rbd") is None:
            return "the rbd command is missing (install ceph-common)"
        if not os.path.isdir("/sys/bus/rbd"):
            modprobe("rbd")
        if not os.path.isdir("/sys/bus/rbd"):
            return "this kernel has no rbd module (/sys/bus/rbd is missing)"
        return None
