"""
A fake backend for unit tests of the layers above the backends (the layer
machines, the registry): it records every call and fails those it is told
to, and keeps no storage.  The conformance suite's contract checks run
against it too (tests/unit/test_fake_backend.py), so that it cannot drift
from the contract the real backends keep.
"""

from __future__ import annotations

from typing import Any

from txgraph.backends import Backend, BackendContract, LayerInfo, MountSpec
from txgraph.errors import BackendError
from txgraph.model import IDMap
from txgraph.store import Store


class FakeBackend(Backend):
    """
    A backend that records each call with the layer's persisted state at
    that moment (when given the store), and fails the calls named in
    C{failing}.  It keeps no files: it answers what the contract asks with
    made-up paths and devices.
    """

    name = "fake"

    def __init__(self, store: Store | None = None, maps: bool = True, commits: bool = True) -> None:
        super().__init__("/nonexistent", {})
        self.store = store
        self.maps = maps  # type: ignore[misc]
        self.commits = commits  # type: ignore[misc]
        self.calls: list[tuple[str, str, str | None]] = []
        self.failing: set[str] = set()
        self.existing: set[str] = set()

    def _call(self, name: str, layer: LayerInfo) -> None:
        rows = {r.id: r.state for r in self.store.load_layers_thd()} if self.store else {}
        self.calls.append((name, layer.id, rows.get(layer.id)))
        if name in self.failing:
            raise BackendError(f"{name} of {layer.id[:6]} failed (injected)")

    def status(self) -> list[tuple[str, str]]:
        """
        The contract's C{status}, recorded; no storage.
        """
        return [("Fake", "yes")]

    def prepare(self, layer: LayerInfo) -> dict[str, Any] | None:
        """
        The contract's C{prepare}, recorded; no storage.
        """
        self._call("prepare", layer)
        self.existing.add(layer.id)
        if layer.readwrite and self.unmap_delay > 0:
            # Maps a read-write layer too, as the rbd backend does.
            return {"device": f"/dev/fake-{layer.id[:4]}"}
        return None

    def commit(self, layer: LayerInfo) -> None:
        """
        The contract's C{commit}, recorded; no storage.
        """
        self._call("commit", layer)

    def remove(self, layer: LayerInfo) -> None:
        """
        The contract's C{remove}, recorded; no storage.
        """
        self._call("remove", layer)
        self.existing.discard(layer.id)

    def reset(self, layer: LayerInfo) -> None:
        """
        The contract's C{reset}, recorded; no storage.
        """
        self._call("reset", layer)

    def exists(self, layer: LayerInfo) -> bool:
        """
        The contract's C{exists}, recorded; no storage.
        """
        return layer.id in self.existing

    def map(self, layer: LayerInfo) -> dict[str, Any] | None:
        """
        The contract's C{map}, recorded; no storage.
        """
        self._call("map", layer)
        return {"device": f"/dev/fake-{layer.id[:4]}"}

    def unmap(self, layer: LayerInfo) -> None:
        """
        The contract's C{unmap}, recorded; no storage.
        """
        self._call("unmap", layer)

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        The contract's C{mount}, recorded; no storage.
        """
        self._call("mount", layer)
        return f"/mnt/{layer.id}"

    def unmount(self, layer: LayerInfo) -> None:
        """
        The contract's C{unmount}, recorded; no storage.
        """
        self._call("unmount", layer)

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        The contract's C{ensure_mounted}, recorded; no storage.
        """
        self._call("ensure_mounted", layer)
        return f"/mnt/{layer.id}"

    def list_layers(self) -> list[str]:
        """
        The contract's C{list_layers}, recorded; no storage.
        """
        return sorted(self.existing)

    def apply(self, layer: LayerInfo, stream: Any, id_map: IDMap) -> int:
        """
        The contract's C{apply}, recorded; no storage.
        """
        self._call("apply", layer)
        return len(stream.read())

    def diff(self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None, out: Any, id_map: IDMap) -> None:
        """
        The contract's C{diff}, recorded; no storage.
        """
        self._call("diff", layer)

    def changes(self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None) -> list[Any]:
        """
        The contract's C{changes}, recorded; no storage.
        """
        self._call("changes", layer)
        return []

    def diff_size(self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None) -> int:
        """
        The contract's C{diff_size}, recorded; no storage.
        """
        self._call("diff_size", layer)
        return 0

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        The contract's C{metadata}, recorded; no storage.
        """
        return {}

    def mount_specs(self, layer: LayerInfo, chain: list[LayerInfo], view: bool) -> list[MountSpec]:
        """
        The contract's C{mount_specs}, recorded: a made-up mount naming the
        layer, its lowers and whether it is read-only.
        """
        self._call("mount_specs", layer)
        lowers = ":".join(f"/fake/{a.id}" for a in chain)
        return [MountSpec("fake", f"/fake/{layer.id}", ("ro" if view else "rw", f"lowerdir={lowers}"))]

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        The contract's C{usage}, recorded: one block and one inode.
        """
        self._call("usage", layer)
        return 4096, 1


#: mypy checks the fake against the contract, as catalog does the backends.
_CONTRACT: type[BackendContract] = FakeBackend
