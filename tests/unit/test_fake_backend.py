"""
The unit tests' fake backend (L{txgraph.testing.fake.FakeBackend}) passes
the conformance suite's contract tests, so that it cannot drift from the
contract the real backends keep.  It keeps no storage, so it runs the part
that needs none (L{make_contract_tests}: the object against the contract,
its status, idempotent removal and unmounting), not the tests of layer
contents.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from txgraph import thin
from txgraph.backends import LayerInfo
from txgraph.backends.threaded import apply_layer_tar
from txgraph.model import IDMap
from txgraph.testing.conformance import check_contract, make_contract_tests
from txgraph.testing.fake import FakeBackend
from txgraph.testing.tars import files_tar


class TestFakeBackendContract(make_contract_tests(lambda path: FakeBackend())):  # type: ignore[misc]
    """
    The fake backend keeps the contract's shape and its life-cycle rules.
    """


def test_check_contract_sees_drift() -> None:
    """
    A backend with a contract method missing, or with other parameters,
    is reported by name.
    """

    class Drifted(FakeBackend):
        def exists(self, layer: LayerInfo, strict: bool) -> bool:  # type: ignore[override]
            """
            The contract's C{exists}, with one parameter too many.
            """
            return False

    drifted: Any = Drifted()
    drifted.unmount = None
    problems = check_contract(drifted)
    assert any(p.startswith("exists(") for p in problems)
    assert "unmount is not a method" in problems
    assert check_contract(FakeBackend()) == []


class _Sharing(FakeBackend):
    """
    The fake, declaring shared layers: it takes thin image layers.
    """

    shares_layers = True  # type: ignore[misc]

    def apply_thin(self, layer: LayerInfo, descriptor: bytes, id_map: IDMap) -> int:
        """
        The contract's C{apply_thin}, recorded with the descriptor's bytes.
        """
        self._call("apply_thin", layer)
        self.descriptors.append(descriptor)
        return 0

    def __init__(self) -> None:
        super().__init__()
        self.descriptors: list[bytes] = []


LAYER = LayerInfo(id="a" * 64, parent=None, readwrite=False)


def test_thin_descriptor_decided_above_the_backend() -> None:
    """
    One place tells a thin image's layer from an ordinary tar: a lone
    descriptor goes to C{apply_thin} of a backend that declares shared
    layers, and is refused by name on one that does not (which never sees
    it); an ordinary tar reaches C{apply} whole, from its first byte, even
    one that starts with a file of the descriptor's name.
    """
    descriptor = thin.layer_tar(b'{"v": 1}')
    sharing = _Sharing()
    assert apply_layer_tar(sharing, LAYER, io.BytesIO(descriptor), IDMap()) == 0
    assert sharing.descriptors == [b'{"v": 1}']
    assert [c[0] for c in sharing.calls] == ["apply_thin"]

    plain = FakeBackend()
    with pytest.raises(thin.ThinDescriptorError, match="thin images need the rbd backend"):
        apply_layer_tar(plain, LAYER, io.BytesIO(descriptor), IDMap())
    assert plain.calls == []

    ordinary = files_tar({thin.DESCRIPTOR_PATH: b"{}", "bin/sh": b"sh"})
    for backend in (plain, sharing):
        assert apply_layer_tar(backend, LAYER, io.BytesIO(ordinary), IDMap()) == len(ordinary)
        assert backend.calls[-1][0] == "apply"
