"""
The overlay backend: layers as overlayfs directories on local disk, the
embedded default that needs nothing else installed or running.

Layout, under C{<state-dir>/overlay/}::

  <id>/diff     the layer's own files (an overlay upper directory)
  <id>/work     overlayfs's work directory
  <id>/merged   where the layer is mounted over its ancestors' diff dirs
  .tmp/         layers being made or removed, and temporary views
  l/<link>      a short symbolic link to a layer's diff directory, for the
                lower directories of the mounts handed to containerd

A layer without a parent needs no mount while it is written: Get returns
its diff directory.  A committed layer is mounted read-only (an overlay of
lower directories only, or a read-only bind of a lone layer), so an image
layer's directory is never an overlay upper directory.  Diff and DiffSize
against the layer's own parent read the diff directory directly (moby
overlay2's native diff); against any other parent, and Changes always,
compare two read-only trees (moby's naive diff).

Chains up to 128 layers deep fit mount(2)'s one-page option limit: when the
absolute lower paths are too long, they are passed as short
C{/proc/self/fd/N} paths of directories opened for the mount.

For containerd, nothing is mounted: L{OverlayBackend.mount_specs} returns
what containerd's overlayfs snapshotter returns (a bind mount of a lone
layer, else an overlay of lower directories, nearest first, with upper and
work directories for an active snapshot).  Its lower directories are the
C{l/<link>} links, as moby's overlay2 names them: 21 characters each, so
that containerd's C{mount.All}, which makes them relative to their common
directory when the options exceed a page, fits 128 of them in one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from txgraph import archive, mounts, thin
from txgraph.archive import ApplyMode
from txgraph.backends import (
    Backend,
    BackendOption,
    LayerInfo,
    LayerView,
    MountSpec,
    Orphan,
    set_traverse,
)
from txgraph.errors import BackendError, BadRequest, ConfigurationError
from txgraph.model import Change, IDMap
from txgraph.thin import ThinDescriptorError

_ID = re.compile(r"[0-9a-f]{64}(?:-init)?")

#: Options that name layer directories: txgraph sets those itself.
_DIRECTORY_OPTIONS = ("lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+")


def _mount_options(value: str) -> str:
    for option in value.split(","):
        name = option.split("=")[0]
        if name in _DIRECTORY_OPTIONS:
            raise ValueError(f"{name} is set by txgraph itself")
    return value


class OverlayBackend(Backend):
    """
    Layers as overlayfs directories.
    """

    name = "overlay"
    options = (
        BackendOption(
            key="mountopt",
            help="extra overlayfs mount options, comma-separated (e.g. metacopy=off)",
            default="",
            parse=_mount_options,
        ),
    )

    def __init__(self, state_dir: str, options: dict[str, Any]) -> None:
        super().__init__(state_dir, options)
        self.root = os.path.join(state_dir, "overlay")
        self._tmp = os.path.join(self.root, ".tmp")
        self._links = os.path.join(self.root, "l")

    # -- paths -----------------------------------------------------------

    def _dir(self, layer_id: str) -> str:
        return os.path.join(self.root, layer_id)

    def diff_dir(self, layer_id: str) -> str:
        """
        The layer's own files.
        """
        return os.path.join(self.root, layer_id, "diff")

    def _merged(self, layer_id: str) -> str:
        return os.path.join(self.root, layer_id, "merged")

    # -- set-up ------------------------------------------------------------

    def start(self) -> None:
        """
        Make the layer directory and check that this kernel has overlayfs.
        """
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.makedirs(self._links, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
                raise BackendError(
                    "the overlay backend needs overlayfs, which this kernel does "
                    "not offer (modprobe overlay)"
                )
        # Views and half-made layers left by a crash.
        for point in mounts.mounted_under(self._tmp):
            mounts.unmount(point)
        for name in os.listdir(self._tmp):
            shutil.rmtree(os.path.join(self._tmp, name), ignore_errors=True)
        # Links whose layer is gone (a crash between the two deletions).
        for name in os.listdir(self._links):
            path = os.path.join(self._links, name)
            if not os.path.exists(path):
                os.unlink(path)

    def traverse_paths(self) -> list[str]:
        """
        The layer directory and every layer's directory.
        """
        return [self.root] + [self._dir(i) for i in self.list_layers()]

    def status(self) -> list[tuple[str, str]]:
        """
        Where the layers are and what filesystem holds them.
        """
        fstype = "unknown"
        best = ""
        for entry in mounts.mount_table():
            point = entry.mountpoint.rstrip("/") + "/"
            if (self.root + "/").startswith(point) and len(point) > len(best):
                best, fstype = point, entry.fstype
        return [("Layer Directory", self.root), ("Backing Filesystem", fstype)]

    # -- life cycle ----------------------------------------------------------

    def prepare(self, layer: LayerInfo) -> None:
        """
        Make C{<id>/{diff,work,merged}} atomically (made in .tmp, renamed).
        """
        if layer.storage_opt:
            raise ConfigurationError(
                f"storage option(s) {', '.join(sorted(layer.storage_opt))} are not "
                "supported by the overlay backend"
            )
        target = self._dir(layer.id)
        if os.path.lexists(target):
            self._destroy(layer.id)
        staging = tempfile.mkdtemp(prefix=f"{layer.id}-", dir=self._tmp)
        try:
            os.chmod(staging, 0o700)
            os.mkdir(os.path.join(staging, "diff"), 0o755)
            os.chmod(os.path.join(staging, "diff"), 0o755)
            os.chown(os.path.join(staging, "diff"), *layer.root_ids)
            os.mkdir(os.path.join(staging, "work"), 0o700)
            os.mkdir(os.path.join(staging, "merged"), 0o700)
            set_traverse(staging, self.traverse_gid)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def commit(self, layer: LayerInfo) -> None:
        """
        Nothing to do: an overlay layer is immutable once nothing writes it.
        """

    def remove(self, layer: LayerInfo) -> None:
        """
        Unmount anything left, then delete the layer's directory (renamed
        away first, so the layer disappears at once).
        """
        self._destroy(layer.id)

    def _destroy(self, layer_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._link(layer_id))
        target = self._dir(layer_id)
        for point in mounts.mounted_under(target):
            mounts.unmount(point)
        if not os.path.lexists(target):
            return
        doomed = tempfile.mkdtemp(prefix=f"{layer_id}-removing-", dir=self._tmp)
        os.rename(target, os.path.join(doomed, "layer"))
        shutil.rmtree(doomed)

    def reset(self, layer: LayerInfo) -> None:
        """
        Empty the layer's diff and work directories.
        """
        for point in mounts.mounted_under(self._dir(layer.id)):
            mounts.unmount(point)
        diff = self.diff_dir(layer.id)
        for name in ("diff", "work"):
            path = os.path.join(self._dir(layer.id), name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path, mode=0o755 if name == "diff" else 0o700, exist_ok=True)
        os.chmod(diff, 0o755)
        os.chown(diff, *layer.root_ids)

    def exists(self, layer: LayerInfo) -> bool:
        """
        Whether the layer's diff directory is there.
        """
        return os.path.isdir(self.diff_dir(layer.id))

    def list_layers(self) -> list[str]:
        """
        Every layer directory.
        """
        return sorted(n for n in os.listdir(self.root) if _ID.fullmatch(n))

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        Mounts under the layer directory that no mounted layer holds, and
        layer directories (or leftovers in .tmp) with no layer row.
        """
        held = {v.mountpoint for v in layers.values() if v.state == "mounted"}
        found = [
            Orphan("mount", point, "mounted, but no mounted layer holds it")
            for point in mounts.mounted_under(self.root)
            if point not in held
        ]
        for name in sorted(os.listdir(self.root)):
            if _ID.fullmatch(name) and name not in layers:
                found.append(Orphan("object", name, f"layer directory {self._dir(name)} has no layer row"))
        for name in sorted(os.listdir(self._tmp)):
            found.append(
                Orphan("object", f".tmp/{name}", f"leftover {os.path.join(self._tmp, name)}")
            )
        return found

    def repair(self, orphan: Orphan) -> None:
        """
        Unmount a stray mount; delete a stray directory.
        """
        if orphan.kind == "mount":
            mounts.unmount(orphan.id)
        elif orphan.kind == "object" and orphan.id.startswith(".tmp/"):
            path = os.path.join(self._tmp, orphan.id[len(".tmp/") :])
            for point in mounts.mounted_under(path):
                mounts.unmount(point)
            shutil.rmtree(path, ignore_errors=True)
        elif orphan.kind == "object" and _ID.fullmatch(orphan.id):
            self._destroy(orphan.id)
        else:
            super().repair(orphan)

    # -- mounting ------------------------------------------------------------

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer's diff over its ancestors'; a layer without a parent
        is its own diff directory.  A committed layer is mounted read-only
        (L{_mount_readonly}).
        """
        if layer.committed:
            return self._mount_readonly(layer, chain)
        if not chain:
            return self.diff_dir(layer.id)
        merged = self._merged(layer.id)
        self._mount_overlay(
            [self.diff_dir(a.id) for a in chain],
            merged,
            upper=self.diff_dir(layer.id),
            work=os.path.join(self._dir(layer.id), "work"),
        )
        return merged

    def _mount_readonly(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount a committed layer at its merged directory without ever making
        its diff directory an overlay upper directory (which would write
        C{trusted.overlay.*} attributes into an image layer, and make the
        kernel warn that a lower directory of every container running from
        the image is in use as an upper one): an overlay of lower
        directories only, the layer's own diff first, as moby's overlay2
        mounts a committed layer.  overlayfs needs two lower directories
        when it has no upper one, so a layer without a parent is a
        read-only bind mount of its diff directory instead.
        """
        merged = self._merged(layer.id)
        diff = self.diff_dir(layer.id)
        if chain:
            self._mount_overlay(
                [diff] + [self.diff_dir(a.id) for a in chain], merged, upper=None, work=None
            )
            return merged
        try:
            mounts.mount(diff, merged, "none", mounts.MS_BIND)
        except OSError as e:
            raise BackendError(f"bind mount of {diff} at {merged} failed: {e.strerror}") from None
        try:
            mounts.mount(
                "none", merged, "none", mounts.MS_BIND | mounts.MS_REMOUNT | mounts.MS_RDONLY
            )
        except OSError as e:
            mounts.unmount(merged)
            raise BackendError(f"read-only remount of {merged} failed: {e.strerror}") from None
        return merged

    def _mount_overlay(
        self, lowers: list[str], target: str, upper: str | None, work: str | None
    ) -> None:
        extra = self.config.get("mountopt") or ""
        tail = f",upperdir={upper},workdir={work}" if upper else ""
        # Without an upper directory overlayfs is read-only anyway; say so.
        flags = 0 if upper else mounts.MS_RDONLY
        if extra:
            tail += "," + extra
        data = f"lowerdir={':'.join(lowers)}{tail}"
        fds: list[int] = []
        try:
            if len(data) >= mounts.PAGE_SIZE - 1:
                # Too long for one page: name each lower by a short fd path.
                for lower in lowers:
                    fds.append(os.open(lower, os.O_PATH | os.O_DIRECTORY))
                short = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
                data = f"lowerdir={short}{tail}"
                if len(data) >= mounts.PAGE_SIZE - 1:
                    raise BackendError(
                        f"overlay mount options for {target} do not fit one page "
                        f"({len(lowers)} layers)"
                    )
            try:
                mounts.mount("overlay", target, "overlay", flags, data)
            except OSError as e:
                raise BackendError(
                    f"mount overlay for layer at {target} failed: {e.strerror}"
                ) from None
        finally:
            for fd in fds:
                os.close(fd)

    def unmount(self, layer: LayerInfo) -> None:
        """
        Unmount the layer's merged directory if something is mounted there
        (a layer without a parent has a mount only if it was committed when
        it was mounted).
        """
        mounts.unmount(self._merged(layer.id))

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer again if its mount is gone.
        """
        merged = self._merged(layer.id)
        if mounts.is_mountpoint(merged):
            return merged
        return self.mount(layer, chain)

    # -- mounts for containerd ------------------------------------------------

    def _link(self, layer_id: str) -> str:
        """
        The short link to the layer's diff directory: 20 base-32
        characters of the SHA-256 of its ID (100 bits: no two layers
        meet), so it is derived again after a crash, never recorded.
        """
        digest = hashlib.sha256(layer_id.encode()).digest()
        name = base64.b32encode(digest).decode().lower()[:20]
        return os.path.join(self._links, name)

    def _linked(self, layer_id: str) -> str:
        """
        The layer's link, made if missing (layers made before this
        version, or a concurrent call made it first).
        """
        link = self._link(layer_id)
        target = os.path.join("..", layer_id, "diff")
        try:
            os.symlink(target, link)
        except FileExistsError:
            if os.readlink(link) != target:
                raise BackendError(
                    f"overlay link {link} of layer {layer_id} points to "
                    f"{os.readlink(link)}, not {target}"
                ) from None
        return link

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """
        containerd's overlayfs snapshotter's mounts (C{mounts()} in its
        overlay.go): without ancestors, a bind mount of the layer's own
        directory (read-only for a view); a view of one layer, a read-only
        bind of it; otherwise an overlay with C{workdir} and C{upperdir}
        for an active snapshot and the ancestors as C{lowerdir}, nearest
        first.
        """
        if not chain:
            return [MountSpec("bind", self.diff_dir(layer.id), ("ro" if view else "rw", "rbind"))]
        if view and len(chain) == 1:
            return [MountSpec("bind", self.diff_dir(chain[0].id), ("ro", "rbind"))]
        options: list[str] = []
        if not view:
            options += [
                f"workdir={os.path.join(self._dir(layer.id), 'work')}",
                f"upperdir={self.diff_dir(layer.id)}",
            ]
        extra = self.config.get("mountopt") or ""
        options += [o for o in extra.split(",") if o]
        options.append("lowerdir=" + ":".join(self._linked(a.id) for a in chain))
        return [MountSpec("overlay", "overlay", tuple(options))]

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        continuity's C{fs.DiskUsage} of the layer's diff directory, as
        containerd's overlayfs snapshotter reports it: every inode once
        (the directory itself too), its allocated blocks in 512-byte units.
        """
        seen: set[tuple[int, int]] = set()
        size = 0
        stack = [self.diff_dir(layer.id)]
        while stack:
            path = stack.pop()
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(FileNotFoundError), os.scandir(path) as listing:
                    stack.extend(entry.path for entry in listing)
        return size, len(seen)

    # -- content -------------------------------------------------------------

    def apply(self, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> int:
        """
        Extract the tar into the layer's diff directory (AUFS whiteouts
        become overlay whiteouts), after emptying it (ApplyDiff may be a
        retry); on failure the layer is emptied again.  A thin image's
        layer (a lone descriptor) is refused: its data is in Ceph.
        """
        diff = self.diff_dir(layer.id)
        if os.listdir(diff):
            self.reset(layer)
        descriptor, body = thin.sniff(stream)
        if descriptor is not None:
            raise ThinDescriptorError(
                f"this layer is a txgraph thin image (its only file is /{thin.DESCRIPTOR_PATH}): "
                "thin images need the rbd backend, their layers are in Ceph; load the full "
                "image on this node"
            )
        try:
            archive.apply_layer(body, diff, ApplyMode.OVERLAY, id_map, scratch_dir=self._tmp)
        except BaseException:
            self.reset(layer)
            raise
        return archive.directory_size(diff)

    def _native(self, layer: LayerInfo, parent: str | None) -> bool:
        return parent == layer.parent

    @contextlib.contextmanager
    def _views(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> Iterator[tuple[str, str | None]]:
        """
        Read-only views of the layer and of C{parent}'s whole tree, for
        naive diffs (they do not disturb a mount of the layer itself).
        A layer that is mounted (a running container's) is read through
        that mount, as moby's naive differ reads it through Get: its diff
        directory is then an overlay upper directory, and the kernel warns
        about any other mount that has it as a lower one.  The read holds
        the layer's lock, so no Put unmounts it meanwhile.
        """
        with contextlib.ExitStack() as stack:
            merged = self._merged(layer.id)
            if mounts.is_mountpoint(merged):
                new = merged
            else:
                lowers = [self.diff_dir(layer.id)] + [self.diff_dir(a.id) for a in chain]
                new = stack.enter_context(self._view(lowers))
            old = None
            if parent is not None:
                ids = [a.id for a in chain]
                if parent in ids:
                    parent_lowers = [self.diff_dir(i) for i in ids[ids.index(parent) :]]
                else:
                    raise BadRequest(
                        f"layer {parent} is not an ancestor of {layer.id}; "
                        "diffs are only taken against ancestors"
                    )
                old = stack.enter_context(self._view(parent_lowers))
            yield new, old

    @contextlib.contextmanager
    def _view(self, lowers: list[str]) -> Iterator[str]:
        if len(lowers) == 1:
            yield lowers[0]
            return
        target = tempfile.mkdtemp(prefix="view-", dir=self._tmp)
        try:
            self._mount_overlay(lowers, target, upper=None, work=None)
            try:
                yield target
            finally:
                mounts.unmount(target)
        finally:
            os.rmdir(target)

    def diff(
        self,
        layer: LayerInfo,
        chain: list[LayerInfo],
        parent: str | None,
        out: BinaryIO,
        id_map: IDMap,
    ) -> None:
        """
        The layer tar: the diff directory itself when C{parent} is the
        layer's parent, else the changes between two views.
        """
        if self._native(layer, parent):
            archive.export_overlay(self.diff_dir(layer.id), out, id_map)
            return
        with self._views(layer, chain, parent) as (new, old):
            archive.export_changes(new, archive.changes_dirs(new, old), out, id_map)

    def changes(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> list[Change]:
        """
        Changes as moby's overlay2 computes them: with its naive differ
        (C{ChangesDirs} of the two mounted trees), whatever the kernel and
        the parent, since moby 18.06 (moby PR 37313); only Diff and
        DiffSize read the diff directory itself.  A file copied up without
        a change (by C{ln}, say) is thus not reported, and a directory with
        a change inside it is.
        """
        with self._views(layer, chain, parent) as (new, old):
            return archive.changes_dirs(new, old)

    def diff_size(
        self, layer: LayerInfo, chain: list[LayerInfo], parent: str | None
    ) -> int:
        """
        The diff directory's size (native), or the changed files' (naive).
        """
        if self._native(layer, parent):
            return archive.directory_size(self.diff_dir(layer.id))
        with self._views(layer, chain, parent) as (new, old):
            return archive.changes_size(new, archive.changes_dirs(new, old))

    def metadata(self, layer: LayerInfo, chain: list[LayerInfo]) -> dict[str, str]:
        """
        overlay2's GetMetadata keys, so tools that read them work.
        """
        base = self._dir(layer.id)
        meta = {
            "UpperDir": self.diff_dir(layer.id),
            "WorkDir": os.path.join(base, "work"),
            "MergedDir": self._merged(layer.id) if chain else self.diff_dir(layer.id),
        }
        if chain:
            meta["LowerDir"] = ":".join(self.diff_dir(a.id) for a in chain)
        return meta
