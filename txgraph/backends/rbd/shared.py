"""
The rbd backend's shared layers and thin images: image layers kept once
per pool as snapshots named by their chain ID, which every node clones.
An ApplyDiff extracts into a candidate cloned from the parent chain's
shared image, then publishes it under its chain ID (or discards it if
the pool has that chain already) and makes the layer a clone of it
(L{SharedLayers.apply_shared}); a thin descriptor makes the layer a clone
of the snapshot it names plus the descriptor, a shared image too, without
extraction (L{SharedLayers.apply_thin});
C{txgraph-admin make-thin} publishes layer files
(L{SharedLayers.publish_layer}); gc finds and removes shared images that
nothing is cloned from (L{SharedLayers.orphans}, L{SharedLayers.remove}).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, cast

from twisted.logger import Logger

from txgraph import archive, thin
from txgraph.archive import ApplyMode
from txgraph.backends import LayerInfo, Orphan
from txgraph.backends.rbd.clones import Clones
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.metadata import (
    K_CHAIN,
    K_DEPTH,
    K_FS,
    K_LAYER,
    K_OWNER,
    K_PARENT,
    K_STATE,
    NONE,
    ROOTFS,
    SHARED,
    SNAP,
    ImageState,
    SharedGone,
    describe,
    remove_snap,
)
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import Settings
from txgraph.backends.rbd.trash import Trash
from txgraph.errors import BackendError
from txgraph.model import IDMap
from txgraph.thin import ThinDescriptorError

log = Logger()


class SharedLayers:
    """
    The pool's shared images as this node makes, uses and removes them.
    """

    def __init__(
        self, settings: Settings, names: Names, cluster: Cluster, devices: Devices,
        trash: Trash, clones: Clones,
    ) -> None:
        self.settings = settings
        self.names = names
        self.cluster = cluster
        self.devices = devices
        self.trash = trash
        self.clones = clones

    def ensure_base(self) -> ImageState:
        """
        The pool's shared base image (an empty formatted filesystem, as a
        node's own base), made and published by the first node that needs
        it; returns its state.
        """
        assert self.cluster.rbd is not None
        for _attempt in range(8):
            state = self.cluster.shared_state(self.names.shared_base)
            if state is not None:
                return state
            candidate = self.names.candidate("base")
            self.clones.discard_image(candidate)
            self.cluster.rbd.RBD().create(
                self.cluster.ioctx, candidate, self.settings.base_size, order=self.settings.object_size.bit_length() - 1,
                old_format=False, data_pool=self.settings.data_pool
            )
            with self.cluster.lock:
                self.cluster.checked.add(candidate)
            self.cluster.set_meta(
                candidate,
                {K_OWNER: self.names.node_id, K_LAYER: "candidate", K_FS: self.settings.fs, K_DEPTH: "0",
                 K_CHAIN: NONE},
            )
            self.clones.format_base(candidate)
            self.cluster.snapshot(candidate)
            if not self.publish(candidate, self.names.shared_base):
                # Another node published it first: use that one.
                self.clones.discard_image(candidate)
        state = self.cluster.shared_state(self.names.shared_base)
        if state is not None:
            return state
        raise BackendError(f"cannot publish the shared base image {self.names.spec(self.names.shared_base)}")

    def publish(self, candidate: str, target: str) -> bool:
        """
        Give a finished candidate (snapshot protected) its shared name, as
        an image of no node.  Renaming is atomic in the pool: False if
        another node published that name first.
        """
        assert self.cluster.rbd is not None
        self.cluster.set_meta(candidate, {K_OWNER: SHARED, K_LAYER: "shared", K_PARENT: NONE})
        self.cluster.forget(candidate)
        try:
            self.cluster.rbd.RBD().rename(self.cluster.ioctx, candidate, target)
        except self.cluster.rbd.ImageExists:
            return False
        return True

    def parent_chain(self, layer: LayerInfo, id_map: IDMap) -> str | None:
        """
        The chain ID of the tree the layer is applied on ("" for none), if
        the layer can be shared: sharing is on, ids are not remapped, and
        its parent is an unchanged clone of a shared image.
        """
        if not self.settings.share or not id_map.identity or tuple(layer.root_ids) != (0, 0):
            return None
        if layer.parent is None:
            return ""
        parent = self.cluster.inspect(self.names.image_name(layer.parent))
        if parent is None:
            return None
        chain = parent.meta.get(K_CHAIN, NONE)
        return chain if chain.startswith("sha256:") else None

    def build_candidate(
        self, key: str, parent_chain: str, body: Any, reader: thin.HashingReader,
        id_map: IDMap, chain: str | None = None,
    ) -> tuple[str, str, int]:
        """
        Extract a layer tar into a new candidate cloned from the shared
        image of C{parent_chain}, snapshot it, and return (candidate, chain
        ID, the tar's content size, as L{RBDBackend.apply} answers it).  The
        chain ID follows from the tar's digest, unless C{chain} gives it (a
        tar txgraph wrote itself from a layer containerd filled).
        """
        if parent_chain:
            source = self.names.shared_image(parent_chain)
            pstate = self.cluster.shared_state(source)
        else:
            # Looked at as it is now, like any shared image.
            source, pstate = self.names.shared_base, self.ensure_base()
        if pstate is None or (parent_chain and pstate.meta.get(K_CHAIN) != parent_chain):
            raise BackendError(
                f"the shared image {self.names.spec(source)} of chain {parent_chain or '(base)'} "
                "is missing; load the image's lower layers again"
            )

        def extract(root: str) -> tuple[str, int]:
            stats = archive.apply_layer(body, root, ApplyMode.INPLACE, id_map)
            reader.drain()
            built = chain or thin.chain_id(parent_chain or None, reader.digest())
            return built, stats.content_bytes

        return self._candidate(key, source, pstate, parent_chain, extract, bulk_write=True)

    def _candidate(
        self, key: str, source: str, pstate: ImageState, parent_chain: str,
        fill: Callable[[str], tuple[str, int]], bulk_write: bool,
    ) -> tuple[str, str, int]:
        """
        A new candidate cloned from the shared image C{source} (of chain
        C{parent_chain}, "" for the base, in state C{pstate}), filled by
        C{fill(its rootfs directory)}, which returns (the chain ID of the
        result, a size to return), then snapshotted.  Returns (candidate,
        chain ID, size).
        """
        assert self.cluster.rbd is not None
        candidate = self.names.candidate(key)
        self.clones.discard_image(candidate)
        self.cluster.rbd.RBD().clone(
            self.cluster.ioctx, source, SNAP, self.cluster.ioctx, candidate, data_pool=self.settings.data_pool
        )
        self.cluster.remember(
            ImageState(name=candidate, meta=dict(pstate.meta), size=pstate.snaps[SNAP][1],
                        parent=source)
        )
        with self.cluster.lock:
            self.cluster.checked.add(candidate)
        depth = min(pstate.depth, 1 << 16) + 1
        self.cluster.set_meta(
            candidate,
            {K_OWNER: self.names.node_id, K_LAYER: "candidate", K_PARENT: parent_chain or NONE,
             K_STATE: "dirty", K_DEPTH: str(depth), K_CHAIN: NONE},
        )
        with self.devices.work_mount(candidate, readonly=False, bulk_write=bulk_write) as (top, _device):
            # Its snapshot follows: the handle for it opens while the tree
            # is filled (L{Handles}).
            if self.settings.open_ahead:
                self.cluster.handles.open_soon(candidate)
            chain, size = fill(os.path.join(top, ROOTFS))
        with self.cluster.open_held(candidate) as image:
            if self.settings.flatten_depth and depth >= self.settings.flatten_depth:
                image.flatten()
                depth = 0
            self.cluster.set_meta(candidate, {K_CHAIN: chain, K_DEPTH: str(depth)})
            self.cluster.snapshot(candidate, image)
        return candidate, chain, size

    def settle(self, candidate: str, chain: str, layer: LayerInfo | None, name: str) -> bool:
        """
        Make the candidate of C{chain} the pool's shared image of that chain,
        or discard it if the pool has one already; the layer (if any)
        becomes a clone of the shared image.  Returns whether the pool
        already had it.  Races with other nodes publishing the same chain,
        or removing it, end in one shared image that the layer clones.
        """
        target = self.names.shared_image(chain)
        meta = {K_CHAIN: chain, K_STATE: "shared"}
        for _attempt in range(10):
            existing = self.cluster.shared_state(target)
            if existing is not None:
                if existing.meta.get(K_CHAIN) != chain:
                    raise BackendError(
                        f"image {self.names.spec(target)} does not hold chain {chain} "
                        f"(its {K_CHAIN} is {existing.meta.get(K_CHAIN)!r}); refusing to use it"
                    )
                try:
                    if layer is not None:
                        self.clones.replace_by_clone(layer, name, target, meta)
                except SharedGone:
                    time.sleep(0.1)
                    continue
                self.clones.discard_image(candidate)
                return True
            # The layer is cloned from the candidate before the rename, so
            # a gc elsewhere cannot take the published image from under it.
            if layer is not None:
                built = self.cluster.inspect(candidate, fresh=True)
                if built is None:
                    raise BackendError(f"the candidate {self.names.spec(candidate)} is gone")
                self.clones.replace_by_clone(layer, name, candidate, meta, built)
            if self.publish(candidate, target):
                if layer is not None:
                    # Renamed: the layer's parent is the shared image now.
                    self.cluster.update(name, parent=target)
                return False
            # Another node was first: use its image instead of ours.
            time.sleep(0.05)
        raise BackendError(f"cannot settle the shared image {self.names.spec(target)} (it keeps changing)")

    def apply_shared(
        self, layer: LayerInfo, name: str, body: Any, reader: thin.HashingReader,
        parent_chain: str, id_map: IDMap,
    ) -> int:
        """
        Extract the layer tar into a candidate, publish it (or use the pool's
        image of that chain) and make the layer a clone of the shared image;
        return the tar's content size (as L{RBDBackend.apply}).
        """
        candidate, chain, size = self.build_candidate(
            self.names.key(layer.id), parent_chain, body, reader, id_map
        )
        existed = self.settle(candidate, chain, layer, name)
        log.info(
            "layer {id}: chain {chain} {how} {image}",
            id=layer.id,
            chain=chain,
            how="is already in the pool as" if existed else "published as",
            image=self.names.spec(self.names.shared_image(chain)),
        )
        return size

    def apply_thin(self, layer: LayerInfo, name: str, raw: bytes, id_map: IDMap) -> int:
        """
        Make the layer a clone of the tree a thin descriptor describes (no
        extraction): the snapshot it names with the descriptor written at
        its path, so that the layer reads back as the tar it was loaded
        from.  That tree is itself a shared image, of the chain of the
        descriptor's tar on top of the image's layers: the first node to
        load the thin image makes and publishes it (a candidate cloned from
        the named snapshot, the descriptor written, then L{settle}d like an
        ApplyDiff's); the others only clone it, as L{adopt} does, with no
        mapping and no write.  Returns the descriptor's length: the content
        size of the thin layer's tar (its one entry), as L{RBDBackend.apply}
        answers any tar.
        """
        descriptor = thin.parse(raw)
        if layer.parent is not None:
            raise ThinDescriptorError(
                f"a thin descriptor must be its image's only layer; this one is on top of "
                f"layer {layer.parent}"
            )
        if not id_map.identity or tuple(layer.root_ids) != (0, 0):
            raise ThinDescriptorError(
                "thin images cannot be used with dockerd's userns-remap (their layers "
                "hold the image's own ids)"
            )
        if descriptor.fsid != self.cluster.fsid:
            raise ThinDescriptorError(
                f"thin descriptor points to Ceph cluster {descriptor.fsid}, but this node "
                f"uses cluster {self.cluster.fsid}"
            )
        ours = (self.settings.pool, self.settings.namespace or "")
        if (descriptor.pool, descriptor.namespace) != ours:
            where = "/".join(p for p in (descriptor.pool, descriptor.namespace) if p)
            raise ThinDescriptorError(
                f"thin descriptor points to pool {where}, but this node keeps its layers in "
                f"{'/'.join(p for p in ours if p)}"
            )
        if descriptor.filesystem != self.settings.fs:
            raise ThinDescriptorError(
                f"thin descriptor holds {descriptor.filesystem} snapshots, but this node "
                f"uses {self.settings.fs}"
            )
        top = descriptor.top
        # The thin layer's tree is the image's with the descriptor added:
        # the chain of the descriptor's tar on top of the image's layers.
        # The first node to load the thin image publishes that tree as a
        # shared image (make-thin's own load, usually); every other node
        # only clones it: no mapping, no write.
        chain = thin.chain_id(top.chain_id, "sha256:" + hashlib.sha256(thin.layer_tar(raw)).hexdigest())
        target = self.names.shared_image(chain)
        meta = {K_CHAIN: chain, K_STATE: "shared"}
        existing = self.cluster.shared_state(target)
        if existing is not None and existing.meta.get(K_CHAIN) == chain:
            try:
                self.clones.replace_by_clone(layer, name, target, meta, existing)
            except SharedGone:
                pass  # removed by a gc meanwhile: made again below
            else:
                log.info("layer {id}: thin image's tree taken from the pool's {image}",
                         id=layer.id, image=self.names.spec(target))
                return len(raw)
        state = self.cluster.shared_state(top.image)
        if state is None:
            raise ThinDescriptorError(
                f"thin descriptor names snapshot {self.names.spec(top.image)}@{SNAP}, which does "
                "not exist in the pool (or is not a protected txgraph shared snapshot)"
            )
        if state.meta.get(K_CHAIN) != top.chain_id:
            raise ThinDescriptorError(
                f"thin descriptor: snapshot {self.names.spec(top.image)}@{SNAP} holds chain "
                f"{state.meta.get(K_CHAIN) or '(none)'}, not {top.chain_id}"
            )

        def write(root: str) -> tuple[str, int]:
            path = os.path.join(root, thin.DESCRIPTOR_PATH)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, raw)
                os.fchmod(fd, 0o644)
                os.fchown(fd, 0, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(path, (0, 0), follow_symlinks=False)
            return chain, len(raw)

        assert self.cluster.rbd is not None
        try:
            candidate, _chain, _size = self._candidate(
                self.names.key(layer.id), top.image, state, top.chain_id, write, bulk_write=False
            )
        except (self.cluster.rbd.ImageNotFound, self.cluster.rbd.InvalidArgument):
            raise ThinDescriptorError(
                f"thin descriptor names snapshot {self.names.spec(top.image)}@{SNAP}, which was "
                "removed while this layer was made"
            ) from None
        existed = self.settle(candidate, chain, layer, name)
        log.info(
            "layer {id}: thin image's tree {how} {image}",
            id=layer.id,
            how="is already in the pool as" if existed else "published as",
            image=self.names.spec(target),
        )
        return len(raw)

    def remove(self, name: str) -> None:
        """
        Remove an unused shared image.  RBD decides: unprotecting fails
        while the snapshot has clones.  Clones that are unused shared images
        themselves (another node's gc may be removing them at this moment)
        are waited for; any other clone means the image is in use again, and
        it stays.  Another node removing this very image is fine.
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        deadline = time.monotonic() + max(5.0, self.settings.timeout)
        while True:
            try:
                state = self.cluster.inspect(name, fresh=True)
                break
            except rbd.Error:
                # Being changed by another node's gc right now.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if state is None:
            return
        if not name.startswith(self.names.shared_stem) or state.meta.get(K_OWNER) != SHARED:
            raise BackendError(f"{self.names.spec(name)} is not a shared txgraph image")
        while True:
            try:
                with self.cluster.open(name) as image:
                    remove_snap(image)
                rbd.RBD().remove(self.cluster.ioctx, name)
                return
            except rbd.ImageBusy:
                try:
                    users = [c for c in self.cluster.children(name) if self.names.shared_stem not in c]
                except rbd.Error:
                    # Changed under us (another node's gc): look again.
                    users = []
                if users:
                    raise BackendError(
                        f"{self.names.spec(name)} is in use again ({', '.join(users[:3])} was "
                        "cloned from it since gc looked); it stays"
                    ) from None
            except rbd.ImageNotFound:
                return
            except rbd.Error:
                # Another node's gc is unprotecting or removing it right now.
                with contextlib.suppress(rbd.Error):
                    if self.cluster.inspect(name, fresh=True) is None:
                        return
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{self.names.spec(name)} is still being changed by another node; it is left to it"
                )
            time.sleep(0.2)
            with contextlib.suppress(rbd.Error):
                if self.cluster.inspect(name, fresh=True) is None:
                    return

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """
        Store a layer tar (a file: C{docker save}'s C{layer.tar}) as the
        shared image of its chain, on the chain C{parent_chain} ("" for the
        first layer), unless the pool has it already.  Checks that the
        file's digest is C{diff_id}.  With no C{path}, only says whether the
        pool has the chain.  For C{txgraph-admin make-thin}.
        """
        chain = thin.chain_id(parent_chain or None, diff_id)
        target = self.names.shared_image(chain)
        with self.cluster.op("publication of a shared layer", None, target):
            if self.cluster.shared_state(target) is not None:
                return {"chain_id": chain, "image": target, "existed": True}
            if path is None:
                return {"chain_id": chain, "image": target, "existed": False}
            key = "publish-" + chain.split(":", 1)[1][:32]
            with open(path, "rb") as f:
                reader = thin.HashingReader(cast(BinaryIO, f), progress)
                try:
                    candidate, built, _size = self.build_candidate(
                        key, parent_chain, reader, reader, IDMap()
                    )
                    if built != chain:
                        raise BackendError(
                            f"{path} has digest {reader.digest()}, not the diff ID {diff_id} "
                            "the image's config gives"
                        )
                    existed = self.settle(candidate, chain, None, "")
                except BaseException:
                    self.clones.discard_image(self.names.candidate(key))
                    raise
            return {"chain_id": chain, "image": target, "existed": existed}

    # -- containerd's chains: the remote-snapshot shortcut ---------------------------

    def chain_parent(self, chain: str) -> str | None:
        """
        The chain the pool's shared image of C{chain} was made on ("" for
        the shared base), read from its RBD parent; None if the pool has no
        such image, or if its parent is no shared image (flattened at
        C{flatten_depth}: then it is not offered to containerd).
        """
        if not self.settings.share:
            return None
        target = self.names.shared_image(chain)
        with self.cluster.op("look up of a shared layer", None, target):
            state = self.cluster.shared_state(target)
            if state is None or state.meta.get(K_CHAIN) != chain or state.parent is None:
                return None
            if state.parent == self.names.shared_base:
                return ""
            if not state.parent.startswith(self.names.shared_stem):
                return None
            parent = self.cluster.shared_state(state.parent)
            parent_chain = parent.meta.get(K_CHAIN, NONE) if parent is not None else NONE
            return parent_chain if parent_chain.startswith("sha256:") else None

    def adopt(self, layer: LayerInfo, name: str, chain: str) -> int:
        """
        Make the layer (a fresh clone) a clone of the pool's shared image of
        C{chain}, as an ApplyDiff whose chain the pool already has ends
        (L{settle}): nothing is extracted, nothing written.  Returns 0, the
        bytes the layer holds of its own (measuring the shared image would
        take a diff_iterate over it, ~0.4 s).
        """
        target = self.names.shared_image(chain)
        shared = self.cluster.shared_state(target)
        if shared is None or shared.meta.get(K_CHAIN) != chain:
            raise BackendError(
                f"the pool has no shared image {self.names.spec(target)} of chain {chain}"
            )
        try:
            self.clones.replace_by_clone(layer, name, target, {K_CHAIN: chain, K_STATE: "shared"})
        except SharedGone:
            raise BackendError(
                f"the shared image {self.names.spec(target)} of chain {chain} was removed "
                "while the layer was made from it"
            ) from None
        log.info(
            "layer {id}: chain {chain} taken from the pool's {image}",
            id=layer.id, chain=chain, image=self.names.spec(target),
        )
        return 0

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        """
        Publish a committed layer that containerd filled through its mount
        as the shared image of C{chain_id}: its changes against its parent
        (a tar txgraph writes, streamed through a pipe) are extracted into
        a candidate cloned from the shared image of C{parent_chain}, which
        is then settled like an ApplyDiff's (L{settle}).  The layer itself
        stays as it is.  Returns whether it was published now.
        """
        if not self.settings.share or tuple(layer.root_ids) != (0, 0):
            return False
        target = self.names.shared_image(chain_id)
        key = self.names.key(layer.id)
        with self.cluster.op("publication of a containerd layer", layer.id, target):
            if self.cluster.shared_state(target) is not None:
                return False
            try:
                with self.devices.views(layer, chain, layer.parent) as (new, old):
                    candidate = self._candidate_from_tree(key, parent_chain, chain_id, new, old)
                existed = self.settle(candidate, chain_id, None, "")
            except BaseException:
                self.clones.discard_image(self.names.candidate(key))
                raise
            log.info(
                "layer {id}: chain {chain} {how} {image}",
                id=layer.id,
                chain=chain_id,
                how="was published meanwhile as" if existed else "published as",
                image=self.names.spec(target),
            )
            return not existed

    def _candidate_from_tree(
        self, key: str, parent_chain: str, chain_id: str, new: str, old: str | None
    ) -> str:
        """
        A candidate of C{chain_id} holding the changes from tree C{old} to
        tree C{new}: a thread writes their tar into a pipe that
        L{build_candidate} extracts.
        """
        changes = archive.changes_dirs(new, old)
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(write_fd, "wb") as out:
                    archive.export_changes(new, changes, cast(BinaryIO, out), IDMap())
            except BaseException as e:  # handed to the reading thread
                failure.append(e)

        writer = threading.Thread(target=produce, name=f"txgraph-publish-{key[:12]}")
        writer.start()
        try:
            with os.fdopen(read_fd, "rb") as inp:
                reader = thin.HashingReader(cast(BinaryIO, inp))
                candidate, _chain, _size = self.build_candidate(
                    key, parent_chain, reader, reader, IDMap(), chain=chain_id
                )
        finally:
            writer.join()
        if failure:
            raise BackendError(f"cannot write the changes of {new}: {describe(failure[0])}")
        return candidate

    def info(self) -> dict[str, str]:
        """
        Where this node's shared images are: what a thin descriptor records.
        """
        return {
            "fsid": self.cluster.fsid,
            "pool": self.settings.pool,
            "namespace": self.settings.namespace or "",
            "filesystem": self.settings.fs,
            "stem": self.names.shared_stem,
        }

    def orphans(self, min_age: float) -> list[Orphan]:
        """
        Shared images that nothing uses: no image in the pool (any node's
        layer or candidate) is cloned from them, except other unused shared
        images; and older than C{min_age} seconds.  Leaves come first, so
        removing them in order frees whole chains.  Removal is checked by
        RBD itself (unprotecting a snapshot with clones fails), so two nodes'
        gc never remove what a third one starts to use meanwhile.
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        # Clones in the trash still count as users: purge them first.
        self.trash.settle()
        with self.cluster.op("list of the shared images", None):
            now = time.time()
            children: dict[str, list[str]] = {}
            for name in self.cluster.rbd.RBD().list(self.cluster.ioctx):
                if not name.startswith(self.names.shared_stem):
                    continue
                try:
                    image = rbd.Image(self.cluster.ioctx, name, read_only=True)
                except rbd.ImageNotFound:
                    continue
                try:
                    if dict(image.metadata_list()).get(K_OWNER) != SHARED:
                        continue
                    if now - image.create_timestamp().timestamp() < min_age:
                        continue
                    kids: list[str] = []
                    if any(s["name"] == SNAP for s in image.list_snaps()):
                        image.set_snap(SNAP)
                        kids = [
                            c["image"] if c["pool"] == self.settings.pool and not c["trash"]
                            and (c["pool_namespace"] or None) == self.settings.namespace else "\0"
                            for c in image.list_children2()
                        ]
                    children[name] = kids
                except rbd.ImageNotFound:
                    continue
                finally:
                    image.close()
        unused: list[str] = []
        changed = True
        while changed:
            changed = False
            for name, kids in children.items():
                if name not in unused and all(k in unused for k in kids):
                    unused.append(name)
                    changed = True
        return [
            Orphan("shared", name, f"shared image of chain {name[len(self.names.shared_stem):][:12]} "
                   "that no image is cloned from")
            for name in unused
        ]
