"""
How the rbd backend names what it keeps: a layer's key, its image on this
node, the shared image of a chain, candidates of shared images, image
specs, mount points; and whose an image is (L{Names.ours}).  No cluster
call: names follow from the settings alone.
"""

from __future__ import annotations

import os

from txgraph.backends import layer_key
from txgraph.backends.rbd.mappers.base import ClusterAccess
from txgraph.backends.rbd.metadata import K_OWNER, SHARED, ImageState
from txgraph.backends.rbd.options import Settings

#: Layer IDs whose plain key would be a name of the backend's own.
RESERVED = frozenset({"base"})


class Names:
    """
    The names of one node's images, shared images and local directories.

    @ivar stem: C{<prefix><node>.}, the start of every image of this node.
    @ivar shared_stem: C{<prefix>shared.<fs>.}, the start of every shared
        image of this filesystem.
    @ivar root: C{<state-dir>/rbd}; C{mnt} and C{work} below it.
    @ivar ids: layer keys seen, and their layer IDs.
    """

    def __init__(self, state_dir: str, settings: Settings) -> None:
        self.node_id = settings.node_id
        self.access = ClusterAccess(
            settings.conf, settings.client, settings.keyring, settings.pool,
            settings.namespace, settings.timeout,
        )
        self.root = os.path.join(state_dir, "rbd")
        self.mnt = os.path.join(self.root, "mnt")
        self.work = os.path.join(self.root, "work")
        self.stem = f"{settings.prefix}{self.node_id}."
        self.base_image = f"{self.stem}base"
        self.shared_stem = f"{settings.prefix}{SHARED}.{settings.fs}."
        self.shared_base = f"{self.shared_stem}base"
        self.ids: dict[str, str] = {}

    def key(self, layer_id: str) -> str:
        """
        The layer's key (L{layer_key}): its image name after the node's
        stem, its mapping tag, its mount point's name.  Keys are
        remembered, so that a key found on this host names its layer.
        """
        if layer_id.startswith("publish-"):
            # Candidates of make-thin's publications are named so.
            key = layer_key(layer_id, RESERVED | {layer_id})
        else:
            key = layer_key(layer_id, RESERVED)
        self.ids[key] = layer_id
        return key

    def layer_of(self, key: str) -> str:
        """
        The layer ID of a key found on this host (a hashed key this
        process has not seen stands for itself).
        """
        return self.ids.get(key, key)

    def image_name(self, layer_id: str) -> str:
        """
        The RBD image of a layer on this node.
        """
        return f"{self.stem}{self.key(layer_id)}"

    def shared_image(self, chain: str) -> str:
        """
        The shared image holding the tree of chain C{sha256:<hex>}.
        """
        return f"{self.shared_stem}{chain.split(':', 1)[-1]}"

    def candidate(self, key: str) -> str:
        """
        Where this node builds a shared image before publishing it (C{key}: a
        layer's key, or a name of the backend's own).
        """
        return f"{self.stem}candidate.{key}"

    def spec(self, image: str) -> str:
        """
        C{pool/[namespace/]image}.
        """
        return self.access.image_spec(image)

    def mountpoint(self, layer_id: str) -> str:
        """
        Where the layer is mounted: C{mnt/<key>}.
        """
        return os.path.join(self.mnt, self.key(layer_id))

    def ours(self, state: ImageState) -> bool:
        """
        Whether an image is this node's (or a clone of a shared image or
        candidate that crashed before its own metadata was written).
        """
        owner = state.meta.get(K_OWNER)
        if owner == SHARED and state.name.startswith(self.stem):
            # A clone of a shared image that crashed before its own
            # metadata was written (it starts with a copy of its parent's).
            return state.parent is not None and (
                state.parent.startswith(self.shared_stem)
                or state.parent.startswith(self.candidate(""))
            )
        if owner is not None:
            return owner == self.node_id
        # A clone that crashed before its metadata was written: ours if
        # its parent is.
        return state.parent is not None and state.parent.startswith(self.stem)
