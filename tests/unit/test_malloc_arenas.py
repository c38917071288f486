"""
Tests for the cap on glibc's malloc arenas that the driver sets at start
(it keeps the daemon's RSS from growing with every thread that ever ran),
and for its fixed mmap threshold (large blocks are given back when freed).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from txgraph import driver

REPO = Path(__file__).resolve().parents[2]


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


def test_mmap_threshold_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    MALLOC_MMAP_THRESHOLD_, or the tunable in GLIBC_TUNABLES, is left to
    glibc.
    """
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert driver.fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert driver.fix_mmap_threshold() is False


_LARGE_BLOCKS = """
import ctypes, sys
from txgraph import driver
if sys.argv[1] == "fixed":
    assert driver.fix_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
mapped = []
for _ in range(3):
    block = bytes(1 << 20)
    mapped.append(libc.mallinfo2().hblks)
    del block
print(mapped)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("mode, expected", [("fixed", [1, 1, 1]), ("default", [1, 0, 0])])
def test_large_blocks_keep_their_own_memory(mode: str, expected: list[int]) -> None:
    """
    With the threshold fixed, every 1 MiB block (a layer tar's chunk) is
    mapped on its own and unmapped when freed; glibc's default maps the
    first only, then raises its threshold and takes the next ones from the
    heap.  (In a fresh interpreter: the setting is for the whole process.)
    """
    out = subprocess.run(
        [sys.executable, "-c", _LARGE_BLOCKS, mode],
        check=True, capture_output=True, text=True, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    ).stdout
    hblks = json.loads(out)
    base = hblks[0] - 1  # blocks the interpreter itself had mapped
    assert [n - base for n in hblks] == expected
