"""
The overlay backend against the backend conformance suite, on real
overlayfs mounts (root), plus what is particular to overlay: chains too
deep for absolute lower paths in one page, and whiteouts on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from txgraph.backends.overlay import OverlayBackend
from txgraph.testing.conformance import Layers, make_backend_tests


class OverlayBackendConformanceTests(
    make_backend_tests(lambda path: OverlayBackend(path, {"mountopt": ""}))
):
    """
    The overlay backend keeps the backend contract.
    """


def test_long_lower_paths(tmp_path: Path) -> None:
    """
    A chain whose absolute lower paths exceed a page still mounts (short
    /proc/self/fd names are used), and reads through every layer.
    """
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    backend = OverlayBackend(str(deep), {"mountopt": ""})
    backend.start()
    layers = Layers(backend)
    try:
        parent = None
        for i in range(40):
            layer = layers.create(parent)
            layers.write(layer, {f"f{i}": b"x"})
            parent = layer
        assert parent is not None
        root = layers.get(parent)
        assert len([n for n in os.listdir(root) if n.startswith("f")]) == 40
        layers.put(parent)
    finally:
        layers.cleanup()
