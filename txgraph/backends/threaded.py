"""
L{AsyncBackend}: a backend seen from the reactor.  Every backend call runs
in the backend thread pool and returns a Deferred, so that nothing blocks
the reactor thread (librbd releases the GIL, so the pool gives real
parallelism).

There is one method per call of the contract (L{txgraph.backends.Backend}),
each typed as the synchronous method is, with a Deferred of its result;
all of them go through the same guarded path (L{AsyncBackend._call}), which
turns a host error (a full disk, an I/O error) into a L{BackendError}
saying which operation of which layer failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from txgraph import thin
from txgraph.backends import Backend, LayerInfo, LayerView, MountSpec, Orphan
from txgraph.errors import BackendError
from txgraph.model import Change, IDMap

T = TypeVar("T")


class AsyncBackend:
    """
    A backend seen from the reactor: every call runs in the backend thread
    pool and returns a Deferred.

    @ivar sync: the wrapped synchronous backend.
    """

    def __init__(self, backend: Backend, reactor: IReactorThreads, pool: ThreadPool) -> None:
        self.sync = backend
        self._reactor = reactor
        self._pool = pool

    # -- what the backend declares ---------------------------------------

    @property
    def name(self) -> str:
        """
        The backend's name.
        """
        return self.sync.name

    @property
    def maps(self) -> bool:
        """
        Whether the backend maps layers to block devices.
        """
        return self.sync.maps

    @property
    def commits(self) -> bool:
        """
        Whether C{commit} has work to do.
        """
        return self.sync.commits

    @property
    def prepare_is_atomic(self) -> bool:
        """
        Whether C{prepare} shows a layer whole or not at all, and gc finds
        storage without a row.
        """
        return self.sync.prepare_is_atomic

    @property
    def shares_layers(self) -> bool:
        """
        Whether the backend keeps shared layers (thin images).
        """
        return self.sync.shares_layers

    @property
    def holds_client_mounts(self) -> bool:
        """
        Whether a client's mounts are of the backend's own mount of a layer.
        """
        return self.sync.holds_client_mounts

    @property
    def unmap_delay(self) -> float:
        """
        Seconds a layer stays mapped after its last Put (0: none).
        """
        return self.sync.unmap_delay if self.sync.maps else 0.0

    def maps_layer(self, layer_id: str) -> bool:
        """
        Whether the layer is mapped before mounting (memory only: on the
        reactor, no thread hop).
        """
        return self.sync.maps_layer(layer_id)

    def commits_layer(self, layer_id: str) -> bool:
        """
        Whether C{commit} has work to do for the layer (memory only).
        """
        return self.sync.commits_layer(layer_id)

    def prepares_atomically(self, layer: LayerInfo) -> bool:
        """
        Whether C{prepare} of the new layer is atomic (memory only).
        """
        return self.sync.prepares_atomically(layer)

    # -- the thread pool ---------------------------------------------------

    def stop_now(self) -> None:
        """
        Stop the backend synchronously, in the calling thread: only at the
        end of the process's life (the daemon's stopService, the admin
        tool's exit), after the thread pool has stopped, as start-up
        started it.
        """
        self.sync.stop()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{fn(*args)} in the backend thread pool.
        """
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _call(self, name: str, method: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run the backend's C{method} on C{args} in the pool; a host error
        (L{OSError}) becomes a L{BackendError} naming the call and its layer.
        """

        def guarded(*args: Any) -> T:
            try:
                return method(*args)
            except OSError as e:
                layer = next((a.id for a in args if isinstance(a, LayerInfo)), None)
                where = f" of layer {layer}" if layer else ""
                raise BackendError(f"{self.sync.name} backend: {name}{where} failed: {e}") from e

        return self.run(guarded, *args)

    # -- the contract, one method per call -------------------------------

    def status(self) -> Deferred[list[tuple[str, str]]]:
        """
        L{Backend.status}.
        """
        return self._call("status", self.sync.status)

    def prepare(self, layer: LayerInfo) -> Deferred[dict[str, Any] | None]:
        """
        L{Backend.prepare}.
        """
        return self._call("prepare", self.sync.prepare, layer)

    def commit(self, layer: LayerInfo) -> Deferred[None]:
        """
        L{Backend.commit}.
        """
        return self._call("commit", self.sync.commit, layer)

    def remove(self, layer: LayerInfo) -> Deferred[None]:
        """
        L{Backend.remove}.
        """
        return self._call("remove", self.sync.remove, layer)

    def reset(self, layer: LayerInfo) -> Deferred[None]:
        """
        L{Backend.reset}.
        """
        return self._call("reset", self.sync.reset, layer)

    def exists(self, layer: LayerInfo) -> Deferred[bool]:
        """
        L{Backend.exists}.
        """
        return self._call("exists", self.sync.exists, layer)

    def map(self, layer: LayerInfo) -> Deferred[dict[str, Any] | None]:
        """
        L{Backend.map}.
        """
        return self._call("map", self.sync.map, layer)

    def unmap(self, layer: LayerInfo) -> Deferred[None]:
        """
        L{Backend.unmap}.
        """
        return self._call("unmap", self.sync.unmap, layer)

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> Deferred[str]:
        """
        L{Backend.mount}.
        """
        return self._call("mount", self.sync.mount, layer, chain)

    def unmount(self, layer: LayerInfo) -> Deferred[None]:
        """
        L{Backend.unmount}.
        """
        return self._call("unmount", self.sync.unmount, layer)

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> Deferred[str]:
        """
        L{Backend.ensure_mounted}.
        """
        return self._call("ensure_mounted", self.sync.ensure_mounted, layer, chain)

    def list_layers(self) -> Deferred[list[str]]:
        """
        L{Backend.list_layers}.
        """
        return self._call("list_layers", self.sync.list_layers)

    def orphans(self, layers: dict[str, LayerView]) -> Deferred[list[Orphan]]:
        """
        L{Backend.orphans}.
        """
        return self._call("orphans", self.sync.orphans, layers)

    def shared_orphans(self, min_age: float) -> Deferred[list[Orphan]]:
        """
        L{Backend.shared_orphans}.
        """
        return self._call("shared_orphans", self.sync.shared_orphans, min_age)

    def cluster_reads(self) -> Deferred[dict[str, dict[str, Any]]]:
        """
        L{Backend.cluster_reads}.
        """
        return self._call("cluster_reads", self.sync.cluster_reads)

    def repair(self, orphan: Orphan) -> Deferred[None]:
        """
        L{Backend.repair}.
        """
        return self._call("repair", self.sync.repair, orphan)

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> Deferred[list[MountSpec]]:
        """
        L{Backend.mount_specs}.
        """
        return self._call("mount_specs", self.sync.mount_specs, layer, chain, view)

    def cleanup(self) -> Deferred[None]:
        """
        L{Backend.cleanup}.
        """
        return self._call("cleanup", self.sync.cleanup)

    def usage(self, layer: LayerInfo) -> Deferred[tuple[int, int]]:
        """
        L{Backend.usage}.
        """
        return self._call("usage", self.sync.usage, layer)

    def apply(self, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> Deferred[int]:
        """
        L{Backend.apply}, or L{Backend.apply_thin} when the tar holds only a
        thin descriptor: the one place that decides (L{apply_layer_tar}).
        """
        return self._call("apply", apply_layer_tar, self.sync, layer, stream, id_map)

    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: BinaryIO,
        id_map: IDMap,
    ) -> Deferred[None]:
        """
        L{Backend.diff}.
        """
        return self._call("diff", self.sync.diff, layer, chain, parent, out, id_map)

    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> Deferred[list[Change]]:
        """
        L{Backend.changes}.
        """
        return self._call("changes", self.sync.changes, layer, chain, parent)

    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> Deferred[int]:
        """
        L{Backend.diff_size}.
        """
        return self._call("diff_size", self.sync.diff_size, layer, chain, parent)

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> Deferred[dict[str, str]]:
        """
        L{Backend.metadata}.
        """
        return self._call("metadata", self.sync.metadata, layer, chain)

    def shared_info(self) -> Deferred[dict[str, str]]:
        """
        L{Backend.shared_info}.
        """
        return self._call("shared_info", self.sync.shared_info)

    def shared_chain_parent(self, chain: str) -> Deferred[str | None]:
        """
        L{Backend.shared_chain_parent}.
        """
        return self._call("shared_chain_parent", self.sync.shared_chain_parent, chain)

    def adopt_shared(self, layer: LayerInfo, chain: str) -> Deferred[int]:
        """
        L{Backend.adopt_shared}.
        """
        return self._call("adopt_shared", self.sync.adopt_shared, layer, chain)

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> Deferred[bool]:
        """
        L{Backend.publish_chain}.
        """
        return self._call(
            "publish_chain", self.sync.publish_chain, layer, chain, chain_id, parent_chain
        )

    def publish_layer(
        self,
        parent_chain: str,
        path: str | None,
        diff_id: str,
        progress: Callable[[int], None] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        L{Backend.publish_layer}.
        """
        return self._call(
            "publish_layer", self.sync.publish_layer, parent_chain, path, diff_id, progress
        )


def apply_layer_tar(backend: Backend, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> int:
    """
    Apply a layer tar to C{backend}, in a backend thread.  A tar that holds
    only a thin descriptor (L{thin.sniff}) is a thin image's layer: it goes
    to L{Backend.apply_thin} on a backend that declares C{shares_layers},
    and is refused, naming why, on any other (its data is in a Ceph pool).
    Every other tar goes to L{Backend.apply}, replayed from its first byte.
    """
    descriptor, body = thin.sniff(stream)
    if descriptor is None:
        return backend.apply(layer, body, id_map)
    if not backend.shares_layers:
        raise thin.ThinDescriptorError(
            f"this layer is a txgraph thin image (its only file is /{thin.DESCRIPTOR_PATH}): "
            "thin images need the rbd backend, their layers are in Ceph; load the full "
            "image on this node"
        )
    return backend.apply_thin(layer, descriptor, id_map)
