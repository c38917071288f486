"""
The rbd backend's trash: Remove moves a layer's image to the RBD trash
(~13 ms, the name is free at once, clones still read its data), and a
background purge deletes this node's trashed images, clones before the
images they were made from, retrying while some wait for their clones or
for a dead client's watch to end.
"""

from __future__ import annotations

from twisted.logger import Logger

from txgraph import faults, metrics
from txgraph.backends.background import BackgroundPasses
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.metadata import CRASH_TRASHED, K_OWNER, SNAP, describe, remove_snap
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import Settings

log = Logger()

#: Seconds between purge passes while removed images wait in the trash
#: (for their clones to be purged first, or a dead client's watch to end).
PURGE_RETRY = 10.0


class Trash:
    """
    This node's images in the RBD trash and the background purge of them.

    @ivar left: trash entries of this node the last pass could not purge:
        image id -> (image name, why).
    @ivar foreign: trash entries named like ours that are not ours (ids).
    """

    def __init__(self, settings: Settings, names: Names, cluster: Cluster, devices: Devices) -> None:
        self.settings = settings
        self.names = names
        self.cluster = cluster
        self.devices = devices
        self.purger = BackgroundPasses("rbd trash purge", self.purge, PURGE_RETRY)
        self.left: dict[str, tuple[str, str]] = {}
        self.foreign: set[str] = set()

    def waiting(self) -> int:
        """
        How many removed images the last pass left in the trash.
        """
        with self.cluster.lock:
            return len(self.left)

    def move(self, name: str) -> None:
        """
        Move one of this node's images (unmapped everywhere on this host)
        to the RBD trash and wake the purge.
        """
        assert self.cluster.rbd is not None
        self.cluster.handles.drop(name)
        for mapping in self.devices.mappings(name):
            self.devices.unmap(mapping)
        with self.cluster.lock:
            suspect = name not in self.cluster.checked
        if suspect:
            # The move notifies the image's watchers and waits for each to
            # answer: a dead client's watch would hold it ~30 s.
            self.cluster.clear_stale_clients(name, watchers=True)
        try:
            self.cluster.rbd.RBD().trash_move(self.cluster.ioctx, name, 0)
        except self.cluster.rbd.ImageNotFound:
            pass
        self.cluster.forget(name)
        with self.cluster.lock:
            self.cluster.checked.discard(name)
        faults.point(CRASH_TRASHED)
        self.purger.wake()

    def purge(self) -> bool:
        """
        One purge pass: delete this node's images from the RBD trash,
        clones before the images they were made from.  True if some are
        left (see L{left}: their clones are not purged yet, or a
        dead client still watches them, or they cannot be deleted).
        """
        assert self.cluster.rbd is not None
        entries = [
            e for e in self.cluster.rbd.RBD().trash_list(self.cluster.ioctx)
            if e["name"].startswith(self.names.stem) and e["name"] != self.names.base_image
            and e["id"] not in self.foreign
        ]
        left: dict[str, tuple[str, str]] = {}
        progress = True
        while entries and progress:
            progress = False
            for entry in list(entries):
                if self.purger.stopping:
                    return True
                why = self.purge_one(entry["id"], entry["name"])
                if why is None:
                    entries.remove(entry)
                    left.pop(entry["id"], None)
                    progress = True
                else:
                    left[entry["id"]] = (entry["name"], why)
        with self.cluster.lock:
            for image_id, (name, why) in left.items():
                if self.left.get(image_id, ("", ""))[1] != why:
                    log.warn(
                        "removed image {image} (trash id {id}) cannot be purged yet: {why}",
                        image=self.names.spec(name), id=image_id, why=why,
                    )
            self.left = left
        if metrics.current is not None:
            metrics.current.trash_waiting.set(len(left))
        return bool(left)

    def purge_one(self, image_id: str, name: str) -> str | None:
        """
        Delete one trashed image of this node; None when it is gone, else
        why it is not.
        """
        assert self.cluster.rbd is not None
        rbd = self.cluster.rbd
        try:
            image = self.cluster.image(name, image_id)
        except rbd.ImageNotFound:
            return None
        try:
            state = self.cluster.read_state(image, name)
            if not self.names.ours(state):
                self.foreign.add(image_id)
                log.warn(
                    "leaving {image} (trash id {id}) alone: it is named like this node's "
                    "layers but is not one (owner: {owner})",
                    image=self.names.spec(name), id=image_id, owner=state.meta.get(K_OWNER, "none"),
                )
                return None
            try:
                remove_snap(image)
            except rbd.ImageBusy:
                image.set_snap(SNAP)
                kids = [
                    f"{c['image']}{' (in the trash)' if c['trash'] else ''}"
                    for c in image.list_children2()
                ]
                return f"images made from its snapshot remain: {', '.join(kids[:5])}"
        finally:
            image.close()
        for attempt in range(2):
            try:
                rbd.RBD().trash_remove(self.cluster.ioctx, image_id)
                return None
            except rbd.ImageNotFound:
                return None
            except rbd.ImageBusy:
                # Watched: by a dead client of ours (blocklist it and try
                # again), or by a live one somewhere.
                if attempt == 0:
                    self.cluster.clear_stale_clients(name, watchers=True, image_id=image_id)
            except rbd.Error as e:
                return describe(e)
        return "it is still open somewhere (it has watchers); is it mapped on another host?"

    def settle(self) -> list[tuple[str, str, str]]:
        """
        Wait for the purge to try every image removed so far; return what
        is left in the trash: (trash id, image name, why).
        """
        self.purger.settle(max(10.0, 2 * self.settings.timeout))
        with self.cluster.lock:
            return [(i, n, why) for i, (n, why) in sorted(self.left.items())]
