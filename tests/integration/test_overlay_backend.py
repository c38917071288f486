"""
The overlay backend against the backend conformance suite, on real
overlayfs mounts (root), plus what is particular to overlay: chains too
deep for absolute lower paths in one page, and whiteouts on disk.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from txgraph import mounts, thin
from txgraph.backends.overlay import OverlayBackend
from txgraph.backends.threaded import apply_layer_tar
from txgraph.model import IDMap
from txgraph.testing.conformance import Layers, make_backend_tests
from txgraph.testing.tars import files_tar
from txgraph.thin import ThinDescriptorError


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


def test_thin_image_layers_are_refused(tmp_path: Path) -> None:
    """
    A thin image's layer (a lone descriptor) names why overlay cannot use
    it and leaves the layer empty; a layer that merely starts with a file of
    that name is an ordinary layer, extracted in full.  Both go through the
    one place that tells them apart, as every ApplyDiff does.
    """
    backend = OverlayBackend(str(tmp_path), {"mountopt": ""})
    backend.start()
    layers = Layers(backend)
    try:
        layer = layers.create(readwrite=False)
        with pytest.raises(ThinDescriptorError, match="thin images need the rbd backend"):
            apply_layer_tar(backend, layers.infos[layer], io.BytesIO(thin.layer_tar(b"{}")), IDMap())
        assert os.listdir(backend.diff_dir(layer)) == []
        ordinary = io.BytesIO()
        with tarfile.open(fileobj=ordinary, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in (thin.DESCRIPTOR_PATH, "bin/sh"):
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
        ordinary.seek(0)
        apply_layer_tar(backend, layers.infos[layer], ordinary, IDMap())
        assert sorted(os.listdir(backend.diff_dir(layer))) == [thin.DESCRIPTOR_PATH, "bin"]
    finally:
        layers.cleanup()


def test_image_layers_are_never_an_upper_directory(tmp_path: Path) -> None:
    """
    With a container layer mounted read-write over an image, Gets of the
    image's committed layers (docker save) and Changes of the container
    leave no trusted.overlay.* attribute in the image layers, and mount
    nothing with an image layer, or the container's diff, as an upper or
    a lower directory of a second writable mount.
    """
    backend = OverlayBackend(str(tmp_path), {"mountopt": ""})
    backend.start()
    layers = Layers(backend)
    try:
        # Image layers are made as dockerd makes them: Create, ApplyDiff.
        base = layers.create(readwrite=False)
        backend.apply(layers.infos[base], io.BytesIO(files_tar({"etc/base": b"base"}, directories=True)), IDMap())
        top = layers.create(base, readwrite=False)
        backend.apply(layers.infos[top], io.BytesIO(files_tar({"etc/top": b"top"}, directories=True)), IDMap())
        layers.commit(top)
        container = layers.create(top)
        root = layers.get(container)
        with open(os.path.join(root, "etc", "base"), "ab") as f:
            f.write(b" changed")
        seen = [layers.get(base), layers.get(top)]
        assert sorted(os.listdir(os.path.join(seen[1], "etc"))) == ["base", "top"]
        changes = backend.changes(layers.infos[container], layers.chain(container), top)
        assert [(c.path, c.kind.name) for c in changes] == [
            ("/etc", "MODIFY"), ("/etc/base", "MODIFY"),
        ]
        options = [
            e.options for e in mounts.mount_table()
            if e.fstype == "overlay" and e.mountpoint.startswith(str(tmp_path))
        ]
        assert len(options) == 2 and sum("upperdir=" in o for o in options) == 1, options
        for layer in (top, base):
            layers.put(layer)
        for layer in (base, top):
            diff = Path(backend.diff_dir(layer))
            for path in [diff, *diff.rglob("*")]:
                assert [k for k in os.listxattr(path) if k.startswith("trusted.")] == []
        layers.put(container)
    finally:
        layers.cleanup()
