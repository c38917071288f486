"""
The rbd backend's link to the cluster: the librados connection and pool
(L{Cluster.connect}), and what it does to images through librbd and
cls_rbd: looks (cached for this node's own images, which only it changes),
metadata, snapshots, children, the locks of dead clients.  It maps and
mounts nothing: it asks its owner whether a local mapping of an image is
alive (L{Cluster.mapped_alive}) before it breaks a lock.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
from collections.abc import Callable, Iterator
from time import perf_counter
from types import ModuleType
from typing import Any

from twisted.logger import Logger

from txgraph import metrics
from txgraph.backends.rbd.handles import Handles
from txgraph.backends.rbd.metadata import (
    K_OWNER,
    SHARED,
    SNAP,
    ImageState,
    client_nonce,
    decode_string,
    describe,
    encode_metadata,
)
from txgraph.backends.rbd.names import Names
from txgraph.backends.rbd.options import Settings
from txgraph.errors import BackendError, TxgraphError

log = Logger()


def timed_out(error: BaseException) -> bool:
    """
    Whether an error is the cluster not answering in time (librados's
    C{TimedOut}, or an C{ETIMEDOUT} errno from librbd).
    """
    while error is not None:
        if type(error).__name__ == "TimedOut" or getattr(error, "errno", None) == errno.ETIMEDOUT:
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


class Cluster:
    """
    The connection to one pool (and namespace) and this node's view of
    its images.

    @ivar rados: the C{rados} module, once the backend imported it.
    @ivar rbd: the C{rbd} module, likewise.
    @ivar handle: the connected C{rados.Rados}, or None.
    @ivar ioctx: the pool's I/O context, or None.
    @ivar fsid: the cluster's FSID once connected.
    @ivar lock: guards C{known} and C{checked} (backend threads share them).
    @ivar known: this node's own images, as it last saw or made them.
    @ivar checked: images whose locks were checked for dead clients since
        start.
    @ivar mapped_alive: tells whether a local mapping of an image is alive
        (set by the backend, which owns the mappers).
    @ivar handles: images opened read-write ahead of their commit, which
        L{snapshot} uses instead of opening them.
    """

    def __init__(self, settings: Settings, names: Names) -> None:
        self.settings = settings
        self.names = names
        self.rados: ModuleType | None = None
        self.rbd: ModuleType | None = None
        self.handle: Any = None
        self.ioctx: Any = None
        self.fsid = ""
        self.lock = threading.Lock()
        self.known: dict[str, ImageState] = {}
        self.checked: set[str] = set()
        self.mapped_alive: Callable[[str], bool] = lambda name: False
        self.handles = Handles(lambda name: self.image(name))

    def close(self) -> None:
        """
        Close the handles held, the pool and the connection (what is open
        of them).
        """
        self.handles.close_all()
        if self.ioctx is not None:
            with contextlib.suppress(Exception):
                self.ioctx.close()
            self.ioctx = None
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self.handle.shutdown()
            self.handle = None

    @contextlib.contextmanager
    def op(self, op: str, layer_id: str | None, image: str | None = None) -> Iterator[None]:
        """
        Name the operation, layer and image in any error raised inside;
        time it (L{txgraph.metrics}: C{op} is one of a few fixed names).
        """
        m = metrics.current
        start = perf_counter() if m is not None else 0.0
        try:
            yield
        except Exception as e:
            if m is not None:
                m.cluster_call(op, perf_counter() - start, timed_out(e))
            if image is not None:
                # What this node believed of the image may be wrong now.
                self.forget(image)
            target = f" (image {self.names.spec(image)})" if image else ""
            subject = f" of layer {layer_id}" if layer_id else ""
            prefix = f"rbd {op}{subject}{target}"
            if isinstance(e, TxgraphError):
                if e.message.startswith("rbd "):
                    raise
                raise type(e)(f"{prefix}: {e.message}") from e
            raise BackendError(f"{prefix}: {describe(e)}") from e
        if m is not None:
            m.cluster_call(op, perf_counter() - start, False)

    def connect(self) -> None:
        """
        Connect to the cluster and open the pool (and namespace); every
        failure is a L{BackendError} that says what to fix.
        """
        assert self.rados is not None and self.rbd is not None
        rados, rbd = self.rados, self.rbd
        who = (
            f"Ceph cluster of {self.settings.conf} as client.{self.settings.client} "
            f"(keyring {self.settings.keyring or 'named in ' + self.settings.conf})"
        )
        try:
            cluster = rados.Rados(
                conffile=self.settings.conf,
                rados_id=self.settings.client,
                conf={"keyring": self.settings.keyring} if self.settings.keyring else {},
            )
        except rados.Error as e:
            raise BackendError(f"rbd backend: cannot read {self.settings.conf}: {describe(e)}") from None
        for key in ("rados_mon_op_timeout", "rados_osd_op_timeout", "client_mount_timeout"):
            cluster.conf_set(key, str(max(1, math.ceil(self.settings.timeout))))
        try:
            cluster.connect(timeout=int(max(1, self.settings.timeout)))
        except rados.PermissionDeniedError:
            cluster.shutdown()
            raise BackendError(
                f"rbd backend: the {who} refused the connection: permission denied "
                f"(wrong key for client.{self.settings.client}?)"
            ) from None
        except rados.TimedOut:
            cluster.shutdown()
            raise BackendError(
                f"rbd backend: no answer from the {who} within {self.settings.timeout:g} s "
                f"(are its monitors up?)"
            ) from None
        except rados.Error as e:
            cluster.shutdown()
            raise BackendError(f"rbd backend: cannot connect to the {who}: {describe(e)}") from None
        self.handle = cluster
        try:
            try:
                self.ioctx = cluster.open_ioctx(self.settings.pool)
            except rados.ObjectNotFound:
                raise BackendError(
                    f"rbd backend: pool {self.settings.pool} does not exist in the {who} (create it: "
                    f"ceph osd pool create {self.settings.pool}; rbd pool init {self.settings.pool})"
                ) from None
            if self.settings.data_pool is not None and not cluster.pool_exists(self.settings.data_pool):
                raise BackendError(
                    f"rbd backend: data pool {self.settings.data_pool} does not exist in the {who}"
                )
            if self.settings.namespace:
                if not rbd.RBD().namespace_exists(self.ioctx, self.settings.namespace):
                    raise BackendError(
                        f"rbd backend: namespace {self.settings.namespace} does not exist in pool "
                        f"{self.settings.pool} (create it: rbd namespace create "
                        f"{self.settings.pool}/{self.settings.namespace})"
                    )
                self.ioctx.set_namespace(self.settings.namespace)
            # A cheap call that needs the client's RBD capabilities.
            rbd.RBD().list(self.ioctx)
            self.fsid = cluster.get_fsid()
        except rados.PermissionError as e:
            self.close()
            raise BackendError(
                f"rbd backend: client.{self.settings.client} may not use pool {self.settings.pool} of the "
                f"{who}: {describe(e)} (give it: mon 'profile rbd' osd 'profile rbd "
                f"pool={self.settings.pool}')"
            ) from None
        except rados.TimedOut:
            self.close()
            raise BackendError(
                f"rbd backend: pool {self.settings.pool} of the {who} does not answer within "
                f"{self.settings.timeout:g} s (are its OSDs up?)"
            ) from None
        except TxgraphError:
            self.close()
            raise
        except rados.Error as e:
            self.close()
            raise BackendError(
                f"rbd backend: pool {self.settings.pool} of the {who}: {describe(e)}"
            ) from None

    def inspect(self, name: str, fresh: bool = False) -> ImageState | None:
        """
        What this node knows of an image: from its cache of its own images
        (which only it changes), else from a read-only look (no watch, no
        lock); None if the image does not exist.  Opening a clone opens
        its whole ancestry, so looks are kept few.
        """
        if not fresh:
            with self.lock:
                known = self.known.get(name)
            if known is not None:
                return known.copy()
        assert self.rbd is not None
        rbd = self.rbd
        try:
            image = rbd.Image(self.ioctx, name, read_only=True)
        except rbd.ImageNotFound:
            self.forget(name)
            return None
        try:
            state = self.read_state(image, name)
        finally:
            image.close()
        if self.names.ours(state):
            self.remember(state)
        return state

    def read_state(self, image: Any, name: str) -> ImageState:
        """
        An open image's metadata, snapshots, size and parent.
        """
        assert self.rbd is not None
        rbd = self.rbd
        state = ImageState(name=name, meta=dict(image.metadata_list()))
        for snap in image.list_snaps():
            if snap.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) != (
                rbd.RBD_SNAP_NAMESPACE_TYPE_USER
            ):
                # A removed snapshot that clones still use (librbd keeps
                # it in the trash namespace, under a UUID): not ours.
                continue
            state.snaps[snap["name"]] = (
                bool(image.is_protected_snap(snap["name"])),
                int(snap["size"]),
            )
        state.size = int(image.size())
        try:
            state.parent = image.get_parent_image_spec()["image_name"]
        except rbd.ImageNotFound:
            state.parent = None
        return state

    def remember(self, state: ImageState) -> None:
        """
        Record in the cache what this node saw or made of its image.
        """
        with self.lock:
            self.known[state.name] = state.copy()

    def forget(self, name: str) -> None:
        """
        Drop an image from the cache (what was believed of it may be wrong).
        """
        with self.lock:
            self.known.pop(name, None)

    def update(self, name: str, **changes: Any) -> None:
        """
        Record in the cache a change this node made to its image.
        """
        with self.lock:
            known = self.known.get(name)
            if known is None:
                return
            for key, value in changes.items():
                if key == "meta":
                    known.meta.update(value)
                elif key == "snap":
                    if value is None:
                        known.snaps.pop(SNAP, None)
                    else:
                        known.snaps[SNAP] = value
                else:
                    setattr(known, key, value)

    def require(self, name: str) -> ImageState:
        """
        The state of one of this node's images; an error if it is missing or
        another node's.
        """
        state = self.inspect(name)
        if state is None:
            raise BackendError("its image does not exist")
        if not self.names.ours(state):
            raise BackendError(
                f"image {self.names.spec(name)} belongs to node "
                f"{state.meta.get(K_OWNER, '(none: not a txgraph image)')}, not {self.names.node_id}"
            )
        return state

    def refuse_foreign(self, state: ImageState) -> None:
        """
        Refuse to touch an image that is not one of this node's layers.
        """
        raise BackendError(
            f"image {self.names.spec(state.name)} already exists and is not a txgraph layer of "
            f"node {self.names.node_id} (owner: {state.meta.get(K_OWNER, 'none')}); "
            f"refusing to touch it"
        )

    def image(self, name: str, image_id: str | None = None, read_only: bool = False) -> Any:
        """
        Open an image by name, or by id (an image in the trash has only
        its id).
        """
        assert self.rbd is not None
        if image_id:
            return self.rbd.Image(self.ioctx, image_id=image_id, read_only=read_only)
        return self.rbd.Image(self.ioctx, name, read_only=read_only)

    @contextlib.contextmanager
    def open(self, name: str, image_id: str | None = None) -> Iterator[Any]:
        """
        An image opened read-write (by name, or by id), closed on leaving.
        """
        image = self.image(name, image_id)
        try:
            yield image
        finally:
            image.close()

    def children(self, name: str) -> list[str]:
        """
        The images cloned from the image's C{@txgraph} snapshot, as
        C{pool/[namespace/]image}.
        """
        assert self.rbd is not None
        try:
            image = self.rbd.Image(self.ioctx, name, snapshot=SNAP, read_only=True)
        except self.rbd.ImageNotFound:
            return []
        try:
            return [
                f"{c['pool']}/{c['pool_namespace'] + '/' if c['pool_namespace'] else ''}"
                f"{c['image']}{' (in the trash)' if c['trash'] else ''}"
                for c in image.list_children2()
            ]
        finally:
            image.close()

    def suspect(self, image: str) -> None:
        """
        A client of this image died (a mapper found dead): check its locks
        again before the next write.
        """
        with self.lock:
            self.checked.discard(image)

    def clear_stale_clients(
        self, name: str, watchers: bool = False, image_id: str | None = None
    ) -> None:
        """
        Break the exclusive lock (and, with C{watchers}, drop the watches)
        of clients of this node's image that are dead: held while no local
        mapping of the image is alive, by another client than ours.  Their
        next writer would otherwise wait ~30 s for the watch to time out.

        Only dead clients leave locks behind, and this node sees its
        clients die (a mapping whose process is gone); so each image is
        checked once after start, and again only after such a death.
        """
        assert self.rbd is not None and self.handle is not None
        if not watchers:
            with self.lock:
                if name in self.checked:
                    return
        rbd = self.rbd
        own = client_nonce(self.handle.get_addrs())
        try:
            image = self.image(name, image_id, read_only=True)
        except rbd.ImageNotFound:
            return
        try:
            lockers = image.list_lockers() or {}
            held = [
                entry for entry in lockers.get("lockers", []) if client_nonce(entry[2]) != own
            ]
            watching = (
                [w["addr"] for w in image.watchers_list() if client_nonce(w["addr"]) != own]
                if watchers
                else []
            )
        finally:
            image.close()
        if held or watching:
            if self.mapped_alive(name):
                return
            if held:
                with self.open(name, image_id) as rw:
                    for client, cookie, address in held:
                        log.warn(
                            "breaking the lock of dead client {client} ({address}) "
                            "on {image}",
                            client=client,
                            address=address,
                            image=self.names.spec(name),
                        )
                        with contextlib.suppress(rbd.ImageNotFound, rbd.InvalidArgument):
                            rw.break_lock(client, cookie)
            for address in watching:
                log.warn(
                    "blocklisting dead client {address} still watching {image}",
                    address=address,
                    image=self.names.spec(name),
                )
                self.handle.blocklist_add(address, 3600)
        with self.lock:
            self.checked.add(name)

    def set_meta(self, name: str, values: dict[str, str]) -> None:
        """
        Set image metadata keys, all in one call of cls_rbd's
        C{metadata_set} on the image's header object: the call librbd
        makes for each key, without opening the image (an open, the
        exclusive lock and a close cost ~50 ms here; this is one round
        trip).  Only this node's own images that nothing has mapped
        read-write get metadata, and only txgraph reads these keys, so no
        open handle needs to hear of the change.
        """
        assert self.rbd is not None and self.rados is not None
        header = f"rbd_header.{self.image_id(name)}"
        try:
            self.ioctx.execute(header, "rbd", "metadata_set", encode_metadata(values))
        except self.rados.ObjectNotFound:
            raise self.rbd.ImageNotFound(f"image {name} has no header", errno=errno.ENOENT) from None
        self.update(name, meta=values)

    def image_id(self, name: str) -> str:
        """
        The id of a (format 2) image, from its C{rbd_id.<name>} object.
        """
        assert self.rbd is not None and self.rados is not None
        try:
            raw = self.ioctx.read(f"rbd_id.{name}", 1024)
        except self.rados.ObjectNotFound:
            raise self.rbd.ImageNotFound(f"image {name} not found", errno=errno.ENOENT) from None
        return decode_string(raw)

    def snapshot(self, name: str, image: Any = None) -> None:
        """
        Snapshot and protect (idempotent), through C{image} if given (an
        open handle of the caller's), else through the handle opened ahead
        of the commit (L{handles}), else a handle opened now.
        """
        state = self.inspect(name)
        if state is None:
            self.handles.drop(name)
            raise BackendError("its image does not exist")
        if state.committed and state.snaps[SNAP][0]:
            self.handles.drop(name)
            return
        self.clear_before_commit(name)
        with self.open_held(name) if image is None else contextlib.nullcontext(image) as image:
            if not image.snap_exists(SNAP):
                image.create_snap(SNAP)
            if not image.is_protected_snap(SNAP):
                image.protect_snap(SNAP)
            size = int(image.size())
        self.update(name, snap=(True, size))

    def clear_before_commit(self, name: str) -> None:
        """
        L{clear_stale_clients} before a commit's writes to the image (its
        flatten, its snapshot), dropping dead clients' watches too while
        the image is unchecked (its first commit since start, or a client
        died): a handle a killed txgraph held ahead of this commit may
        still watch the image, and every notice to watchers would wait for
        it (about 30 s).
        """
        with self.lock:
            unchecked = name not in self.checked
        self.clear_stale_clients(name, watchers=unchecked)

    @contextlib.contextmanager
    def open_held(self, name: str) -> Iterator[Any]:
        """
        An image opened read-write: the handle opened ahead of its commit
        if one is held (L{handles}), else a new one; closed on leaving.
        """
        held = self.handles.take(name)
        if held is None:
            with self.open(name) as image:
                yield image
            return
        try:
            yield held
        finally:
            held.close()

    def drop_snapshot(self, name: str) -> None:
        """
        Undo a commit: unprotect and remove the snapshot, if nothing was
        cloned from it.
        """
        assert self.rbd is not None
        self.clear_stale_clients(name)
        with self.open(name) as image:
            if image.snap_exists(SNAP):
                if image.is_protected_snap(SNAP):
                    try:
                        image.unprotect_snap(SNAP)
                    except self.rbd.ImageBusy:
                        children = self.children(name)
                        raise BackendError(
                            f"layers were made from its snapshot @{SNAP}: "
                            f"{', '.join(children[:5]) or '(children in the trash)'}"
                        ) from None
                image.remove_snap(SNAP)
        self.update(name, snap=None)

    def shared_state(self, name: str) -> ImageState | None:
        """
        A shared image as it is now in the pool, if it is a published one
        (owned by no node, with its protected snapshot); None otherwise.
        Never cached: any node's gc may remove it.
        """
        state = self.inspect(name, fresh=True)
        if state is None or state.meta.get(K_OWNER) != SHARED:
            return None
        if SNAP not in state.snaps or not state.snaps[SNAP][0]:
            return None
        return state
