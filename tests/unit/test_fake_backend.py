"""
The unit tests' fake backend (L{txgraph.testing.fake.FakeBackend}) passes
the conformance suite's contract tests, so that it cannot drift from the
contract the real backends keep.  It keeps no storage, so it runs the part
that needs none (L{make_contract_tests}: the object against the contract,
its status, idempotent removal and unmounting), not the tests of layer
contents.
"""

from __future__ import annotations

from typing import Any

from txgraph.backends import LayerInfo
from txgraph.testing.conformance import check_contract, make_contract_tests
from txgraph.testing.fake import FakeBackend


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
