"""
The rbd backend's layer images: a node's base image (formatted once), a
layer's image as a clone of its parent's snapshot or of a shared image
(grown and given to the container's root user as asked), made fresh again,
replaced by a clone of a shared image, or destroyed; and discarding a
candidate shared image that was never published.
"""

from __future__ import annotations

import contextlib
import os
import time

from twisted.logger import Logger

from txgraph import faults
from txgraph.backends import LayerInfo, storage_size
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.mappers.base import Mapping, run
from txgraph.backends.rbd.metadata import (
    CRASH_REPLACED,
    K_CHAIN,
    K_DEPTH,
    K_FORMATTED,
    K_FS,
    K_LAYER,
    K_OWNER,
    K_PARENT,
    K_STATE,
    NONE,
    ROOTFS,
    SNAP,
    ImageState,
    SharedGone,
    remove_snap,
)
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import MIN_SIZE, Settings
from txgraph.backends.rbd.trash import Trash
from txgraph.errors import BackendError, ConfigurationError

log = Logger()


class Clones:
    """
    Makes, remakes and destroys this node's images.
    """

    def __init__(
        self, settings: Settings, names: Names, cluster: Cluster, devices: Devices, trash: Trash
    ) -> None:
        self.settings = settings
        self.names = names
        self.cluster = cluster
        self.devices = devices
        self.trash = trash

    def destroy(self, layer_id: str, name: str) -> None:
        """
        Unmount, unmap and delete one of our layer images (and its snapshot).
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        self.cluster.handles.drop(name)
        self.devices.release(layer_id, name, None)
        state = self.cluster.inspect(name)
        if state is None:
            return
        if not self.names.ours(state):
            self.cluster.refuse_foreign(state)
        for mapping in self.devices.mappings(name):
            self.devices.unmap(mapping)
        if state.committed:
            self.cluster.drop_snapshot(name)
        for attempt in range(3):
            try:
                rbd.RBD().remove(self.cluster.ioctx, name)
                break
            except rbd.ImageNotFound:
                break
            except rbd.ImageBusy:
                # Still watched: by a dead client of ours (blocklist it),
                # or by a live one somewhere.
                if attempt == 2:
                    raise BackendError(
                        "the image is still open elsewhere (it has watchers); "
                        "is it mapped on this or another host?"
                    ) from None
                self.cluster.clear_stale_clients(name, watchers=True)
                time.sleep(0.2)
        self.cluster.forget(name)
        with self.cluster.lock:
            self.cluster.checked.discard(name)

    def clone(
        self,
        layer: LayerInfo,
        name: str,
        grow_to: int | None,
        shared: str | None = None,
        meta: dict[str, str] | None = None,
        source: ImageState | None = None,
    ) -> None:
        """
        Make the layer's image: a clone of its parent's snapshot (or of the
        shared image C{shared}, as looked at now, or as C{source} says: this
        node's own finished candidate), with its metadata (C{meta} added),
        grown (and root-owned as asked) if need be.
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        if shared is not None:
            parent = shared
            pstate = source if source is not None else self.cluster.shared_state(shared)
            if pstate is None:
                raise SharedGone(shared)
        else:
            parent = self.names.image_name(layer.parent) if layer.parent else self.names.base_image
            pstate = self.cluster.inspect(parent)
            what = f"parent layer {layer.parent}" if layer.parent else "the base image"
            if pstate is None or not self.names.ours(pstate):
                raise BackendError(f"{what} has no image {self.names.spec(parent)} of this node")
            if SNAP not in pstate.snaps or not pstate.snaps[SNAP][0]:
                raise BackendError(
                    f"{what} is not committed ({self.names.spec(parent)} has no protected @{SNAP})"
                )
        parent_size = pstate.snaps[SNAP][1]
        if grow_to is not None and grow_to < parent_size:
            raise ConfigurationError(
                f"storage option size={grow_to} is smaller than the layer's parent "
                f"({parent_size} bytes); it can only grow"
            )
        if shared is None and layer.parent is None and grow_to is None and self.settings.base_size > parent_size:
            grow_to = self.settings.base_size
        if grow_to == parent_size:
            grow_to = None
        depth = min(pstate.depth, 1 << 16) + 1
        origin = self.shared_origin(pstate) if shared is None else None
        try:
            if origin is not None:
                # The parent is an unchanged clone of a shared image: clone
                # that image instead.  Same tree, one level less to open for
                # this image and everything made from it (a container's
                # layer opens 4 images instead of 5 on a one-layer image).
                try:
                    rbd.RBD().clone(
                        self.cluster.ioctx, origin, SNAP, self.cluster.ioctx, name, data_pool=self.settings.data_pool
                    )
                    parent, depth = origin, depth - 1
                except (rbd.ImageNotFound, rbd.InvalidArgument):
                    origin = None
            if origin is None:
                rbd.RBD().clone(
                    self.cluster.ioctx, parent, SNAP, self.cluster.ioctx, name, data_pool=self.settings.data_pool
                )
        except (rbd.ImageNotFound, rbd.InvalidArgument) as e:
            if shared is None:
                raise
            # Removed, or being removed, by another node's gc since it was looked at.
            raise SharedGone(shared) from e
        # A new image has no clients yet, dead or alive; it starts with a
        # copy of its parent's metadata (librbd copies it), then gets its own.
        self.cluster.remember(
            ImageState(name=name, meta=dict(pstate.meta), size=parent_size, parent=parent)
        )
        with self.cluster.lock:
            self.cluster.checked.add(name)
        try:
            self.cluster.set_meta(
                name,
                {
                    K_OWNER: self.names.node_id,
                    K_LAYER: layer.id,
                    K_PARENT: layer.parent or NONE,
                    K_STATE: "clean",
                    K_DEPTH: str(depth),
                    K_CHAIN: NONE,
                    **(meta or {}),
                },
            )
            chown = shared is None and layer.parent is None and tuple(layer.root_ids) != (0, 0)
            if grow_to is not None or chown:
                self.set_up(layer, name, grow_to, chown)
        except BaseException:
            try:
                self.destroy(layer.id, name)
            except Exception as e:
                log.error("cannot remove half-made image {image}: {error}", image=name, error=e)
            raise

    def shared_origin(self, state: ImageState) -> str | None:
        """
        The shared image a committed layer is an unchanged clone of (an
        image layer ApplyDiff settled on a shared image, never written
        since), or None.
        """
        chain = state.meta.get(K_CHAIN, NONE)
        if (
            state.meta.get(K_STATE) == "shared"
            and chain.startswith("sha256:")
            and state.parent == self.names.shared_image(chain)
            and state.committed
        ):
            return state.parent
        return None

    def set_up(self, layer: LayerInfo, name: str, grow_to: int | None, chown: bool) -> None:
        """
        Grow a new clone and its filesystem, and give its root directory
        to the container's root user (userns-remap).  ext4 grows offline
        (online growth needs CAP_SYS_RESOURCE, which containers often lack).
        """
        if grow_to is not None:
            self.cluster.clear_stale_clients(name)
            with self.cluster.open(name) as image:
                image.resize(grow_to)
            self.cluster.update(name, size=grow_to)
        mapping = self.devices.map_temporary(name, readonly=False)
        try:
            device = mapping["device"]
            if grow_to is not None and self.settings.fs == "ext4":
                # resize2fs wants a freshly checked filesystem; -p repairs
                # nothing that needs a human (exit 1: fixed, still fine).
                run(["e2fsck", "-f", "-p", device], "check the filesystem before growing it",
                    self.settings.timeout * 10, ok=(0, 1))
                run(["resize2fs", device], "grow the filesystem", self.settings.timeout * 10)
            if chown or (grow_to is not None and self.settings.fs == "xfs"):
                with self.devices.device_mounted(device, readonly=False, prefix="setup-") as top:
                    if grow_to is not None and self.settings.fs == "xfs":
                        run(["xfs_growfs", top], "grow the filesystem", self.settings.timeout * 10)
                    if chown:
                        os.chown(os.path.join(top, ROOTFS), *layer.root_ids)
        finally:
            self.devices.unmap(mapping)

    def ensure_base(self) -> None:
        """
        Make the node's base image if it is missing: created, formatted,
        snapshotted and protected; refuse a base that is not this node's or
        holds another filesystem.
        """
        assert self.cluster.rbd is not None
        name = self.names.base_image
        state = self.cluster.inspect(name)
        if state is None:
            self.cluster.rbd.RBD().create(
                self.cluster.ioctx, name, self.settings.base_size, order=self.settings.object_size.bit_length() - 1,
                old_format=False, data_pool=self.settings.data_pool
            )
            self.cluster.set_meta(
                name, {K_OWNER: self.names.node_id, K_LAYER: "base", K_FS: self.settings.fs, K_DEPTH: "0"}
            )
            state = self.cluster.inspect(name)
            assert state is not None
        elif not self.names.ours(state):
            self.cluster.refuse_foreign(state)
        if K_DEPTH not in state.meta:
            self.cluster.set_meta(name, {K_DEPTH: "0"})
        recorded = state.meta.get(K_FS)
        if recorded is not None and recorded != self.settings.fs:
            raise ConfigurationError(
                f"the base image {self.names.spec(name)} holds {recorded}, but "
                f"txgraph.rbd.fs={self.settings.fs}: a node keeps one filesystem (use another "
                f"txgraph.rbd.prefix or node_id, or remove this node's layers first)"
            )
        if state.meta.get(K_FORMATTED) != "1":
            if state.snaps:
                raise BackendError(
                    "the base image has snapshots but is not marked formatted; "
                    "refusing to format it over what may be data"
                )
            self.format_base(name)
        if not state.committed or not state.snaps[SNAP][0]:
            self.cluster.snapshot(name)

    def format_base(self, name: str) -> None:
        """
        Make the filesystem on a new base image, with an empty C{rootfs/} 0755
        root:root, and mark the image formatted.
        """
        if self.settings.fs == "ext4":
            # The image reads back zeros where nothing was written, so the
            # inode tables and the journal need no zeroing (and must not be
            # zeroed lazily in every clone later: see noinit_itable).
            mkfs = [
                "mkfs.ext4", "-q", "-F", "-L", "txgraph",
                "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ]
        else:
            mkfs = ["mkfs.xfs", "-q", "-f", "-K", "-L", "txgraph"]
        mapping = self.devices.map_temporary(name, readonly=False)
        try:
            device = mapping["device"]
            run([*mkfs, *self.settings.mkfs_args, device], f"mkfs.{self.settings.fs} on {device}", self.settings.timeout * 10)
            with self.devices.device_mounted(device, readonly=False, prefix="base-") as top:
                rootfs = os.path.join(top, ROOTFS)
                os.mkdir(rootfs, 0o755)
                os.chmod(rootfs, 0o755)
                os.chown(rootfs, 0, 0)
        finally:
            self.devices.unmap(mapping)
        self.cluster.set_meta(name, {K_FORMATTED: "1"})

    def requested_size(self, layer: LayerInfo) -> int | None:
        """
        The size the layer's C{size} storage option asks for, or None; too
        small a size is refused.
        """
        size = storage_size(layer, "rbd", "size")
        if size is None:
            return None
        raw = layer.storage_opt["size"]
        if size < MIN_SIZE[self.settings.fs]:
            raise ConfigurationError(
                f"invalid storage option size={raw!r}: at least {MIN_SIZE[self.settings.fs] >> 20} MiB"
            )
        return size

    def fresh_clone(self, layer: LayerInfo, name: str, premap: bool = False) -> Mapping | None:
        """
        Make the layer's image a fresh clone of its parent's snapshot,
        removing the image of that name first if it is this node's; with
        C{premap}, map it read-write too and return the mapping.
        """
        grow_to = self.requested_size(layer)
        state = self.cluster.inspect(name)
        if state is not None:
            if not self.names.ours(state):
                self.cluster.refuse_foreign(state)
            self.destroy(layer.id, name)
        if not premap:
            self.clone(layer, name, grow_to)
            return None
        assert self.devices.mapper is not None
        started = self.devices.mapper.start(name, tag=self.names.key(layer.id))
        try:
            self.clone(layer, name, grow_to, meta={K_STATE: "dirty"})
            mapping = self.devices.mapper.map(name, readonly=False, tag=self.names.key(layer.id), started=started)
            self.open_ahead(layer, name)
            return mapping
        except BaseException:
            if started is not None:
                self.devices.unmap(started)
            raise

    def open_ahead(self, layer: LayerInfo, name: str) -> None:
        """
        Open a layer's image for its commit, in the background, if its
        front end expects to commit it (L{Handles}).  Called once the
        layer's image is mapped read-write, not before: opened while
        rbd-fuse opens it for the map, it made the map slower by about as
        much as it saved the commit (measured: docs/performance.md).
        """
        if self.settings.open_ahead and layer.commit_expected and not layer.committed:
            self.cluster.handles.open_soon(name)

    def reclone(self, layer: LayerInfo, name: str) -> None:
        """
        Make the layer equal to its parent again.  Its image may be gone:
        a crash while it was replaced by a clone of a shared image
        (L{replace_by_clone}) leaves none.
        """
        self.devices.release(layer.id, name, layer.mapping)
        self.fresh_clone(layer, name)

    def replace_by_clone(
        self, layer: LayerInfo, name: str, shared: str, meta: dict[str, str],
        source: ImageState | None = None,
    ) -> None:
        """
        Replace the layer's image (the clone Create made) by a clone of the
        shared image C{shared}, or of this node's finished candidate as
        C{source} says.  L{SharedGone} if that image is gone.  The old
        image goes to the RBD trash, as at Remove, and the background purge
        deletes it (a move takes ~13 ms, a removal ~40 ms).
        """
        self.devices.release(layer.id, name, None)
        self.trash.move(name)
        faults.point(CRASH_REPLACED)
        self.clone(layer, name, None, shared=shared, meta=meta, source=source)

    def discard_image(self, name: str) -> None:
        """
        Remove one of this node's unpublished candidates (and its snapshot),
        if it exists, whatever its owner says.
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        self.cluster.handles.drop(name)
        for mapping in self.devices.mappings(name):
            self.devices.unmap(mapping)
        try:
            with self.cluster.open(name) as image:
                remove_snap(image)
        except rbd.ImageNotFound:
            self.cluster.forget(name)
            return
        with contextlib.suppress(rbd.ImageNotFound):
            rbd.RBD().remove(self.cluster.ioctx, name)
        self.cluster.forget(name)
        with self.cluster.lock:
            self.cluster.checked.discard(name)
