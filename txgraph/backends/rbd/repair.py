"""
The rbd backend's leftovers, for gc: mounts, mappings and images of this
node that no layer holds, removed images stuck in the RBD trash, and
candidates of interrupted applies (L{Repairs.orphans}); and undoing each
(L{Repairs.repair}).
"""

from __future__ import annotations

from collections.abc import Callable

from txgraph import mounts
from txgraph.backends import LayerView, Orphan
from txgraph.backends.rbd.clones import Clones
from txgraph.backends.rbd.cluster import Cluster
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.metadata import TRASH
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.shared import SharedLayers
from txgraph.backends.rbd.trash import Trash
from txgraph.errors import BackendError


class Repairs:
    """
    Finds and removes what this node left behind.
    """

    def __init__(
        self, names: Names, cluster: Cluster, devices: Devices, trash: Trash, clones: Clones,
        shared: SharedLayers,
    ) -> None:
        self.names = names
        self.cluster = cluster
        self.devices = devices
        self.trash = trash
        self.clones = clones
        self.shared = shared

    def orphans(
        self, layers: dict[str, LayerView], list_layers: Callable[[], list[str]]
    ) -> list[Orphan]:
        """
        This node's leftovers: mounts under C{mnt/} and C{work/} that no
        mounted layer holds; mappings of layers that are neither mapped nor
        mounted (or gone); images of this node with no layer row.
        """
        held = {self.names.mountpoint(i) for i, v in layers.items() if v.state == "mounted"}
        found = [
            Orphan("mount", point, "mounted, but no mounted layer holds it")
            for root in (self.names.mnt, self.names.work)
            for point in mounts.mounted_under(root)
            if point not in held
        ]
        attached = {self.names.key(i) for i, v in layers.items() if v.state in ("mapped", "mounted")}
        for mapper in self.devices.usable():
            for tag, image in self.devices.mapping_tags(mapper):
                if tag in attached:
                    continue
                found.append(
                    Orphan(
                        "device",
                        f"{mapper.name}:{tag}:{image}",
                        f"{image} is mapped ({mapper.name}) for {tag}, which holds no mapping",
                    )
                )
        for layer_id in list_layers():
            if layer_id not in layers:
                found.append(
                    Orphan(
                        "object",
                        layer_id,
                        f"image {self.names.spec(self.names.image_name(layer_id))} has no layer row",
                    )
                )
        for image_id, name, why in self.trash.settle():
            found.append(
                Orphan("object", f"{TRASH}{image_id}",
                       f"removed layer image {self.names.spec(name)} is still in the RBD trash: {why}")
            )
        assert self.cluster.rbd is not None
        applying = {self.names.key(i) for i, v in layers.items() if v.state == "applying"}
        stem = self.names.candidate("")
        for name in self.cluster.rbd.RBD().list(self.cluster.ioctx):
            key = name[len(stem):]
            if name.startswith(stem) and key not in applying:
                found.append(
                    Orphan("object", name[len(self.names.stem):],
                           f"candidate shared image {self.names.spec(name)} of an interrupted apply")
                )
        return found

    def repair(self, orphan: Orphan) -> bool:
        """
        Unmount a stray mount, detach a stray mapping, delete a stray image
        (this node's only); False for a kind of orphan that is not the rbd
        backend's.
        """
        if orphan.kind == "mount":
            mounts.unmount(orphan.id)
        elif orphan.kind == "device":
            mapper_name, tag, image = orphan.id.split(":", 2)
            mapper = self.devices.mappers[mapper_name]
            for mapping in mapper.find(image, tag):
                mapper.unmap(mapping)
        elif orphan.kind == "object" and orphan.id.startswith(TRASH):
            # Only the purge deletes from the trash: let it try again.
            image_id = orphan.id[len(TRASH):]
            left = {i: (name, why) for i, name, why in self.trash.settle()}
            if image_id in left:
                name, why = left[image_id]
                raise BackendError(f"rbd purge of {self.names.spec(name)} (trash id {image_id}): {why}")
        elif orphan.kind == "object" and orphan.id.startswith("candidate."):
            name = f"{self.names.stem}{orphan.id}"
            with self.cluster.op("removal of a stray candidate", None, name):
                self.clones.discard_image(name)
        elif orphan.kind == "object":
            name = self.names.image_name(orphan.id)
            with self.cluster.op("removal of a stray image", orphan.id, name):
                self.clones.destroy(orphan.id, name)
        elif orphan.kind == "shared":
            with self.cluster.op("removal of an unused shared image", None, orphan.id):
                self.shared.remove(orphan.id)
        else:
            return False
        return True
