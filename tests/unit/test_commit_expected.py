"""
The front ends' hint that a layer will likely be committed
(L{LayerInfo.commit_expected}, issue 18: the rbd backend opens such a
layer's image for its commit while the layer is mapped): dockerd's image
layers and C{-init} layers, containerd's unpack snapshots; not container
layers, views or anything restored after a restart.  And the hint that
a layer is a container's (L{LayerInfo.container}, which rbd's
C{container_layers=local} keeps locally): dockerd's read-write layers,
containerd's active snapshots but its unpacker's.
"""

from __future__ import annotations

from typing import Any

from test_layers import Harness, InlineBackend
from test_snapshotter import SnapshotHarness

from txgraph.backends import LayerInfo
from txgraph.driver import Driver
from txgraph.layers.registry import LayerRegistry
from txgraph.snapshotter import TARGET_REF
from txgraph.testing.fake import FakeBackend
from txgraph.testing.stub_client import ImmediateReactor


class HintedBackend(FakeBackend):
    """The fake backend, recording the hint each prepare is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hints: dict[str, bool] = {}
        self.containers: dict[str, bool] = {}

    def prepare(self, layer: LayerInfo) -> dict[str, Any] | None:
        self.hints[layer.id] = layer.commit_expected
        self.containers[layer.id] = layer.container
        return super().prepare(layer)


def test_driver_expects_commits_of_image_and_init_layers(tmp_path: Any) -> None:
    """Create (an image layer) and CreateReadWrite of an C{-init} layer
    expect a commit; a container's layer does not."""
    h = Harness(tmp_path, fake_class=HintedBackend)
    driver = Driver(ImmediateReactor(), h.store, h.fake, None, {}, str(tmp_path))  # type: ignore[arg-type]
    driver.registry = h.registry
    h.run(driver.create("img", None, False, {}))
    h.run(driver.create("c1-init", "img", True, {}))
    h.run(driver.create("c1", "c1-init", True, {}))
    assert isinstance(h.fake, HintedBackend)
    assert h.fake.hints == {"img": True, "c1-init": True, "c1": False}
    assert h.fake.containers == {"img": False, "c1-init": True, "c1": True}
    assert h.registry.info("img").commit_expected
    assert not h.registry.info("c1").commit_expected


def test_hint_is_not_persisted(tmp_path: Any) -> None:
    """After a restart (the registry restored from the store) no layer
    carries the hint: it only ever saves an open."""
    h = Harness(tmp_path, fake_class=HintedBackend)
    h.run(h.registry.create("img", None, False, {}, commit_expected=True))
    assert h.registry.info("img").commit_expected
    restored = LayerRegistry(h.store, InlineBackend(h.fake), h.clock)
    h.run(restored.restore(h.store.load_layers_thd(), False))
    assert not restored.info("img").commit_expected


def test_snapshotter_expects_commits_of_unpack_snapshots(tmp_path: Any) -> None:
    """containerd's unpacker's active snapshots (key "extract-...", under
    a namespace, or with the chain ID label) expect a commit; a
    container's active snapshot and a view do not."""
    s = SnapshotHarness(tmp_path, fake_class=HintedBackend)
    chain = "sha256:" + "1" * 64
    s.run(s.sn.prepare("default/1/extract-1 " + chain, "", {}))
    s.run(s.sn.commit("base", "default/1/extract-1 " + chain, {}))
    s.run(s.sn.prepare("labelled", "base", {TARGET_REF: chain}))
    s.run(s.sn.prepare("default/2/container", "base", {}))
    s.run(s.sn.view("default/3/view", "base", {}))
    assert isinstance(s.fake, HintedBackend)
    hints = {
        key: s.fake.hints[s.sn._by_key[key].row.layer_id]
        for key in ("base", "labelled", "default/2/container", "default/3/view")
    }
    assert hints == {
        "base": True, "labelled": True, "default/2/container": False, "default/3/view": False,
    }
    containers = {
        key: s.fake.containers[s.sn._by_key[key].row.layer_id]
        for key in ("base", "labelled", "default/2/container", "default/3/view")
    }
    assert containers == {
        "base": False, "labelled": False, "default/2/container": True, "default/3/view": False,
    }
