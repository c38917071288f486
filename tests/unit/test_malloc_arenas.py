"""
Tests for the cap on glibc's malloc arenas that the driver sets at start
(it keeps the daemon's RSS from growing with every thread that ever ran).
"""

from __future__ import annotations

import platform

import pytest

from txgraph import driver


def test_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    MALLOC_ARENA_MAX in the environment is left to glibc.
    """
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert driver.limit_malloc_arenas() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cap_is_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    On glibc the cap is set.
    """
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert driver.limit_malloc_arenas() is True
