"""The pieces of the snapshotter suite port that can be checked without a
snapshotter: fstest's comparison (it must see every difference containerd's
does, or the suite could not fail) and containerd's mount option handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from txgraph.testing import fstest
from txgraph.testing.snapshotter.mount import compact_lowerdir_option, parse_mount_options

BASE = fstest.apply(
    fstest.create_dir("/d", 0o755),
    fstest.create_file("/d/f", b"content", 0o644),
    fstest.create_file("/g", b"x", 0o600),
)


def tree(tmp_path: Path, name: str, *appliers: fstest.Applier) -> Path:
    """A directory with BASE and then ``appliers`` applied."""
    root = tmp_path / name
    root.mkdir()
    fstest.apply(BASE, *appliers)(str(root))
    return root


def test_equal_trees(tmp_path: Path) -> None:
    """The same appliers give equal trees (the root itself is not compared)."""
    a = tree(tmp_path, "a")
    b = tree(tmp_path, "b")
    os.chmod(b, 0o700)
    fstest.check_directory_equal(a, b)


@pytest.mark.parametrize(
    "change, what",
    [
        (fstest.create_file("/d/f", b"contenT", 0o644), "changed /d/f"),
        (fstest.create_file("/d/f", b"content", 0o640), "changed /d/f"),
        (fstest.chown("/d", 1, 1), "changed /d"),
        (fstest.remove_all("/g"), "missing /g"),
        (fstest.create_dir("/d/e", 0o700), "unexpected /d/e"),
        (fstest.link("/g", "/h"), "unexpected /h"),
        (fstest.rename("/g", "/h"), "missing /g"),
    ],
)
def test_differences_are_found(tmp_path: Path, change: fstest.Applier, what: str) -> None:
    """Content, mode, owner, removal, addition, hard links and renames are all seen."""
    expected = tree(tmp_path, "expected")
    actual = tree(tmp_path, "actual", change)
    with pytest.raises(fstest.DirectoryDiffError, match=what):
        fstest.check_directory_equal(expected, actual)


def test_hard_links_compared(tmp_path: Path) -> None:
    """Two hard links and two copies of one file are different trees."""
    linked = tree(tmp_path, "linked", fstest.link("/g", "/h"))
    copied = tree(tmp_path, "copied", fstest.create_file("/h", b"x", 0o600))
    with pytest.raises(fstest.DirectoryDiffError, match="hardlinks"):
        fstest.check_directory_equal(linked, copied)


def test_create_file_sets_mode_of_existing_file(tmp_path: Path) -> None:
    """fstest.CreateFile chmods, so overwriting a file changes its mode too."""
    root = tree(tmp_path, "r", fstest.create_file("/g", b"y", 0o666))
    assert (root / "g").stat().st_mode & 0o777 == 0o666
    assert (root / "g").read_bytes() == b"y"


def test_parse_mount_options() -> None:
    """Flags are taken out of the options, the rest is filesystem data (containerd's table)."""
    assert parse_mount_options(["ro", "rbind"]) == (1 | 4096 | 16384, "")
    assert parse_mount_options(["rw", "bind"]) == (4096, "")
    assert parse_mount_options(["index=off", "lowerdir=/a:/b", "nosuid"]) == (
        2, "index=off,lowerdir=/a:/b",
    )


def test_compact_lowerdir_option() -> None:
    """Long lowerdirs become relative to the parent of their common prefix, as
    containerd does before mount(2) (it assumes ``snapshots/<id>/fs``)."""
    options = ["index=off", "lowerdir=/r/snapshots/12/fs:/r/snapshots/11/fs:/r/snapshots/1/fs"]
    assert compact_lowerdir_option(options) == (
        "/r/snapshots/", ["index=off", "lowerdir=12/fs:11/fs:1/fs"],
    )
    assert compact_lowerdir_option(["lowerdir=/r/a"]) == ("", ["lowerdir=/r/a"])
    assert compact_lowerdir_option(["ro"]) == ("", ["ro"])
