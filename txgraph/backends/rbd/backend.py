"""
The Ceph RBD backend: every layer an RBD image in a Ceph pool, cloned from
its parent's snapshot, mapped to a local block device and mounted.

Storage model, per node (a Docker host, named by the C{node_id} option)::

  <prefix><node>.base          the node's base image: formatted once with
                               the chosen filesystem (an empty C{rootfs/}
                               0755 root:root), then snapshotted and
                               protected as C{@txgraph}
  <prefix><node>.<key>         a layer (its key: L{layer_key}): a clone of its parent's C{@txgraph}
                               snapshot (or the base's); committing it
                               snapshots and protects it in turn

Image metadata (C{rbd image-meta list}) records C{txgraph.owner} (the
node), C{txgraph.layer}, C{txgraph.parent} and C{txgraph.state} (C{clean}
while the layer still equals its parent, C{dirty} once it was mapped
read-write); the base also records C{txgraph.fs} and C{txgraph.formatted},
so an existing base is never formatted again.  A node only lists, changes
or removes images whose names carry its own prefix and node id I{and} whose
owner is that node: several Docker hosts share one pool safely.

Locally, under C{<state-dir>/rbd/}::

  mnt/<key>      where a layer is mounted; dockerd gets C{mnt/<key>/rootfs}
                 (devicemapper-style, so lost+found stays out of sight)
  fuse/<tag>     rbd-fuse mounts of the fuse mapper (see L{mappers})
  work/          temporary mounts: apply, views for diffs, set-up
  log/           rbd-fuse logs
  local/<key>/   a container's layer kept locally (container_layers=local,
                 L{txgraph.backends.rbd.local}), an overlayfs layer
  lower/<key>/   an image layer mapped read-only under local layers

Life cycle as the layer machine drives it: C{prepare} clones, C{map}
attaches a device (read-only once committed, so a committed layer never
changes under its children), C{mount} mounts it, C{unmount}/C{unmap} undo
that, C{commit} snapshots and protects (never a mounted or mapped layer),
C{remove} undoes everything (the image goes to the RBD trash, from where a
background purge deletes it).  C{apply}, C{diff}, C{changes} and
C{diff_size} work on temporary mappings of their own, so they need the
layer to be neither mapped nor mounted; the views they compare are
read-only (a layer that is mounted is seen through a read-only bind mount
of its mount).  DiffSize follows the shared rule for full trees:
C{changes_size(root, changes_dirs(root, parent_root))}; ApplyDiff answers
the tar's content size, as moby's naive-diff drivers (devicemapper, vfs,
btrfs, zfs) do.

Depth: librbd opens a clone's whole ancestry (about 3.5 ms per level
here), so a layer committed C{flatten_depth} (32) clones below a flat image
is flattened first (its ancestors' data copied into it); chains stay
shallow at the price of a copy every 32 levels (dockerd allows 125).  This
node caches what it knows of its own images (which only it changes), so an
operation opens no image it does not have to.

Crashes: every call finishes or replaces what an interrupted one left
(temporary mappings are cleaned up at start; a layer's own mapping is found
again from the loop devices and processes that exist).  A librbd client
that died holding an image's exclusive lock (an rbd-fuse killed with -9)
would make the next writer wait about 30 s for its watch to time out; before
writing to one of its own images, the backend breaks such locks (which
blocklists the dead client) when no local mapping of that image is alive.

The Ceph bindings are imported in L{RBDBackend.start}, so that this module
(and the overlay backend) work on hosts without them.

L{RBDBackend} is the backend's life cycle and contract; it owns one object
per part, each in a module of its own: L{options} (the options and their
parsed L{Settings}), L{names} (image names, keys, mount points, whose an
image is), L{metadata} (what is written on images), L{cluster} (the
connection, and librbd and cls_rbd calls on images), L{devices} (mappers,
mappings, mounts and views), L{trash} (the background purge), L{clones}
(making and remaking layer images), L{shared} (shared layers and thin
images) and L{repair} (gc's leftovers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, cast

from twisted.logger import Logger

from txgraph import archive, mounts, thin
from txgraph.archive import ApplyMode
from txgraph.backends import (
    HASHED_KEY,
    Backend,
    LayerInfo,
    LayerView,
    MountSpec,
    Orphan,
    parse_options,
)
from txgraph.backends.rbd.clones import Clones
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.local import LocalLayers, Lowers
from txgraph.backends.rbd.mappers.base import Mapping
from txgraph.backends.rbd.metadata import K_DEPTH, K_LAYER, K_STATE, ROOTFS, SNAP
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import MIN_SIZE, OPTIONS, Settings
from txgraph.backends.rbd.repair import Repairs
from txgraph.backends.rbd.shared import SharedLayers
from txgraph.backends.rbd.trash import Trash
from txgraph.errors import BackendError, ConfigurationError
from txgraph.model import Change, IDMap

log = Logger()


class RBDBackend(Backend):
    """
    Layers as RBD clones of protected snapshots, mapped and mounted.

    @ivar settings: the parsed options.
    @ivar names: how images, keys and mount points are named.
    @ivar cluster: the connection and the calls on images.
    @ivar devices: the mappers, mappings and mounts.
    @ivar trash: removed images and their purge.
    @ivar clones: making, remaking and destroying layer images.
    @ivar shared: shared layers and thin images.
    @ivar repairs: gc's leftovers.
    """

    name = "rbd"
    maps = True
    commits = True
    shares_layers = True
    holds_client_mounts = True
    options = OPTIONS

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.settings = Settings.from_options({**parse_options(type(self), {}), **options})
        self.unmap_delay = self.settings.unmap_delay
        self.names = Names(state_dir, self.settings)
        self.cluster = Cluster(self.settings, self.names)
        self.devices = Devices(self.settings, self.names, self.cluster)
        self.cluster.mapped_alive = lambda name: any(
            m["alive"] for m in self.devices.mappings(name)
        )
        self.trash = Trash(self.settings, self.names, self.cluster, self.devices)
        self.clones = Clones(self.settings, self.names, self.cluster, self.devices, self.trash)
        self.shared = SharedLayers(
            self.settings, self.names, self.cluster, self.devices, self.trash, self.clones
        )
        self.repairs = Repairs(
            self.names, self.cluster, self.devices, self.trash, self.clones, self.shared
        )
        self.lowers = Lowers(self.names, self.devices, self.settings.unmap_delay)
        self.local = LocalLayers(
            state_dir, self.names, self.lowers, self.settings.container_layers == "local"
        )

    def _is_local(self, layer: LayerInfo) -> bool:
        """
        Whether the layer is a local one (L{txgraph.backends.rbd.local}).
        """
        return self.local.is_local(layer.id)

    def maps_layer(self, layer_id: str) -> bool:
        """
        A local layer is not mapped (its base is, by L{Lowers}).
        """
        return not self.local.is_local(layer_id)

    def commits_layer(self, layer_id: str) -> bool:
        """
        A local layer's commit has nothing to do (an overlay layer no one
        writes is immutable).
        """
        return not self.local.is_local(layer_id)

    def prepares_atomically(self, layer: LayerInfo) -> bool:
        """
        A local layer is made whole by one rename; gc finds a directory
        without a row.
        """
        return self.local.makes_local(layer)

    def image_name(self, layer_id: str) -> str:
        """
        The RBD image of a layer on this node.
        """
        return self.names.image_name(layer_id)

    def shared_image(self, chain: str) -> str:
        """
        The shared image holding the tree of chain C{sha256:<hex>}.
        """
        return self.names.shared_image(chain)

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        """
        Import the bindings, check the tools, connect, pick the mapper,
        clean up temporary leftovers of a crash and make sure the base
        image exists, formatted.
        """
        try:
            import rados
            import rbd
        except ImportError as e:
            raise BackendError(
                f"the rbd backend needs Ceph's Python bindings, which cannot be imported "
                f"({e}): install Debian's python3-rados and python3-rbd and link them into "
                f"txgraph's virtualenv (.ci/link-ceph-bindings.sh VENV)"
            ) from None
        self.cluster.rados, self.cluster.rbd = rados, rbd
        self._check_host()
        for d in (self.names.root, self.names.mnt, self.names.work):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.names.root, 0o700)
        if self.local.used():
            self.local.start()
        self.cluster.connect()
        try:
            self.cluster.handles.start()
            self.devices.choose()
            self.devices.cleanup_leftovers()
            self.lowers.start()
            with self.cluster.op("set-up of the base image", None, self.names.base_image):
                self.clones.ensure_base()
            self.trash.purger.start()
        except BaseException:
            self.stop()
            raise

    def _check_host(self) -> None:
        if not os.path.isfile(self.settings.conf):
            raise BackendError(f"rbd backend: Ceph configuration {self.settings.conf} does not exist")
        if self.settings.keyring is not None and not os.access(self.settings.keyring, os.R_OK):
            raise BackendError(f"rbd backend: keyring {self.settings.keyring} is not readable")
        tools = {
            "ext4": ("mkfs.ext4", "e2fsck", "resize2fs"),
            "xfs": ("mkfs.xfs", "xfs_growfs"),
        }[self.settings.fs]
        for tool in tools:
            if shutil.which(tool) is None:
                package = "e2fsprogs" if self.settings.fs == "ext4" else "xfsprogs"
                raise BackendError(f"rbd backend: {tool} is missing (install {package})")
        if self.settings.base_size < MIN_SIZE[self.settings.fs]:
            raise ConfigurationError(
                f"txgraph.rbd.base_size must be at least {MIN_SIZE[self.settings.fs] >> 20} MiB "
                f"for {self.settings.fs}"
            )

    def status(self) -> list[tuple[str, str]]:
        """
        Where the layers are and how they are mapped.
        """
        unavailable = "; ".join(
            f"{n}: {r}" for n, r in self.devices.unavailable.items() if r is not None
        )
        lines = [
            ("Pool", self.settings.pool),
            ("Namespace", self.settings.namespace or "(default)"),
            ("Data Pool", self.settings.data_pool or "(same)"),
            ("Cluster FSID", self.cluster.fsid or "(not connected)"),
            ("Client", f"client.{self.settings.client}"),
            ("Node ID", self.names.node_id),
            ("Image Prefix", self.names.stem),
            ("Base Image", f"{self.names.spec(self.names.base_image)}@{SNAP}"),
            ("Base Size", str(self.settings.base_size)),
            ("Backing Filesystem", self.settings.fs),
            ("Mapper", self.devices.mapper.name if self.devices.mapper else "(not started)"),
        ]
        if unavailable:
            lines.append(("Unavailable Mappers", unavailable))
        with self.cluster.lock:
            waiting = len(self.trash.left)
        lines.append(("Removed Images Not Purged", str(waiting)))
        lines.append(
            ("Shared Layers", f"{self.names.spec(self.names.shared_stem)}<chain>@{SNAP}" if self.settings.share else "off")
        )
        lines.append(
            ("Container Layers", f"local ({self.local.root})" if self.local.enabled else "pool")
        )
        return lines

    def prepare(self, layer: LayerInfo) -> Mapping | None:
        """
        Clone the parent's snapshot (the base's for a layer without a
        parent); leftovers of an earlier attempt are removed first.  An
        image of that name that is not this node's is left alone: an error.

        A read-write layer is also mapped when devices are kept after the
        last Put (C{unmap_delay}): dockerd gets it right after creating
        it.  The mapper starts (rbd-fuse: ~30 ms to start and connect)
        while the clone is made, and the mapping is returned for the
        layer's record.
        """
        if self.local.makes_local(layer):
            self.local.prepare(layer)
            return None
        name = self.names.image_name(layer.id)
        with self.cluster.op("prepare", layer.id, name):
            return self.clones.fresh_clone(layer, name, premap=layer.readwrite and self.settings.unmap_delay > 0)

    def commit(self, layer: LayerInfo) -> None:
        """
        Snapshot and protect the layer's image (idempotent); never while
        it is mounted or mapped read-write.
        """
        if self._is_local(layer):
            return
        name = self.names.image_name(layer.id)
        with self.cluster.op("commit", layer.id, name):
            state = self.cluster.require(name)
            if mounts.is_mountpoint(self.names.mountpoint(layer.id)):
                raise BackendError(
                    f"it is mounted at {self.names.mountpoint(layer.id)}; a mounted "
                    "filesystem is never snapshotted"
                )
            for mapping in self.devices.mappings(name):
                if mapping["alive"] and not mapping["readonly"]:
                    raise BackendError(
                        f"it is mapped read-write at {mapping['device']}; unmap it first"
                    )
                if not mapping["alive"]:
                    self.cluster.suspect(name)
                    self.devices.unmap(mapping)
            if (
                self.settings.flatten_depth
                and not state.committed
                and state.parent is not None
                and state.depth >= self.settings.flatten_depth
            ):
                # Children of a deep layer would open ever longer chains:
                # this one becomes a flat image (its parents' data copied).
                # Through the handle opened ahead of the commit, if held,
                # which then takes the snapshot too.
                self.cluster.clear_before_commit(name)
                with self.cluster.open_held(name) as image:
                    image.flatten()
                    self.cluster.update(name, parent=None)
                    self.cluster.set_meta(name, {K_DEPTH: "0"})
                    self.cluster.snapshot(name, image)
                return
            self.cluster.snapshot(name)

    def remove(self, layer: LayerInfo) -> None:
        """
        Unmount, unmap, and move the image to the RBD trash, from where the
        background purge deletes it (and its snapshot) once the clones made
        from it are gone.  What is gone is fine; an image that is not this
        node's is left alone.

        Deleting takes an unprotect, a snapshot removal and an image
        removal, ~80 ms for a container's C{-init} layer; the move takes
        ~13 ms.  The move frees the name at once (a layer of the same ID
        can be made again), keeps the image's data readable for clones
        not purged yet, and survives a crash: the purge resumes at start.
        """
        if self._is_local(layer):
            self.local.remove(layer)
            return
        name = self.names.image_name(layer.id)
        with self.cluster.op("remove", layer.id, name):
            self.lowers.drop(layer.id)
            state = self.cluster.inspect(name)
            if state is not None and not self.names.ours(state):
                log.warn(
                    "not removing {image}: it is not a layer of node {node}",
                    image=self.names.spec(name),
                    node=self.names.node_id,
                )
                self.devices.release(layer.id, name, layer.mapping)
                return
            self.devices.release(layer.id, name, layer.mapping)
            if state is not None:
                self.trash.move(name)
            with contextlib.suppress(OSError):
                os.rmdir(self.names.mountpoint(layer.id))

    def reset(self, layer: LayerInfo) -> None:
        """
        Make the layer equal to its parent again: a fresh clone.
        """
        if self._is_local(layer):
            self.local.reset(layer)
            return
        name = self.names.image_name(layer.id)
        with self.cluster.op("reset", layer.id, name):
            self.clones.discard_image(self.names.candidate(self.names.key(layer.id)))
            self.clones.reclone(layer, name)

    def exists(self, layer: LayerInfo) -> bool:
        """
        Whether this node has the layer's image.
        """
        if self._is_local(layer):
            return self.local.exists(layer)
        name = self.names.image_name(layer.id)
        with self.cluster.op("look up", layer.id, name):
            state = self.cluster.inspect(name)
            return state is not None and self.names.ours(state)

    def list_layers(self) -> list[str]:
        """
        This node's layers: its images (L{_image_layers}) and its local
        layers.
        """
        local = self.local.list_layers() if self.local.used() else []
        return sorted(set(self._image_layers()) | set(local))

    def _image_layers(self) -> list[str]:
        """
        This node's layer images: images named with its prefix and node id,
        and owned by it.
        """
        assert self.cluster.rbd is not None
        with self.cluster.op("list of the layers", None):
            result = []
            for name in self.cluster.rbd.RBD().list(self.cluster.ioctx):
                if not name.startswith(self.names.stem) or name == self.names.base_image:
                    continue
                if name.startswith(self.names.candidate("")):
                    continue
                state = self.cluster.inspect(name, fresh=True)
                if state is not None and self.names.ours(state):
                    key = name[len(self.names.stem) :]
                    if key.startswith(HASHED_KEY):
                        # The ID is in the image's metadata.
                        layer_id = state.meta.get(K_LAYER, key)
                        self.names.ids[key] = layer_id
                        key = layer_id
                    result.append(key)
            return sorted(result)

    def traverse_paths(self) -> list[str]:
        """
        C{rbd/} and C{rbd/mnt/} (each layer's mount point is covered by its
        filesystem's own root).
        """
        paths = [self.names.root, self.names.mnt]
        if self.local.used():
            paths += self.local.traverse_paths()
        return paths

    def allow_traverse(self, gid: int | None) -> None:
        self.local.traverse_gid = gid
        super().allow_traverse(gid)

    def map(self, layer: LayerInfo) -> Mapping | None:
        """
        Attach the layer's image: read-write, or read-only once committed.
        """
        if self._is_local(layer):
            return None
        assert self.devices.mapper is not None
        name = self.names.image_name(layer.id)
        with self.cluster.op("map", layer.id, name):
            mapping = self.devices.map_layer(layer, name)
            if not mapping["readonly"]:
                self.clones.open_ahead(layer, name)
            return mapping

    def unmap(self, layer: LayerInfo) -> None:
        """
        Detach the layer's device: the recorded mapping if it still is one,
        and whatever mapping of the layer exists (after a crash).
        """
        if self._is_local(layer):
            return
        name = self.names.image_name(layer.id)
        with self.cluster.op("unmap", layer.id, name):
            self.devices.release(layer.id, name, layer.mapping)

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the mapped device at C{mnt/<id>}; return its C{rootfs}.
        """
        if self._is_local(layer):
            return self.local.mount(layer, chain)
        name = self.names.image_name(layer.id)
        with self.cluster.op("mount", layer.id, name):
            mapping = self.devices.live_mapping(layer, name)
            if mapping is None:
                raise BackendError("it is not mapped")
            return self.devices.mount_layer(layer, mapping)

    def unmount(self, layer: LayerInfo) -> None:
        """
        Unmount the layer (and anything mounted below it).
        """
        if self._is_local(layer):
            self.local.unmount(layer)
            return
        with self.cluster.op("unmount", layer.id):
            self.devices.unmount(layer.id)

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer again if its mount is gone, mapping it again first
        if its device is gone too.
        """
        if self._is_local(layer):
            return self.local.ensure_mounted(layer, chain)
        name = self.names.image_name(layer.id)
        with self.cluster.op("remount", layer.id, name):
            mapping = self.devices.live_mapping(layer, name)
            if mapping is None:
                self.devices.release(layer.id, name, layer.mapping)
                mapping = self.devices.map_layer(layer, name)
            return self.devices.mount_layer(layer, mapping)

    # -- mounts for containerd ------------------------------------------------------------

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """
        A bind mount of the layer's mounted C{rootfs} (read-only for a
        view): the filesystem on a layer's device keeps the layer's tree in
        its C{rootfs/} directory (beside C{lost+found}), which a mount of
        the device itself would not show, so the layer stays mapped and
        mounted here while the snapshot exists (L{holds_client_mounts}).
        """
        if self._is_local(layer):
            return self.local.mount_specs(layer, chain, view)
        rootfs = os.path.join(self.names.mountpoint(layer.id), ROOTFS)
        if not os.path.isdir(rootfs):
            raise BackendError(f"rbd mounts of layer {layer.id}: it is not mounted at {rootfs}")
        return [MountSpec("bind", rootfs, ("ro" if view else "rw", "rbind"))]

    def cleanup(self) -> None:
        """
        Purge the images that removals moved to the RBD trash (a pass of
        the purge, waited for); what cannot be purged yet stays for later.
        """
        left = self.settle_trash()
        if left:
            log.info("rbd cleanup: {n} removed image(s) still in the trash", n=len(left))

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        The bytes the layer's image holds of its own (the extents written
        since it was cloned from its parent), as containerd's devmapper
        snapshotter reports a thin device's; inodes are not counted (0).
        """
        if self._is_local(layer):
            return self.local.usage(layer)
        name = self.names.image_name(layer.id)
        with self.cluster.op("usage", layer.id, name), self.cluster.open(name) as image:
            total = 0

            def count(offset: int, length: int, exists: bool) -> None:
                nonlocal total
                if exists:
                    total += length

            image.diff_iterate(0, image.size(), None, count, include_parent=False)
            return total, 0

    # -- content --------------------------------------------------------------------------

    def apply(self, layer: LayerInfo, stream: IO[bytes], id_map: IDMap) -> int:
        """
        Apply a layer tar to a fresh clone (a retried ApplyDiff starts from
        the parent's content again) and return the tar's content size (the
        sum of its entries' sizes), which is what moby's naive-diff drivers
        answer: C{NaiveDiffDriver.ApplyDiff} returns C{UnpackLayer}'s sum
        of C{hdr.Size}.  On failure the layer is a fresh clone again.

        With C{share}, the layer is extracted into a candidate shared image
        instead, which is published under its chain ID, or discarded if the
        pool already has that chain (L{SharedLayers.apply_shared}).
        """
        if self._is_local(layer):
            return self.local.apply(layer, cast(BinaryIO, stream), id_map)
        name = self.names.image_name(layer.id)
        with self._applying(layer, name):
            reader = thin.HashingReader(cast(BinaryIO, stream))
            parent_chain = self.shared.parent_chain(layer, id_map)
            if parent_chain is not None:
                return self.shared.apply_shared(layer, name, reader, reader, parent_chain, id_map)
            self.cluster.set_meta(name, {K_STATE: "dirty"})
            with self.devices.work_mount(name, readonly=False, bulk_write=True) as (top, _device):
                # The commit follows: its handle opens while the tar is
                # extracted.
                self.clones.open_ahead(layer, name)
                root = os.path.join(top, ROOTFS)
                stats = archive.apply_layer(cast(BinaryIO, reader), root, ApplyMode.INPLACE, id_map)
                return stats.content_bytes

    def apply_thin(self, layer: LayerInfo, descriptor: bytes, id_map: IDMap) -> int:
        """
        Make the layer a clone of the snapshot a thin descriptor names
        (L{SharedLayers.apply_thin}), from a fresh clone as L{apply} does.
        """
        if self._is_local(layer):
            raise BackendError(
                f"layer {layer.id} is a local container layer; a thin image's layer is an "
                "image layer (Create, not CreateReadWrite)"
            )
        name = self.names.image_name(layer.id)
        with self._applying(layer, name):
            return self.shared.apply_thin(layer, name, descriptor, id_map)

    @contextlib.contextmanager
    def _applying(self, layer: LayerInfo, name: str) -> Iterator[None]:
        """
        What every ApplyDiff does around its work: release the layer's
        device, start from a clean clone of its parent, and on failure make
        it a fresh clone again (discarding a candidate shared image).
        """
        with self.cluster.op("apply", layer.id, name):
            self.devices.release(layer.id, name, layer.mapping)
            state = self.cluster.require(name)
            if state.committed:
                self.cluster.drop_snapshot(name)
            if state.meta.get(K_STATE) != "clean":
                self.clones.reclone(layer, name)
            try:
                yield
            except BaseException:
                try:
                    self.clones.discard_image(self.names.candidate(self.names.key(layer.id)))
                    self.clones.reclone(layer, name)
                except Exception as e:
                    log.error(
                        "cannot empty layer {id} again after a failed apply: {error}",
                        id=layer.id,
                        error=e,
                    )
                raise

    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: IO[bytes],
        id_map: IDMap,
    ) -> None:
        """
        The layer tar of the changes between C{parent} and the layer.
        """
        if self._is_local(layer):
            with self.local.reading(layer, parent):
                return self.local.diff(layer, chain, parent, cast(BinaryIO, out), id_map)
        name = self.names.image_name(layer.id)
        with self.cluster.op("diff", layer.id, name):
            with self.devices.views(layer, chain, parent) as (new, old):
                archive.export_changes(
                    new, archive.changes_dirs(new, old), cast(BinaryIO, out), id_map
                )

    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> list[Change]:
        """
        The changes between C{parent} and the layer (moby's naive diff).
        """
        if self._is_local(layer):
            with self.local.reading(layer, parent):
                return self.local.changes(layer, chain, parent)
        name = self.names.image_name(layer.id)
        with self.cluster.op("changes", layer.id, name):
            with self.devices.views(layer, chain, parent) as (new, old):
                return archive.changes_dirs(new, old)

    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> int:
        """
        The size of the changed files (moby's C{ChangesSize}).
        """
        if self._is_local(layer):
            with self.local.reading(layer, parent):
                return self.local.diff_size(layer, chain, parent)
        name = self.names.image_name(layer.id)
        with self.cluster.op("diff size", layer.id, name):
            with self.devices.views(layer, chain, parent) as (new, old):
                return archive.changes_size(new, archive.changes_dirs(new, old))

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        Where the layer lives (no cluster call).
        """
        if self._is_local(layer):
            return self.local.metadata(layer, chain)
        name = self.names.image_name(layer.id)
        parent = self.names.image_name(layer.parent) if layer.parent else self.names.base_image
        mapping = layer.mapping or {}
        return {
            "Pool": self.settings.pool,
            "Namespace": self.settings.namespace or "",
            "Image": self.names.spec(name),
            "Parent": f"{self.names.spec(parent)}@{SNAP}",
            "Mapper": str(mapping.get("mapper") or (self.devices.mapper.name if self.devices.mapper else "")),
            "Device": str(mapping.get("device") or ""),
            "MountPoint": os.path.join(self.names.mountpoint(layer.id), ROOTFS),
            "Filesystem": self.settings.fs,
        }

    def stop(self) -> None:
        """
        Close the handles held ahead of commits and the cluster connection.
        Mappings and mounts stay: running containers use them, and the
        layer machines own them.
        """
        self.devices.reap()
        self.lowers.stop()
        self.cluster.handles.close_all()
        if not self.trash.purger.stop(self.settings.timeout + 5):
            log.warn("the rbd trash purge did not stop; leaving the cluster connection open")
            return
        self.cluster.close()

    # -- gc, shared layers and statistics: the parts' own work ------------------------

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        This node's leftovers (L{Repairs.orphans}).
        """
        return self.repairs.orphans(layers, self._image_layers) + self.local.all_orphans(layers)

    def repair(self, orphan: Orphan) -> None:
        """
        Undo one leftover that L{orphans} found (L{Repairs.repair}).
        """
        if not self.local.repair_any(orphan) and not self.repairs.repair(orphan):
            super().repair(orphan)

    def settle_trash(self) -> list[tuple[str, str, str]]:
        """
        Wait for the purge to try every image removed so far; return what
        is left in the trash: (trash id, image name, why).
        """
        return self.trash.settle()

    def cluster_reads(self, sizes: bool = True) -> dict[str, dict[str, Any]]:
        """
        Per mounted layer, what its mapping read from the cluster
        (L{Devices.cluster_reads}).
        """
        return self.devices.cluster_reads(sizes)

    def shared_info(self) -> dict[str, str]:
        """
        Where this node's shared images are: what a thin descriptor records.
        """
        return self.shared.info()

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """
        Store a layer tar file as the shared image of its chain, unless the
        pool has it (L{SharedLayers.publish_layer}).
        """
        return self.shared.publish_layer(parent_chain, path, diff_id, progress)

    def shared_chain_parent(self, chain: str) -> str | None:
        """
        The chain the pool's shared image of C{chain} was made on
        (L{SharedLayers.chain_parent}).
        """
        return self.shared.chain_parent(chain)

    def adopt_shared(self, layer: LayerInfo, chain: str) -> int:
        """
        Make the layer a clone of the pool's shared image of C{chain}
        (L{SharedLayers.adopt}), from a fresh clone as L{apply} does.
        """
        name = self.names.image_name(layer.id)
        with self._applying(layer, name):
            return self.shared.adopt(layer, name, chain)

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        """
        Publish a layer containerd filled as the shared image of its chain
        (L{SharedLayers.publish_chain}).
        """
        return self.shared.publish_chain(layer, chain, chain_id, parent_chain)

    def shared_orphans(self, min_age: float) -> list[Orphan]:
        """
        Shared images that nothing uses, older than C{min_age} seconds
        (L{SharedLayers.orphans}).
        """
        return self.shared.orphans(min_age)
