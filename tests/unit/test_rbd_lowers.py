"""
The rbd backend's lower mounts under local container layers
(L{txgraph.backends.rbd.local.Lowers}), with a fake mapper, a fake clock
and a fake mount table: one mapping per base however many users, the
sweep after C{delay}, never while an overlay mount names the lower, what
start keeps and what gc reports.  The real thing on a dev cluster is in
tests/integration/test_rbd_backend.py (the C{local} tests).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from txgraph import mounts
from txgraph.backends.rbd import local
from txgraph.backends.rbd.local import Lowers
from txgraph.errors import BackendError


class FakeNames:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.stem = "txgraph.node."

    def key(self, layer_id: str) -> str:
        return layer_id

    def image_name(self, layer_id: str) -> str:
        return self.stem + layer_id

    def spec(self, image: str) -> str:
        return f"rbd/{image}"


class FakeMapper:
    def __init__(self) -> None:
        self.mapped: dict[str, dict[str, Any]] = {}  # tag -> mapping
        self.maps = 0
        self.finds = 0

    def map(self, image: str, *, readonly: bool, tag: str) -> dict[str, Any]:
        assert readonly
        self.maps += 1
        mapping = {
            "mapper": "fake", "device": f"/dev/fake{self.maps}", "image": image, "tag": tag, "alive": True,
        }
        self.mapped[tag] = mapping
        return mapping

    def kill(self, tag: str) -> None:
        """Its rbd-fuse exits: the device stays, dead."""
        self.mapped[tag]["alive"] = False

    def find(self, image: str, tag: str) -> list[dict[str, Any]]:
        self.finds += 1
        m = self.mapped.get(tag)
        return [m] if m is not None and m["image"] == image else []

    def unmap(self, mapping: dict[str, Any]) -> None:
        self.mapped.pop(mapping["tag"], None)

    def alive(self, mapping: dict[str, Any]) -> bool:
        current = self.mapped.get(mapping["tag"])
        return current is not None and current["device"] == mapping["device"] and current["alive"]


class FakeDevices:
    def __init__(self, table: set[str]) -> None:
        self.mapper = FakeMapper()
        self.mappers = {"fake": self.mapper}
        self.table = table
        self.cluster = self
        self.images = {"txgraph.node.img", "txgraph.node.other"}
        # As the Cluster does: an image's locks are really looked at (and a
        # dead owner's broken) once, and again after it is suspected.
        self.checked: set[str] = set()
        self.looks: list[str] = []

    def inspect(self, name: str) -> object | None:
        return object() if name in self.images else None

    def suspect(self, name: str) -> None:
        self.checked.discard(name)

    def clear_stale_clients(self, name: str) -> None:
        if name not in self.checked:
            self.looks.append(name)
            self.checked.add(name)

    def usable(self) -> list[FakeMapper]:
        return [self.mapper]

    def mapper_for(self, mapping: dict[str, Any]) -> FakeMapper:
        assert mapping["mapper"] == "fake"
        return self.mapper

    def unmap(self, mapping: dict[str, Any]) -> None:
        self.mapper.unmap(mapping)

    def mount_rootfs(self, device: str, target: str, readonly: bool) -> str:
        os.makedirs(os.path.join(target, "rootfs"), exist_ok=True)
        self.table.add(target)
        return os.path.join(target, "rootfs")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Lowers, FakeDevices, Clock, list[mounts.MountEntry]]]:
    table: set[str] = set()
    overlays: list[mounts.MountEntry] = []
    monkeypatch.setattr(mounts, "is_mountpoint", lambda p: p in table)
    monkeypatch.setattr(mounts, "mounted_under", lambda p: [m for m in table if m == p or m.startswith(p + "/")])

    def unmount(point: str) -> None:
        # What the mount showed (its rootfs/) goes with it.
        table.discard(point)
        shutil.rmtree(os.path.join(point, "rootfs"), ignore_errors=True)

    monkeypatch.setattr(mounts, "unmount", unmount)
    monkeypatch.setattr(mounts, "mount_table", lambda naming=None: list(overlays))
    devices = FakeDevices(table)
    clock = Clock()
    lowers = Lowers(FakeNames(tmp_path), devices, delay=5, clock=clock)  # type: ignore[arg-type]
    monkeypatch.setattr(local.threading, "Timer", NoTimer)
    lowers.start()
    yield lowers, devices, clock, overlays


class NoTimer:
    """Timers are driven by hand (L{Lowers.sweep}) in these tests."""

    def __init__(self, due: float, fn: Any) -> None:
        self.due = due

    def start(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def overlay_over(lowers: Lowers, base: str) -> mounts.MountEntry:
    return mounts.MountEntry(
        1, 1, "/", "/somewhere/merged", "overlay", "overlay",
        f"rw,lowerdir=/x/diff:{lowers.path(base)},upperdir=/y,workdir=/z",
    )


def test_one_mapping_per_base_swept_after_the_delay(env: Any) -> None:
    lowers, devices, clock, _ = env
    assert lowers.acquire("img") == lowers.path("img")
    lowers.acquire("img")
    assert devices.mapper.maps == 1
    # A dead client's lock is looked for before the map, once per image
    # after a start.
    assert devices.looks == ["txgraph.node.img"]
    lowers.release("img")
    lowers.release("img")
    assert lowers.idle == {"img": 1000.0}
    clock.now += 4.9
    lowers.sweep()
    assert "lower.img" in devices.mapper.mapped
    clock.now += 0.2
    lowers.sweep()
    assert devices.mapper.mapped == {} and lowers.idle == {}
    assert not os.path.exists(lowers.point("img"))


def test_a_new_user_within_the_delay_keeps_the_mapping(env: Any) -> None:
    lowers, devices, clock, _ = env
    lowers.acquire("img")
    lowers.release("img")
    clock.now += 3
    lowers.acquire("img")
    clock.now += 10
    lowers.sweep()
    assert devices.mapper.maps == 1 and "lower.img" in devices.mapper.mapped


def test_never_swept_while_an_overlay_names_it(env: Any) -> None:
    """
    Whatever the counts say, a lower that an overlay mount uses stays, and
    is looked at again a delay later (not at once, in a loop).
    """
    lowers, devices, clock, overlays = env
    lowers.acquire("img")
    lowers.release("img")
    overlays.append(overlay_over(lowers, "img"))
    clock.now += 6
    lowers.sweep(force=True)
    assert "lower.img" in devices.mapper.mapped
    assert lowers.idle == {"img": clock.now}
    with pytest.raises(BackendError, match="lower layer of a mounted local container layer"):
        lowers.drop("img")
    overlays.clear()
    clock.now += 6
    lowers.sweep()
    assert devices.mapper.mapped == {}


def test_drop_unmaps_at_once(env: Any) -> None:
    lowers, devices, clock, _ = env
    lowers.drop("img")  # nothing there: nothing to do
    lowers.acquire("img")
    lowers.release("img")
    lowers.drop("img")
    assert devices.mapper.mapped == {} and lowers.idle == {}


def test_missing_image_is_named(env: Any) -> None:
    lowers, devices, clock, _ = env
    with pytest.raises(BackendError, match=r"the image rbd/txgraph.node.gone of layer gone"):
        lowers.acquire("gone")
    assert devices.mapper.mapped == {} and lowers.users == {}


def test_one_images_map_does_not_wait_for_anothers(env: Any) -> None:
    """
    Each base has its own lock: while one image's map is under way (held
    here by the fake mapper), another image's lower is made and let go,
    and the swept timer's pass goes on; a second user of the image being
    mapped waits for that map and shares it.
    """
    lowers, devices, clock, _ = env
    entered, go = threading.Event(), threading.Event()
    real_map = devices.mapper.map

    def slow_map(image: str, *, readonly: bool, tag: str) -> dict[str, Any]:
        if tag == "lower.img":
            entered.set()
            assert go.wait(10)
        return real_map(image, readonly=readonly, tag=tag)

    devices.mapper.map = slow_map
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(lowers.acquire("img")))
    second = threading.Thread(target=lambda: results.append(lowers.acquire("img")))
    first.start()
    assert entered.wait(10)
    second.start()
    try:
        # Not waiting for img's map: other's is made, released and swept.
        assert lowers.acquire("other") == lowers.path("other")
        lowers.release("other")
        clock.now += 6
        lowers.sweep()
        assert "lower.other" not in devices.mapper.mapped
        second.join(0.2)
        assert second.is_alive(), "a second user of img did not wait for its map"
    finally:
        go.set()
        first.join(10)
        second.join(10)
    assert results == [lowers.path("img")] * 2
    assert lowers.users == {"img": 2}
    assert [t for t in devices.mapper.mapped] == ["lower.img"]
    assert devices.mapper.maps == 2  # other's, then img's once


def test_liveness_is_checked_from_the_mapping_made(env: Any) -> None:
    """
    A lower this process mapped is checked from its own mapping (one
    device's backing file, one pid), not by a search of every device.
    """
    lowers, devices, clock, _ = env
    lowers.acquire("img")
    finds = devices.mapper.finds
    lowers.acquire("img")
    lowers.release("img")
    lowers.acquire("img")
    assert devices.mapper.finds == finds and devices.mapper.maps == 1


def test_a_dead_unused_lower_is_mapped_again(env: Any) -> None:
    """
    A lower whose rbd-fuse died while nothing used it (lingering after its
    last container, or adopted at a start) is unmounted, unmapped and made
    again by the next user, not handed out dead.
    """
    lowers, devices, clock, _ = env
    lowers.acquire("img")
    lowers.release("img")
    devices.mapper.kill("lower.img")
    assert lowers.acquire("img") == lowers.path("img")
    assert devices.mapper.maps == 2 and devices.mapper.mapped["lower.img"]["alive"]
    assert lowers.users == {"img": 1} and lowers.idle == {}
    # The image's locks are looked at again after the death (the dead
    # client's lock would hold the new open).
    assert devices.looks == ["txgraph.node.img"] * 2
    # A death the sweep finds (it unmaps the dead lower) counts too.
    lowers.release("img")
    devices.mapper.kill("lower.img")
    clock.now += 6
    lowers.sweep()
    assert devices.mapper.mapped == {}
    lowers.acquire("img")
    assert devices.looks == ["txgraph.node.img"] * 3


def test_a_dead_lower_in_use_refuses_new_users(env: Any) -> None:
    """
    A dead lower that a mounted layer uses cannot be made again under it:
    the next user is refused with an error that says so (and the counts
    and the sweep are as they were); once its users are gone it is made
    again.
    """
    lowers, devices, clock, overlays = env
    lowers.acquire("img")
    devices.mapper.kill("lower.img")
    with pytest.raises(BackendError, match=r"layer img \(image rbd/txgraph.node.img\) at .* is dead "
                       r"\(its rbd-fuse exited\) while container layers are mounted over it"):
        lowers.acquire("img")
    assert lowers.users == {"img": 1} and devices.mapper.maps == 1
    lowers.release("img")
    # Not counted, but an overlay mount names it (a restart's adopted lower).
    overlays.append(overlay_over(lowers, "img"))
    with pytest.raises(BackendError, match="is dead"):
        lowers.acquire("img")
    assert lowers.idle == {"img": clock.now}, "the refused user took it out of the sweep"
    overlays.clear()
    lowers.acquire("img")
    assert devices.mapper.maps == 2 and devices.mapper.mapped["lower.img"]["alive"]


def test_a_layer_mounted_over_a_dead_lower_takes_it_again(env: Any) -> None:
    """
    After a restart, a layer still mounted over a lower whose rbd-fuse died
    takes it again (its mount uses it whatever is said): counted, not
    refused, not remade under it; once let go it is made again.
    """
    lowers, devices, clock, overlays = env
    lowers.acquire("img")
    devices.mapper.kill("lower.img")
    overlays.append(overlay_over(lowers, "img"))
    lowers.users.clear()  # the restart: nothing counted yet
    assert lowers.acquire("img", mounted_over=True) == lowers.path("img")
    assert lowers.users == {"img": 1} and devices.mapper.maps == 1
    overlays.clear()
    lowers.release("img")
    lowers.acquire("img")
    assert devices.mapper.maps == 2 and devices.mapper.mapped["lower.img"]["alive"]


def test_start_keeps_mounts_and_unmaps_mappings_without_one(env: Any, tmp_path: Path) -> None:
    """
    A restart finds one lower mounted (kept, adopted: gc reports it until a
    mounted layer takes it) and one mapping whose mount never happened
    (unmapped at once).
    """
    lowers, devices, clock, _ = env
    lowers.acquire("img")
    os.makedirs(lowers.point("other"))
    devices.mapper.map("txgraph.node.other", readonly=True, tag="lower.other")
    again = Lowers(FakeNames(tmp_path), devices, delay=5, clock=clock)  # type: ignore[arg-type]
    again.start()
    assert "lower.other" not in devices.mapper.mapped and not os.path.exists(again.point("other"))
    assert again.adopted == {"img"}
    assert [o.id for o in again.orphans(held=set())] == [again.point("img")]
    assert again.orphans(held={"img"}) == []
    finds = devices.mapper.finds
    again.acquire("img")
    assert devices.mapper.finds > finds, "an adopted lower's mapping is looked for"
    assert devices.mapper.maps == 2 and again.adopted == set()
    again.release("img")
    # Kept after its last use: not a leftover.
    assert again.orphans(held=set()) == []
    again.repair(again.point("img"))
    assert devices.mapper.mapped == {}


def test_per_layer_declarations_read_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The rbd backend's per-layer declarations (read by the layer machine on
    the reactor) answer from memory: with every file system call failing,
    a local layer is neither mapped nor committed and a container's layer
    made on it (or on an image layer, with container_layers=local) is made
    atomically; an image layer is mapped and committed as before.
    """
    from txgraph.backends import LayerInfo, parse_options
    from txgraph.backends.rbd import RBDBackend

    options = parse_options(RBDBackend, {"container_layers": "local", "node_id": "n"})
    backend = RBDBackend(str(tmp_path), options)
    backend.local.ids = {"c-init"}

    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a declaration did I/O")

    for name in ("stat", "lstat", "listdir", "scandir", "open"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)
    assert not backend.maps_layer("c-init") and not backend.commits_layer("c-init")
    assert backend.maps_layer("img") and backend.commits_layer("img")
    assert backend.prepares_atomically(LayerInfo("c", "c-init", readwrite=True))
    assert backend.prepares_atomically(LayerInfo("c2-init", "img", readwrite=True, container=True))
    assert not backend.prepares_atomically(LayerInfo("img2", "img"))
    assert not backend.prepares_atomically(LayerInfo("base", None, readwrite=True, container=True))
