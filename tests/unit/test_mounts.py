"""
The mount table (L{txgraph.mounts.mount_table}): the lines that cannot
name a path are skipped before they are parsed, and that never loses an
entry that the whole table would give for that path (as mount point, at
or below it; as source; in an overlay's lower directories), escaped
characters included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from txgraph import mounts

LINES = [
    "22 1 0:21 / /proc rw,nosuid - proc proc rw",
    "30 1 7:0 / /var/lib/tx rw,relatime - ext4 /dev/loop3 rw",
    "31 30 7:31 / /var/lib/tx/rbd/mnt/k1 ro,relatime - ext4 /dev/loop31 ro",
    "32 30 0:40 / /var/lib/tx/overlay/k2/merged rw - overlay overlay "
    "rw,lowerdir=/var/lib/tx/overlay/l/A:/var/lib/tx/rbd/lower/k1/rootfs,upperdir=/u,workdir=/w",
    "33 30 0:41 / /var/lib/tx/overlay/k2/merged/sub rw - tmpfs tmpfs rw",
    "34 30 0:42 / /var/lib/tx/with\\040space rw - tmpfs tmpfs rw",
    "35 34 0:43 / /var/lib/tx/with\\040space/in rw - tmpfs tmpfs rw",
    "36 30 0:44 / /var/lib/tx/new\\012line rw - tmpfs tmpfs rw",
    "37 30 0:45 /sub /var/lib/tx/overlay/k20/merged rw - tmpfs tmpfs rw",
    "38 30 0:46 / /var/lib/tx/a\u2028b rw - tmpfs tmpfs rw",
]

NEEDLES = [
    "/var/lib/tx", "/var/lib/tx/overlay/k2", "/var/lib/tx/overlay/k2/merged",
    "/var/lib/tx/with space", "/var/lib/tx/new\nline", "/dev/loop3", "/dev/loop31",
    "/var/lib/tx/rbd/lower/k1/rootfs", "/var/lib/tx/a\u2028b", "/nothing", "/proc",
]


@pytest.fixture
def table(tmp_path: Path) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return str(path)


def _named(entry: mounts.MountEntry, needle: str) -> bool:
    lowers = [
        option[len("lowerdir="):].split(":")
        for option in entry.options.split(",") if option.startswith("lowerdir=")
    ]
    return (
        entry.mountpoint == needle
        or entry.mountpoint.startswith(needle + "/")
        or entry.source == needle
        or any(needle in dirs for dirs in lowers)
    )


@pytest.mark.parametrize("needle", NEEDLES)
def test_filtered_table_keeps_every_entry_naming_the_path(table: str, needle: str) -> None:
    whole = mounts.mount_table(table)
    assert len(whole) == len(LINES)
    filtered = mounts.mount_table(table, naming=needle)
    assert [e for e in filtered if _named(e, needle)] == [e for e in whole if _named(e, needle)]
    assert len(filtered) <= len(whole)


def test_filter_skips_lines_and_unescapes(table: str) -> None:
    assert [e.mountpoint for e in mounts.mount_table(table, naming="/var/lib/tx/overlay/k2")] == [
        "/var/lib/tx/overlay/k2/merged", "/var/lib/tx/overlay/k2/merged/sub",
        "/var/lib/tx/overlay/k20/merged",
    ]
    assert [e.mountpoint for e in mounts.mount_table(table, naming="/var/lib/tx/with space")] == [
        e.mountpoint for e in mounts.mount_table(table)  # escaped: not filtered
    ]
    (space,) = [e for e in mounts.mount_table(table) if e.mount_id == 34]
    assert space.mountpoint == "/var/lib/tx/with space"
    (odd,) = [e for e in mounts.mount_table(table, naming="/var/lib/tx/a\u2028b")]
    assert odd.mount_id == 38, "a line separator inside a path split its line"
    assert odd.mountpoint == "/var/lib/tx/a\u2028b" and odd.fstype == "tmpfs"
