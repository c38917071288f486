"""
Containers' layers on local storage (C{container_layers=local}, issue 18).

An RBD layer costs a clone and a map (about 100 ms on the test machine,
growing by about 7 ms per ancestor), and a container has two: its C{-init}
layer and its own, each made, mapped, mounted, and, for the C{-init} layer,
snapshotted.  With this option a container's layers are overlayfs
directories under the state directory instead (L{LocalLayers}, the overlay
backend's code), whose lowest lower directory is the image's top layer:
its RBD image mapped read-only and mounted once per host (L{Lowers}), for
as long as a container's layer is mounted over it, and C{unmap_delay}
seconds more.  A container then costs what it costs on the overlay
backend; the image is read from the pool as before, through one mapping
that every container of the image shares.

Which layers are local: a layer the front end says is a container's
(L{LayerInfo.container}: dockerd's CreateReadWrite, containerd's active
snapshots but its unpacker's) made on a parent, and every layer made on a
local one (moby's graphtest makes image layers on read-write ones).  A
layer stays where it was made; its directory says which it is, and names
its I{base}, the nearest RBD ancestor (C{base}).  Image layers (Create,
ApplyDiff, containerd's unpacking) stay in the pool, so what the pool
shares between hosts does not change: only what a
container writes stays on its host, as on every other storage driver (a
container is a host's own in dockerd too).  C{docker commit} and builds
write the new image layer into the pool as before (Diff of the local
layer, ApplyDiff into a clone).

Crashes: a local layer is made whole in one rename (the overlay backend's
C{prepare}); its row's write-ahead states are the rbd backend's, durable.
A lower mount is process state rebuilt from reality: after a restart, each
mounted local layer's recovery (C{ensure_mounted}) takes its base again;
the lower mounts found at start are kept and swept once nothing holds them
(C{unmap_delay} after the start), and no lower is ever unmounted while an
overlay mount in this host's mount table names it (a check of the mount
table before each sweep, whatever the counts say).  gc lists the lower
mounts and mappings that nothing holds, and local directories that have no
layer row.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from twisted.logger import Logger

from txgraph import mounts
from txgraph.backends import LayerInfo, LayerView, MountSpec, Orphan
from txgraph.backends.overlay import OverlayBackend
from txgraph.backends.rbd.devices import Devices
from txgraph.backends.rbd.mappers.base import Mapping
from txgraph.backends.rbd.metadata import ROOTFS
from txgraph.backends.rbd.names import Names
from txgraph.errors import BackendError

log = Logger()

#: The file in a local layer's directory naming its base (its nearest RBD
#: ancestor): the layer's ID.
BASE_FILE = "base"
#: Lower mappings are tagged C{lower.<key>}: no layer's key has a C{.}
#: unless it starts with C{x.}, so the tags never meet a layer's own.
LOWER_TAG = "lower."
#: gc's mark on a local layer's leftover, beside the rbd backend's own.
LOCAL_ORPHAN = "local:"


class Lowers:
    """
    RBD layers mapped read-only and mounted as the lowest lower directory
    of local layers: C{rbd/lower/<key>}, one per base and host.

    @ivar users: per base key, the local layers mounted over it (and the
        temporary reads of one).
    @ivar idle: per base key no longer used, since when (the clock's).
    @ivar adopted: the base keys whose lower mount this process found at
        its start and has not used since: a crash's leftovers unless a
        mounted local layer's recovery takes them again.
    @ivar mapped: per base key, the mapping this process made for it (its
        liveness is checked from it, not by a search of every device).
    @ivar lock: guards the four above (held briefly, never across I/O).
    @ivar locks: per base key, the lock held while its lower is made, let go
        or looked at: one image's map (about 100 ms) does not wait for
        another's.  Always taken before L{lock}, never after.
    """

    def __init__(
        self,
        names: Names,
        devices: Devices,
        delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.names = names
        self.devices = devices
        self.delay = delay
        self.clock = clock
        self.root = os.path.join(names.root, "lower")
        self.users: dict[str, int] = {}
        self.idle: dict[str, float] = {}
        self.adopted: set[str] = set()
        self.mapped: dict[str, Mapping] = {}
        self.lock = threading.RLock()
        self.locks: dict[str, threading.RLock] = {}
        self._timer: threading.Timer | None = None
        self._stopped = False

    def point(self, base_id: str) -> str:
        return os.path.join(self.root, self.names.key(base_id))

    def _key_lock(self, key: str) -> threading.RLock:
        """
        The key's own lock (kept for the process's life: one small object
        per image this host ever mapped, so that two threads never hold
        two different locks for one key).
        """
        with self.lock:
            lock = self.locks.get(key)
            if lock is None:
                lock = self.locks[key] = threading.RLock()
            return lock

    def path(self, base_id: str) -> str:
        """
        The base's tree, as a lower directory: C{lower/<key>/rootfs}.
        """
        return os.path.join(self.point(base_id), ROOTFS)

    def start(self) -> None:
        """
        Keep the lower mounts a previous run left (running containers' layers
        may be mounted over them); each is swept once nothing holds it.
        """
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        now = self.clock()
        for key in sorted(os.listdir(self.root)):
            with self._key_lock(key):
                if mounts.is_mountpoint(os.path.join(self.root, key)):
                    with self.lock:
                        self.idle.setdefault(key, now)
                        self.adopted.add(key)
                else:
                    self._unmap_key(key)
        self._schedule()

    def acquire(self, base_id: str, mounted_over: bool = False) -> str:
        """
        One more user of the base's lower mount, made if missing; returns
        its tree.  With C{mounted_over}, the user is a layer already
        mounted over it (taking it again after a restart): a dead mapping
        under it is only reported, since the layer's mount uses it anyway,
        and it is made again once nothing does.
        """
        key = self.names.key(base_id)
        with self._key_lock(key):
            point = self.point(base_id)
            mounted = mounts.is_mountpoint(point)
            if mounted and not self._alive(key):
                if mounted_over:
                    log.warn(
                        "the read-only mapping of layer {id} at {point} is dead (its "
                        "rbd-fuse exited) under a mounted container layer: its container "
                        "cannot read its image",
                        id=base_id,
                        point=point,
                    )
                else:
                    self._replace_dead(base_id, key)  # unmounts it, or raises
                    mounted = False
            if not mounted:
                self._make(base_id, key, point)
            with self.lock:
                self.idle.pop(key, None)
                self.adopted.discard(key)
                self.users[key] = self.users.get(key, 0) + 1
        return self.path(base_id)

    def _alive(self, key: str) -> bool:
        """
        Whether the lower's mapping works: its device is there and its
        process (rbd-fuse) runs.
        """
        with self.lock:
            mapping = self.mapped.get(key)
        if mapping is not None and mapping.get("mapper") in self.devices.mappers:
            return self.devices.mapper_for(mapping).alive(mapping)
        image, tag = f"{self.names.stem}{key}", LOWER_TAG + key
        return any(m["alive"] for mapper in self.devices.usable() for m in mapper.find(image, tag))

    def _replace_dead(self, base_id: str, key: str) -> None:
        """
        A lower whose mapping died (its rbd-fuse killed, or crashed) is let
        go so that it is made again, unless a mounted layer uses it: then
        its containers cannot read their image, and no new one is started
        over it.
        """
        with self.lock:
            users = self.users.get(key, 0)
        if users or self._in_use(key):
            name = self.names.image_name(base_id)
            raise BackendError(
                f"the read-only mapping of layer {base_id} (image {self.names.spec(name)}) at "
                f"{self.point(base_id)} is dead (its rbd-fuse exited) while container layers "
                "are mounted over it: their containers cannot read their image; stop them, "
                "and the next container maps the image again"
            )
        log.warn(
            "the read-only mapping of layer {id} at {point} is dead (its rbd-fuse "
            "exited): mapping it again",
            id=base_id,
            point=self.point(base_id),
        )
        self.devices.cluster.suspect(self.names.image_name(base_id))
        self._unmap_now(key)

    def _make(self, base_id: str, key: str, point: str) -> None:
        assert self.devices.mapper is not None
        name = self.names.image_name(base_id)
        self._unmap_key(key)
        # A dead rbd-fuse of this node (killed, before or after a restart)
        # still holds the image's exclusive lock: the new one's open would
        # wait for it, past the map's timeout.  As before a layer's own
        # read-write map, the locks are looked at once per image after a
        # start, and again once a death was seen (Cluster.suspect): the
        # lock is broken and its dead owner blocklisted.
        self.devices.cluster.clear_stale_clients(name)
        if self.devices.cluster.inspect(name) is None:
            raise BackendError(
                f"the image {self.names.spec(name)} of layer {base_id}, under a local "
                "container layer, is gone"
            )
        # The directory first: a crash after the map leaves it, and start
        # (or gc) then finds the mapping by its tag.
        os.makedirs(point, mode=0o700, exist_ok=True)
        mapping = self.devices.mapper.map(name, readonly=True, tag=LOWER_TAG + key)
        try:
            self.devices.mount_rootfs(mapping["device"], point, readonly=True)
        except BaseException:
            self.devices.unmap(mapping)
            raise
        with self.lock:
            self.mapped[key] = mapping

    def release(self, base_id: str) -> None:
        """
        One user fewer; the mount is swept C{delay} seconds after its last.
        """
        key = self.names.key(base_id)
        with self._key_lock(key):
            with self.lock:
                users = self.users.get(key, 0) - 1
                if users > 0:
                    self.users[key] = users
                    return
                self.users.pop(key, None)
            if mounts.is_mountpoint(os.path.join(self.root, key)):
                with self.lock:
                    self.idle[key] = self.clock()
        self._schedule()

    def drop(self, base_id: str) -> None:
        """
        Unmount and unmap the base's lower now (its layer is being removed or
        remade); refused while a local layer is mounted over it.
        """
        key = self.names.key(base_id)
        with self._key_lock(key):
            with self.lock:
                counted = key in self.users
            if not counted and not os.path.lexists(os.path.join(self.root, key)):
                return
            if self._in_use(key):
                raise BackendError(
                    f"layer {base_id} is the lower layer of a mounted local container layer"
                )
            with self.lock:
                counted = bool(self.users.pop(key, None))
            if counted:
                log.warn("lower {key} was counted in use, but no mount uses it", key=key)
            self._unmap_now(key)

    def _in_use(self, key: str) -> bool:
        """
        Whether an overlay mount on this host names the lower as a lower
        directory (the truth, whatever the counts say).
        """
        needle = os.path.join(self.root, key, ROOTFS)
        for entry in mounts.mount_table(naming=needle):
            if entry.fstype != "overlay":
                continue
            for option in entry.options.split(","):
                if option.startswith("lowerdir=") and needle in option[len("lowerdir=") :].split(":"):
                    return True
        return False

    def _unmap_now(self, key: str) -> None:
        """
        Let a lower that nothing uses go now: no longer kept, nor adopted;
        unmounted and unmapped.  The caller holds the key's lock.
        """
        with self.lock:
            self.idle.pop(key, None)
            self.adopted.discard(key)
        self._unmap_key(key)

    def _unmap_key(self, key: str) -> None:
        with self.lock:
            self.mapped.pop(key, None)
        point = os.path.join(self.root, key)
        for inner in mounts.mounted_under(point):
            mounts.unmount(inner)
        tag = LOWER_TAG + key
        for mapper in self.devices.usable():
            for mapping in mapper.find(f"{self.names.stem}{key}", tag):
                if not mapping["alive"]:
                    self.devices.cluster.suspect(mapping["image"])
                mapper.unmap(mapping)
        try:
            os.rmdir(point)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn("cannot remove {point}: {error}", point=point, error=e.strerror)

    def sweep(self, force: bool = False) -> None:
        """
        Unmount and unmap the lowers unused for C{delay} seconds (all unused
        ones with C{force}); one that an overlay mount still names stays.
        """
        now = self.clock()
        with self.lock:
            candidates = sorted(self.idle)
        for key in candidates:
            with self._key_lock(key):
                with self.lock:
                    since = self.idle.get(key)
                    if since is None:
                        continue
                    if self.users.get(key):
                        self.idle.pop(key)
                        continue
                if not force and now - since < self.delay:
                    continue
                if self._in_use(key):
                    # A mount this process does not count (yet: recovery
                    # takes it, or a mount outside txgraph): look again
                    # after another delay, not at once.
                    with self.lock:
                        self.idle[key] = now
                    continue
                try:
                    self._unmap_now(key)
                except Exception as e:
                    log.warn("cannot release lower {key}: {error}", key=key, error=e)
        self._schedule()

    def _schedule(self) -> None:
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._stopped or not self.idle:
                return
            due = max(0.0, min(self.idle.values()) + self.delay - self.clock()) + 0.05
            timer = threading.Timer(due, self._swept)
            timer.daemon = True
            timer.name = "txgraph-rbd-lower-sweep"
            self._timer = timer
            timer.start()

    def _swept(self) -> None:
        try:
            self.sweep()
        except Exception:
            log.failure("the sweep of the rbd lower mounts failed")

    def stop(self) -> None:
        """
        Release the unused lowers now; stop the timer.  Lowers in use stay
        (running containers' layers are mounted over them).
        """
        self.sweep(force=True)
        with self.lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def orphans(self, held: set[str]) -> list[Orphan]:
        """
        Lower mounts and mappings that no mounted local layer (C{held}: base
        keys) holds, but for those this process keeps for C{delay} after
        their last use (not a leftover: due to go).
        """
        found = []
        names = sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        for key in names:
            point = os.path.join(self.root, key)
            with self.lock:
                used = bool(self.users.get(key))
                lingering = key in self.idle and key not in self.adopted
            if key not in held and not used and not lingering and not self._in_use(key):
                found.append(
                    Orphan("mount", point, "a lower mount or mapping that no mounted container layer uses")
                )
        return found

    def repair(self, point: str) -> None:
        key = os.path.basename(point)
        with self._key_lock(key):
            with self.lock:
                used = bool(self.users.get(key))
            if used or self._in_use(key):
                return
            self._unmap_now(key)


class LocalLayers(OverlayBackend):
    """
    The overlay backend's layers under C{rbd/local/}, whose lowest lower
    directory is their base's lower mount (L{Lowers}), which a mounted
    local layer holds (counted once per layer) until its last Put.
    """

    name = "rbd-local"

    def __init__(self, state_dir: str, names: Names, lowers: Lowers, enabled: bool) -> None:
        super().__init__(state_dir, {"mountopt": ""}, root=os.path.join(names.root, "local"))
        self.names = names
        self.lowers = lowers
        self.enabled = enabled
        #: The mounted local layers that hold their base, and that base
        #: (C{""} for none): each is counted once in L{Lowers.users}.
        self.counted: dict[str, str] = {}
        #: The local layers (their directories, read at start, then kept
        #: up to date), so that the layer machine can ask on the reactor.
        self.ids: set[str] = set()

    def used(self) -> bool:
        """
        Whether local layers are made, or may exist (the directory is there).
        """
        return self.enabled or os.path.isdir(self.root)

    def start(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        super().start()
        self.ids = set(self.list_layers())

    def is_local(self, layer_id: str) -> bool:
        """
        Whether the layer is a local one (memory only).
        """
        return layer_id in self.ids

    def prepare(self, layer: LayerInfo) -> None:
        super().prepare(layer)
        self.ids.add(layer.id)

    def _destroy(self, layer_id: str) -> None:
        super()._destroy(layer_id)
        self.ids.discard(layer_id)

    def makes_local(self, layer: LayerInfo) -> bool:
        """
        Whether a new layer is to be local: a container's made on a parent,
        with C{container_layers=local}, or any layer made on a local one.
        """
        if layer.parent is None:
            return False
        return self.is_local(layer.parent) or (self.enabled and layer.container)

    def base_of(self, layer_id: str) -> str | None:
        """
        The local layer's base (its nearest RBD ancestor), or None.
        """
        try:
            with open(os.path.join(self._dir(layer_id), BASE_FILE), encoding="utf-8") as f:
                return f.read() or None
        except FileNotFoundError:
            return None

    def _prepare_extra(self, staging: str, layer: LayerInfo) -> None:
        assert layer.parent is not None
        base = self.base_of(layer.parent) if self.is_local(layer.parent) else layer.parent
        with open(os.path.join(staging, BASE_FILE), "w", encoding="utf-8") as f:
            f.write(base or "")

    def lower_dirs(self, chain: list[LayerInfo]) -> list[str]:
        """
        The local ancestors' diff directories, then the base's lower mount.
        """
        result = []
        for ancestor in chain:
            if self.is_local(ancestor.id):
                result.append(self.diff_dir(ancestor.id))
            else:
                result.append(self.lowers.path(ancestor.id))
                break
        return result

    # -- holding the base while mounted ---------------------------------------

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        base = self.base_of(layer.id)
        counted = layer.id in self.counted
        if base and not counted:
            self.lowers.acquire(base)
        try:
            directory = super().mount(layer, chain)
        except BaseException:
            if base and not counted:
                self.lowers.release(base)
            raise
        self.counted[layer.id] = base or ""
        return directory

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        After a restart, a mounted local layer takes its base again.
        """
        merged = self._merged(layer.id)
        if not mounts.is_mountpoint(merged):
            return self.mount(layer, chain)
        base = self.base_of(layer.id)
        if base and layer.id not in self.counted:
            self.lowers.acquire(base, mounted_over=True)
        self.counted[layer.id] = base or ""
        return super().ensure_mounted(layer, chain)

    def unmount(self, layer: LayerInfo) -> None:
        super().unmount(layer)
        self._uncount(layer.id)

    def remove(self, layer: LayerInfo) -> None:
        super().remove(layer)
        self._uncount(layer.id)

    def _uncount(self, layer_id: str) -> None:
        base = self.counted.pop(layer_id, None)
        if base:
            self.lowers.release(base)

    @contextlib.contextmanager
    def reading(self, layer: LayerInfo, parent: str | None) -> Iterator[None]:
        """
        The lowers a read of a local layer needs (its base; an RBD C{parent}
        beyond it too), held while the read runs.
        """
        base = self.base_of(layer.id)
        wanted = [base] if base else []
        if parent is not None and parent != base and not self.is_local(parent):
            wanted.append(parent)
        with contextlib.ExitStack() as stack:
            for base_id in wanted:
                self.lowers.acquire(base_id)
                stack.callback(self.lowers.release, base_id)
            yield

    # -- what the rbd backend answers for a local layer ------------------------

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        overlay2's keys, and the image of the layer's base.
        """
        base = self.base_of(layer.id)
        spec = self.names.spec(self.names.image_name(base)) if base else ""
        return {**super().metadata(layer, chain), "Base": spec}

    def mount_specs(self, layer: LayerInfo, chain: list[LayerInfo], view: bool) -> list[MountSpec]:
        """
        A bind of the layer's mount, which it keeps while the snapshot
        exists, as the rbd backend's own layers do.
        """
        merged = self._merged(layer.id)
        if not mounts.is_mountpoint(merged):
            raise BackendError(f"rbd mounts of local layer {layer.id}: it is not mounted at {merged}")
        return [MountSpec("bind", merged, ("ro" if view else "rw", "rbind"))]

    def all_orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        Local layers' leftovers (their IDs marked L{LOCAL_ORPHAN}) and
        unused lowers.
        """
        found = []
        if os.path.isdir(self.root):
            found = [
                Orphan(o.kind, LOCAL_ORPHAN + o.id if o.kind == "object" else o.id, o.detail)
                for o in self.orphans(layers)
            ]
        return found + self.lowers.orphans(self.held_bases(layers))

    def repair_any(self, orphan: Orphan) -> bool:
        """
        Repair one of L{all_orphans}; False for one that is not.
        """
        if orphan.kind == "object" and orphan.id.startswith(LOCAL_ORPHAN):
            self.repair(Orphan(orphan.kind, orphan.id[len(LOCAL_ORPHAN):], orphan.detail))
        elif orphan.kind == "mount" and orphan.id.startswith(self.root + os.sep):
            self.repair(orphan)
        elif orphan.kind == "mount" and orphan.id.startswith(self.lowers.root + os.sep):
            self.lowers.repair(orphan.id)
        else:
            return False
        return True

    def held_bases(self, layers: dict[str, LayerView]) -> set[str]:
        """
        The keys of the bases of the mounted local layers among C{layers}.
        """
        held = set()
        for layer_id, view in layers.items():
            if view.state == "mounted" and self.is_local(layer_id):
                base = self.base_of(layer_id)
                if base:
                    held.add(self.names.key(base))
        return held
