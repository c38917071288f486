"""
The rbd backend's devices and views: choosing the mapper, finding,
making and detaching mappings (L{Devices.mappings}, L{Devices.release}),
mounting a device (a layer's own mount under C{mnt/}, temporary work
mounts under C{work/}, written back to the cluster while an extraction
runs), read-only views of a layer's tree for diffs, and what each mapping
read from the cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from twisted.logger import Logger

from txgraph import mounts
from txgraph.backends import LayerInfo
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.mappers import AUTO_ORDER, MAPPERS
from txgraph.backends.rbd.mappers.base import Mapper, Mapping
from txgraph.backends.rbd.mappers.fuse import FuseMapper
from txgraph.backends.rbd.metadata import K_STATE, ROOTFS, TAG
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import Settings
from txgraph.errors import BackendError

log = Logger()

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096


class Devices:
    """
    This node's mappers and the mappings and mounts made with them.

    @ivar mappers: every mapper, by name; C{unavailable}: why each cannot
        work here (None if it can).
    @ivar mapper: the one new mappings are made with, once chosen.
    """

    def __init__(self, settings: Settings, names: Names, cluster: Cluster) -> None:
        self.settings = settings
        self.names = names
        self.cluster = cluster
        self.mapper: Mapper | None = None
        self.mappers: dict[str, Mapper] = {}
        self.unavailable: dict[str, str | None] = {}

    def reap(self) -> None:
        """
        Collect the rbd-fuse children that have exited.
        """
        for mapper in self.mappers.values():
            if isinstance(mapper, FuseMapper):
                mapper.reap()

    def choose(self) -> None:
        """
        Ask every mapper whether it works here and choose the one to map with
        (the C{mapper} option, or the fastest that works).
        """
        for name, cls in MAPPERS.items():
            mapper = cls(self.names.access, self.names.root)
            mapper.dead = self.cluster.suspect
            self.mappers[name] = mapper
            self.unavailable[name] = mapper.unavailable()
        if self.settings.mapper_choice == "auto":
            for name in AUTO_ORDER:
                if self.unavailable[name] is None:
                    self.mapper = self.mappers[name]
                    return
            raise BackendError(
                "rbd backend: no way to map RBD images on this host: "
                + "; ".join(f"{n}: {self.unavailable[n]}" for n in AUTO_ORDER)
            )
        reason = self.unavailable[self.settings.mapper_choice]
        if reason is not None:
            raise BackendError(
                f"rbd backend: mapper {self.settings.mapper_choice} is not available here: {reason} "
                f"(use txgraph.rbd.mapper=auto to pick one that is)"
            )
        self.mapper = self.mappers[self.settings.mapper_choice]

    def usable(self) -> list[Mapper]:
        """
        The mappers that work on this host.
        """
        return [m for n, m in self.mappers.items() if self.unavailable.get(n) is None]

    def cluster_reads(self, sizes: bool = True) -> dict[str, dict[str, Any]]:
        """
        Per mounted layer: the bytes its mapping read from the cluster
        through librbd (lazily: a clone reads its parents' blocks only when
        they are read), as the mapping's performance counters give them;
        with C{sizes}, the image's size too (a cluster call per layer:
        without it, nothing but the local admin sockets is asked).
        """
        result: dict[str, dict[str, Any]] = {}
        if not os.path.isdir(self.names.mnt):
            return result
        for key in sorted(os.listdir(self.names.mnt)):
            if not TAG.match(key) or not mounts.is_mountpoint(os.path.join(self.names.mnt, key)):
                continue
            name = f"{self.names.stem}{key}"
            # A layer's own mapping is tagged with its key; asking its admin
            # socket directly spares a scan of every process per layer.
            for mapper in self.usable():
                counters = mapper.read_counters({"tag": key, "image": name})
                if counters is not None:
                    state = self.cluster.inspect(name) if sizes else None
                    result[self.names.layer_of(key)] = {
                        "image": self.names.spec(name),
                        "bytes_read": counters["rd_bytes"],
                        "reads": counters["rd"],
                        "image_size": state.size if state else None,
                    }
                    break
        return result

    def cleanup_leftovers(self) -> None:
        """
        Temporary mounts and mappings a crash left (a layer's own mapping
        and mount are the layer machine's to recover).
        """
        for point in mounts.mounted_under(self.names.work):
            mounts.unmount(point)
        for mapper in self.usable():
            mapper.cleanup_tags(".")
        for name in os.listdir(self.names.work):
            shutil.rmtree(os.path.join(self.names.work, name), ignore_errors=True)

    def mappings(self, name: str, tag: str | None = None) -> list[Mapping]:
        """
        Every mapping of an image on this host, by reality.
        """
        found: list[Mapping] = []
        for mapper in self.usable():
            found += mapper.find(name, tag)
        return found

    def mapper_for(self, mapping: Mapping) -> Mapper:
        """
        The mapper that made a recorded mapping.
        """
        mapper = self.mappers.get(mapping.get("mapper", ""))
        if mapper is None:
            raise BackendError(f"unknown mapper in mapping {mapping!r}")
        return mapper

    def unmap(self, mapping: Mapping) -> None:
        """
        Detach a mapping with the mapper that made it.
        """
        self.mapper_for(mapping).unmap(mapping)

    def map_temporary(self, name: str, readonly: bool, bulk_write: bool = False) -> Mapping:
        """
        Map an image for a moment (a tag of its own, cleaned up at start after
        a crash); read-write mappings break the locks of dead clients first.
        """
        assert self.mapper is not None
        if not readonly:
            self.cluster.clear_stale_clients(name)
        tag = f".tmp-{os.urandom(6).hex()}"
        return self.mapper.map(name, readonly=readonly, tag=tag, bulk_write=bulk_write)

    def mount_data(self, readonly: bool) -> str:
        """
        The filesystem's mount options.
        """
        options = []
        if self.settings.fs == "xfs":
            # Clones share their parent's filesystem UUID.
            options.append("nouuid")
        elif not readonly:
            options.append("noinit_itable")
        if self.settings.mount_options:
            options.append(self.settings.mount_options)
        return ",".join(options)

    def mount_device(self, device: str, target: str, readonly: bool) -> None:
        """
        Mount a device's filesystem on C{target}.
        """
        flags = MS_RDONLY if readonly else 0
        try:
            mounts.mount(device, target, self.settings.fs, flags, self.mount_data(readonly))
        except OSError as e:
            raise BackendError(
                f"mount {self.settings.fs} from {device} on {target}"
                f"{' read-only' if readonly else ''}: {e.strerror}"
            ) from None

    @contextlib.contextmanager
    def work_mount(
        self, name: str, readonly: bool, bulk_write: bool = False
    ) -> Iterator[tuple[str, str]]:
        """
        A temporary mapping and mount of an image; yields the mount's top
        directory and the device.  Always cleaned up.  C{bulk_write}: for
        an extraction, which is written back to the cluster while it runs
        (L{mounts.written_back}).
        """
        mapping = self.map_temporary(name, readonly, bulk_write)
        try:
            with self.device_mounted(mapping["device"], readonly, prefix="work-") as top:
                with mounts.written_back(top) if bulk_write else contextlib.nullcontext():
                    yield top, mapping["device"]
        finally:
            self.unmap(mapping)

    @contextlib.contextmanager
    def device_mounted(self, device: str, readonly: bool, prefix: str) -> Iterator[str]:
        """
        A device mounted on a new directory under C{work/}; yields the
        directory.  Always unmounted and removed.
        """
        top = tempfile.mkdtemp(prefix=prefix, dir=self.names.work)
        try:
            self.mount_device(device, top, readonly)
            try:
                yield top
            finally:
                mounts.unmount(top)
        finally:
            os.rmdir(top)

    @contextlib.contextmanager
    def view(self, layer_id: str, mapping: Mapping | None = None) -> Iterator[str]:
        """
        The layer's tree, read-only: a bind of its mount if it is mounted,
        else a read-only mount of its device if it rests mapped (a device
        kept after its last Put or since its Create: C{mapping}, as
        recorded), else a temporary read-only mapping.
        """
        name = self.names.image_name(layer_id)
        mounted = self.names.mountpoint(layer_id)
        if mounts.is_mountpoint(mounted):
            target = tempfile.mkdtemp(prefix="view-", dir=self.names.work)
            try:
                mounts.mount(os.path.join(mounted, ROOTFS), target, "none", MS_BIND)
                try:
                    mounts.mount("none", target, "none", MS_BIND | MS_REMOUNT | MS_RDONLY)
                    yield target
                finally:
                    mounts.unmount(target)
            finally:
                os.rmdir(target)
            return
        if (
            mapping is not None
            and mapping.get("mapper") in self.mappers
            and self.mapper_for(mapping).alive(mapping)
        ):
            # The layer's own device, unmounted: its data went through its
            # own client, which another client may not see yet.
            with self.device_mounted(mapping["device"], readonly=True, prefix="view-") as top:
                yield os.path.join(top, ROOTFS)
            return
        if self.cluster.inspect(name) is None:
            raise BackendError(f"layer {layer_id} has no image {self.names.spec(name)}")
        with self.work_mount(name, readonly=True) as (top, _device):
            yield os.path.join(top, ROOTFS)

    @contextlib.contextmanager
    def views(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> Iterator[tuple[str, str | None]]:
        """
        Read-only views of the layer and of C{parent} (an ancestor), or None
        for no parent.
        """
        if parent is not None and parent not in [a.id for a in chain]:
            raise BackendError(
                f"layer {parent} is not an ancestor of {layer.id}; diffs are only "
                "taken against ancestors"
            )
        with self.view(layer.id, layer.mapping) as new:
            if parent is None:
                yield new, None
            else:
                recorded = next(a.mapping for a in chain if a.id == parent)
                with self.view(parent, recorded) as old:
                    yield new, old

    def map_layer(self, layer: LayerInfo, name: str) -> Mapping:
        """
        Map the layer's own image: read-only once committed, else read-write
        (marked dirty first).
        """
        assert self.mapper is not None
        state = self.cluster.require(name)
        readonly = state.committed
        if not readonly:
            self.cluster.clear_stale_clients(name)
            if state.meta.get(K_STATE) != "dirty":
                self.cluster.set_meta(name, {K_STATE: "dirty"})
        return self.mapper.map(name, readonly=readonly, tag=self.names.key(layer.id))

    def release(self, layer_id: str, name: str, recorded: Mapping | None) -> None:
        """
        Unmount the layer's mount and detach its own mappings.
        """
        self.unmount(layer_id)
        found = self.mappings(name, self.names.key(layer_id))
        targets = list(found)
        if recorded is not None and recorded.get("mapper") in self.mappers:
            if not any(m["alive"] and m["device"] == recorded.get("device") for m in found):
                # Its process or device is gone: a client may have died
                # holding the image's lock.
                self.cluster.suspect(name)
            if not any(m["device"] == recorded.get("device") for m in found):
                targets.insert(0, recorded)
        if any(not m["alive"] for m in found):
            self.cluster.suspect(name)
        for mapping in targets:
            self.unmap(mapping)

    def live_mapping(self, layer: LayerInfo, name: str) -> Mapping | None:
        """
        The layer's own mapping if one is alive: the recorded one, or one
        found by reality.
        """
        recorded = layer.mapping
        if recorded is not None and recorded.get("mapper") in self.mappers:
            if self.mapper_for(recorded).alive(recorded):
                return recorded
            self.cluster.suspect(name)
        for mapping in self.mappings(name, self.names.key(layer.id)):
            if mapping["alive"]:
                return mapping
        return None

    def mount_layer(self, layer: LayerInfo, mapping: Mapping) -> str:
        """
        Mount the layer's device at its mount point (unless it is mounted
        there already); return its C{rootfs}.
        """
        target = self.names.mountpoint(layer.id)
        device = mapping["device"]
        current = [e for e in mounts.mount_table(naming=target) if e.mountpoint == target]
        if current:
            if current[-1].source == device:
                return os.path.join(target, ROOTFS)
            self.unmount(layer.id)
        return self.mount_rootfs(device, target, bool(mapping.get("readonly")))

    def mount_rootfs(self, device: str, target: str, readonly: bool) -> str:
        """
        Mount a layer's device on C{target} (made if missing); return its
        C{rootfs}, the layer's tree.  A filesystem without one is unmounted
        again and refused.
        """
        os.makedirs(target, mode=0o700, exist_ok=True)
        self.mount_device(device, target, readonly)
        rootfs = os.path.join(target, ROOTFS)
        if not os.path.isdir(rootfs):
            mounts.unmount(target)
            raise BackendError(f"the filesystem on {device} has no {ROOTFS}/ directory")
        return rootfs

    def unmount(self, layer_id: str) -> None:
        """
        Unmount the layer's mount and anything mounted below it.
        """
        for point in mounts.mounted_under(self.names.mountpoint(layer_id)):
            mounts.unmount(point)

    def mapping_tags(self, mapper: Mapper) -> list[tuple[str, str]]:
        """
        (tag, image) of every mapping that C{mapper} holds for this node;
        kernel and nbd mappings carry no tag, so gc cannot attribute them.
        """
        if not isinstance(mapper, FuseMapper):
            return []
        try:
            tags = sorted(os.listdir(mapper.fuse_root))
        except FileNotFoundError:
            return []
        result = []
        for tag in tags:
            if tag.startswith("."):
                continue
            image = f"{self.names.stem}{tag}" if TAG.match(tag) else ""
            if image and mapper.find(image, tag):
                result.append((tag, image))
        return result
