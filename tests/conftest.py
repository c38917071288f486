"""
Shared fixtures.  Integration fixtures (real twistd, dockerd, Ceph) live in
tests/integration/conftest.py; unit tests need none of them.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError(
            "txgraph's tests need root: they mount filesystems and start dockerd"
        )
