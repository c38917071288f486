"""
The overlay backend: layers as overlayfs directories on local disk, the
embedded default that needs nothing else installed or running.

Layout, under C{<state-dir>/overlay/}::

  <key>/diff     the layer's own files (an overlay upper directory)
  <key>/work     overlayfs's work directory
  <key>/merged   where the layer is mounted over its ancestors' diff dirs
  <key>/layer-id the layer's ID, when the key is hashed
  .tmp/          layers being made or removed, and temporary views
  .links/<link>  a short symbolic link to a layer's diff directory, for the
                 lower directories of the mounts handed to containerd

A read-write layer created with the C{size} storage option (C{docker run
--storage-opt size=...}) keeps its upper and work directories on an ext4
filesystem of that size of its own, in the sparse file C{<key>/quota.img}:
C{<key>/fs/diff} and C{<key>/fs/work}, with the filesystem loop-mounted at
C{<key>/fs} while the layer is mounted (from its first Get to its last
Put) or read (Diff, Changes, DiffSize, ApplyDiff, or as a child's lower,
while the child is mounted: overlayfs holds its own reference, so the
mount point goes when the mount is made).  A write past the size fails
with ENOSPC, on any kernel with loop devices and ext4, without disk
quotas.

A layer's key (L{txgraph.backends.layer_key}) is its ID when that is
plain (every ID dockerd and BuildKit make), else C{x.} and the ID's
SHA-256: so no ID, whatever it holds (C{:} and C{,} split overlayfs's
options), reaches a mount option, and none can be C{.tmp}.

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
C{.links/<link>} links (moby's overlay2 has C{l/<link>}): 21 characters each, so
that containerd's C{mount.All}, which makes them relative to their common
directory when the options exceed a page, fits 128 of them in one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar, cast

from twisted.logger import Logger

from txgraph import archive, mounts
from txgraph.archive import ApplyMode
from txgraph.backends import (
    HASHED_KEY,
    Backend,
    BackendOption,
    LayerInfo,
    LayerView,
    MountSpec,
    Orphan,
    clientmounts,
    is_plain_key,
    layer_key,
    set_traverse,
    storage_size,
)
from txgraph.errors import BackendError, BadRequest, ConfigurationError
from txgraph.model import Change, IDMap

#: The file of a hashed layer directory that holds the layer's ID.
ID_FILE = "layer-id"
#: A sized layer's filesystem image, and where it is mounted.
QUOTA_IMAGE = "quota.img"
QUOTA_FS = "fs"
QUOTA_FSTYPE = "ext4"
#: moby's quota.ErrQuotaNotSupported, word for word: what a size that
#: cannot be honoured is answered with (graphtest and dockerd know it).
QUOTA_NOT_SUPPORTED = "Filesystem does not support, or has not enabled quotas"
#: moby overlay2's answer to a size on an image layer, word for word.
SIZE_ON_IMAGE_LAYER = "--storage-opt size is only supported for ReadWrite Layers"

log = Logger()

#: Options that name layer directories: txgraph sets those itself.
_DIRECTORY_OPTIONS = ("lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+")


def _option_path(path: str) -> str:
    """
    A path as an overlayfs option value: overlayfs splits its options on
    C{,} and C{lowerdir} on C{:}, and takes a backslash as an escape.
    """
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _mount_options(value: str) -> str:
    for option in value.split(","):
        name = option.split("=")[0]
        if name in _DIRECTORY_OPTIONS:
            raise ValueError(f"{name} is set by txgraph itself")
    return value


def _make_upper(root: str, owner: tuple[int, int]) -> None:
    """
    A layer's empty C{diff} (0755, owned by the container's root) and
    C{work} directories in C{root}.
    """
    diff = os.path.join(root, "diff")
    os.makedirs(diff, 0o755, exist_ok=True)
    os.chmod(diff, 0o755)
    os.chown(diff, *owner)
    os.makedirs(os.path.join(root, "work"), 0o700, exist_ok=True)


F = TypeVar("F", bound=Callable[..., Any])


def _with_filesystems(method: F) -> F:
    """
    A method of (layer, chain, ...), or of (layer, ...), that reads or
    writes diff directories: the sized layers among them have their
    filesystems mounted while it runs.
    """

    @functools.wraps(method)
    def wrapper(self: OverlayBackend, layer: LayerInfo, *args: Any) -> Any:
        chain = args[0] if args and isinstance(args[0], list) else []
        with self._using([layer.id, *(a.id for a in chain)]):
            return method(self, layer, *args)

    return cast(F, wrapper)


class OverlayBackend(Backend):
    """
    Layers as overlayfs directories.
    """

    name = "overlay"
    # Made in .tmp (which start empties) and renamed; orphans() lists
    # layer directories without a row.
    prepare_is_atomic = True
    options = (
        BackendOption(
            key="mountopt",
            help="extra overlayfs mount options, comma-separated (e.g. metacopy=off)",
            default="",
            parse=_mount_options,
        ),
    )

    def __init__(self, state_dir: str, options: dict[str, Any], root: str | None = None) -> None:
        super().__init__(state_dir, options)
        self.root = root if root is not None else os.path.join(state_dir, "overlay")
        self._tmp = os.path.join(self.root, ".tmp")
        self._links = os.path.join(self.root, ".links")
        # Sized layers' filesystems: the users of each mount (by key), and
        # the layers whose own mount holds theirs.
        self._fs_lock = threading.Lock()
        self._fs_users: dict[str, int] = {}
        self._fs_held: set[str] = set()

    # -- paths -----------------------------------------------------------

    def _dir(self, layer_id: str) -> str:
        return os.path.join(self.root, layer_key(layer_id))

    def _sized(self, layer_id: str) -> bool:
        """
        Whether the layer has a filesystem of its own (the C{size} option).
        """
        return os.path.exists(os.path.join(self._dir(layer_id), QUOTA_IMAGE))

    def _upper_root(self, layer_id: str) -> str:
        """
        Where the layer's diff and work directories are.
        """
        base = self._dir(layer_id)
        return os.path.join(base, QUOTA_FS) if self._sized(layer_id) else base

    def diff_dir(self, layer_id: str) -> str:
        """
        The layer's own files.
        """
        return os.path.join(self._upper_root(layer_id), "diff")

    def _merged(self, layer_id: str) -> str:
        return os.path.join(self._dir(layer_id), "merged")

    def lower_dirs(self, chain: list[LayerInfo]) -> list[str]:
        """The lower directories under C{chain} (ancestors, nearest first)."""
        return [self.diff_dir(a.id) for a in chain]

    def _layer_of(self, name: str) -> str | None:
        """
        The ID of the layer whose directory is C{name}, or None if C{name}
        is no layer's directory.
        """
        if is_plain_key(name):
            return name
        if name.startswith(HASHED_KEY):
            try:
                with open(os.path.join(self.root, name, ID_FILE), encoding="utf-8") as f:
                    return f.read()
            except (OSError, UnicodeDecodeError):
                return None
        return None

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
        Make C{<key>/{diff,work,merged}} atomically (made in .tmp, renamed);
        with a C{size}, the diff and work directories are made in a new
        filesystem of that size (C{quota.img}).
        """
        size = self._requested_size(layer)
        target = self._dir(layer.id)
        if os.path.lexists(target):
            self._destroy(layer.id)
        staging = tempfile.mkdtemp(prefix=f"{layer_key(layer.id)}-", dir=self._tmp)
        try:
            os.chmod(staging, 0o700)
            if not is_plain_key(os.path.basename(target)):
                with open(os.path.join(staging, ID_FILE), "w", encoding="utf-8") as f:
                    f.write(layer.id)
            os.mkdir(os.path.join(staging, "merged"), 0o700)
            self._prepare_extra(staging, layer)
            if size is None:
                _make_upper(staging, layer.root_ids)
            else:
                self._make_sized(staging, size, layer)
            set_traverse(staging, self.traverse_gid)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _prepare_extra(self, staging: str, layer: LayerInfo) -> None:
        """What else a new layer's directory holds (in C{staging}): nothing here."""

    def _requested_size(self, layer: LayerInfo) -> int | None:
        """
        The C{size} storage option in bytes, or None; refuses other options
        and a size on an image layer, as moby's overlay2 does.
        """
        size = storage_size(layer, self.name, "size, for read-write layers")
        if size is not None and not layer.readwrite:
            raise ConfigurationError(SIZE_ON_IMAGE_LAYER)
        return size

    def _make_sized(self, staging: str, size: int, layer: LayerInfo) -> None:
        """
        Make the sparse filesystem image of a sized layer in C{staging},
        and its diff and work directories in it.  Anything that keeps the
        size from being honoured (no mkfs.ext4, no loop devices, a size too
        small for a filesystem) is answered with moby's own words, and
        logged with the reason.
        """
        image = os.path.join(staging, QUOTA_IMAGE)
        fs = os.path.join(staging, QUOTA_FS)
        try:
            with open(image, "wb") as f:
                f.truncate(size)
            os.mkdir(fs, 0o700)
            result = subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", image],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            )
            if result.returncode != 0:
                raise OSError(0, f"mkfs.ext4 failed: {result.stderr.strip() or result.stdout.strip()}")
            mounts.mount_loop(image, fs, QUOTA_FSTYPE)
        except (OSError, subprocess.SubprocessError) as e:
            log.error(
                "layer {id}: cannot honour storage option size={size}: {error}",
                id=layer.id, size=size, error=e,
            )
            raise ConfigurationError(QUOTA_NOT_SUPPORTED) from None
        try:
            _make_upper(fs, layer.root_ids)
            set_traverse(fs, self.traverse_gid)
            shutil.rmtree(os.path.join(fs, "lost+found"), ignore_errors=True)
        finally:
            mounts.unmount(fs)

    @contextlib.contextmanager
    def _using(self, layer_ids: Iterable[str]) -> Iterator[None]:
        """
        The sized layers among C{layer_ids} have their filesystems mounted
        while the body runs.
        """
        taken: list[str] = []
        try:
            for layer_id in layer_ids:
                if self._sized(layer_id):
                    self._take_fs(layer_id)
                    taken.append(layer_id)
            yield
        finally:
            for layer_id in reversed(taken):
                self._drop_fs(layer_id)

    def _take_fs(self, layer_id: str) -> None:
        """
        One more user of a sized layer's filesystem: mounted if it is not.
        """
        key = layer_key(layer_id)
        fs = os.path.join(self._dir(layer_id), QUOTA_FS)
        with self._fs_lock:
            if not self._fs_users.get(key) and not mounts.is_mountpoint(fs):
                try:
                    mounts.mount_loop(os.path.join(self._dir(layer_id), QUOTA_IMAGE), fs, QUOTA_FSTYPE)
                except OSError as e:
                    raise BackendError(
                        f"mount the filesystem of layer {layer_id} (its size option) at {fs} "
                        f"failed: {e.strerror}"
                    ) from None
            self._fs_users[key] = self._fs_users.get(key, 0) + 1

    def _drop_fs(self, layer_id: str) -> None:
        """
        One user fewer of a sized layer's filesystem: unmounted (and its
        loop device freed) when none is left.  Overlay mounts made over it
        keep their own reference.
        """
        key = layer_key(layer_id)
        with self._fs_lock:
            users = self._fs_users.get(key, 0) - 1
            if users > 0:
                self._fs_users[key] = users
                return
            self._fs_users.pop(key, None)
            mounts.unmount(os.path.join(self._dir(layer_id), QUOTA_FS))

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
            os.unlink(os.path.join(self._links, clientmounts.link_name(layer_id)))
        target = self._dir(layer_id)
        with self._fs_lock:
            self._fs_users.pop(layer_key(layer_id), None)
            self._fs_held.discard(layer_key(layer_id))
        for point in mounts.mounted_under(target):
            mounts.unmount(point)
        if not os.path.lexists(target):
            return
        doomed = tempfile.mkdtemp(prefix=f"{layer_key(layer_id)}-removing-", dir=self._tmp)
        os.rename(target, os.path.join(doomed, "layer"))
        shutil.rmtree(doomed)

    def reset(self, layer: LayerInfo) -> None:
        """
        Empty the layer's diff and work directories.
        """
        mounts.unmount(self._merged(layer.id))
        with self._using([layer.id]):
            root = self._upper_root(layer.id)
            for name in ("diff", "work"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            _make_upper(root, layer.root_ids)

    def exists(self, layer: LayerInfo) -> bool:
        """
        Whether the layer's diff directory (or filesystem) is there.
        """
        return os.path.isdir(self.diff_dir(layer.id)) or self._sized(layer.id)

    def list_layers(self) -> list[str]:
        """
        Every layer directory.
        """
        found = (self._layer_of(n) for n in os.listdir(self.root))
        return sorted(i for i in found if i is not None)

    def orphans(self, layers: dict[str, LayerView]) -> list[Orphan]:
        """
        Mounts under the layer directory that no mounted layer holds, and
        layer directories (or leftovers in .tmp) with no layer row.
        """
        held = {v.mountpoint for v in layers.values() if v.state == "mounted"} | {
            os.path.join(self._dir(i), QUOTA_FS) for i, v in layers.items() if v.state == "mounted"
        }
        found = [
            Orphan("mount", point, "mounted, but no mounted layer holds it")
            for point in mounts.mounted_under(self.root)
            if point not in held
        ]
        for name in sorted(os.listdir(self.root)):
            layer_id = self._layer_of(name)
            if layer_id is not None and layer_id not in layers:
                found.append(
                    Orphan(
                        "object",
                        layer_id,
                        f"layer directory {os.path.join(self.root, name)} has no layer row",
                    )
                )
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
        elif orphan.kind == "object":
            self._destroy(orphan.id)
        else:
            super().repair(orphan)

    # -- mounting ------------------------------------------------------------

    def mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer; a sized layer's filesystem stays mounted until its
        last Put, its sized ancestors' only while the overlay is made.
        """
        self._take_own_fs(layer)
        try:
            with self._using(a.id for a in chain):
                return self._mount(layer, chain)
        except BaseException:
            self._drop_own_fs(layer)
            raise

    def _take_own_fs(self, layer: LayerInfo) -> None:
        """
        A mounted sized layer holds its filesystem (once).
        """
        key = layer_key(layer.id)
        if self._sized(layer.id) and key not in self._fs_held:
            self._take_fs(layer.id)
            self._fs_held.add(key)

    def _drop_own_fs(self, layer: LayerInfo) -> None:
        """
        The last Put of a sized layer lets its filesystem go (also when this
        process did not mount it: a restart, or a reboot's recovery).
        """
        key = layer_key(layer.id)
        if key in self._fs_held:
            self._fs_held.discard(key)
            self._drop_fs(layer.id)
        elif self._sized(layer.id):
            with self._fs_lock:
                if not self._fs_users.get(key):
                    mounts.unmount(os.path.join(self._dir(layer.id), QUOTA_FS))

    def _mount(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
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
            self.lower_dirs(chain),
            merged,
            upper=self.diff_dir(layer.id),
            work=os.path.join(self._upper_root(layer.id), "work"),
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
            self._mount_overlay([diff] + self.lower_dirs(chain), merged, upper=None, work=None)
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
        # Without an upper directory overlayfs is read-only anyway; say so.
        flags = 0 if upper else mounts.MS_RDONLY
        fds: list[int] = []

        def options(lower_paths: list[str], upper: str | None, work: str | None) -> str:
            data = "lowerdir=" + ":".join(_option_path(p) for p in lower_paths)
            if upper is not None and work is not None:
                data += f",upperdir={_option_path(upper)},workdir={_option_path(work)}"
            return data + ("," + extra if extra else "")

        def by_fd(path: str) -> str:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            return f"/proc/self/fd/{fds[-1]}"

        try:
            data = options(lowers, upper, work)
            if len(data) >= mounts.PAGE_SIZE - 1:
                # Too long for one page: name each lower by a short fd path
                # (128 of them fit), then the upper and work directories too.
                short = [by_fd(lower) for lower in lowers]
                data = options(short, upper, work)
                if len(data) >= mounts.PAGE_SIZE - 1 and upper is not None and work is not None:
                    data = options(short, by_fd(upper), by_fd(work))
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
        self._drop_own_fs(layer)

    def ensure_mounted(self, layer: LayerInfo, chain: list[LayerInfo]) -> str:
        """
        Mount the layer again if its mount is gone.
        """
        merged = self._merged(layer.id)
        if mounts.is_mountpoint(merged):
            self._take_own_fs(layer)
            return merged
        return self.mount(layer, chain)

    # -- mounts for containerd ------------------------------------------------

    def _linked(self, layer_id: str) -> str:
        """
        The layer's short link in C{.links/} (made if missing).
        """
        return clientmounts.ensure_link(
            self._links, clientmounts.link_name(layer_id), self.diff_dir(layer_id)
        )

    def mount_specs(
        self, layer: LayerInfo, chain: list[LayerInfo], view: bool
    ) -> list[MountSpec]:
        """
        containerd's overlayfs snapshotter's mounts (L{clientmounts.overlay_specs}).
        """
        extra = [o for o in (self.config.get("mountopt") or "").split(",") if o]
        return clientmounts.overlay_specs(
            own=self.diff_dir(layer.id),
            work=os.path.join(self._upper_root(layer.id), "work"),
            parents=self.lower_dirs(chain),
            links=[self._linked(a.id) for a in chain] if len(chain) > 1 or not view else [],
            view=view,
            extra=extra,
        )

    def usage(self, layer: LayerInfo) -> tuple[int, int]:
        """
        continuity's C{fs.DiskUsage} of the layer's diff directory, as
        containerd's overlayfs snapshotter reports it.
        """
        return clientmounts.disk_usage(self.diff_dir(layer.id))

    # -- content -------------------------------------------------------------

    @_with_filesystems
    def apply(self, layer: LayerInfo, stream: BinaryIO, id_map: IDMap) -> int:
        """
        Extract the tar into the layer's diff directory (AUFS whiteouts
        become overlay whiteouts), after emptying it (ApplyDiff may be a
        retry); on failure the layer is emptied again.  (A thin image's
        layer never reaches it: the backend declares no C{shares_layers}.)
        """
        diff = self.diff_dir(layer.id)
        if os.listdir(diff):
            self.reset(layer)
        try:
            archive.apply_layer(stream, diff, ApplyMode.OVERLAY, id_map, scratch_dir=self._tmp)
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
                lowers = [self.diff_dir(layer.id)] + self.lower_dirs(chain)
                new = stack.enter_context(self._view(lowers))
            old = None
            if parent is not None:
                ids = [a.id for a in chain]
                if parent in ids:
                    parent_lowers = self.lower_dirs(chain[ids.index(parent) :])
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

    @_with_filesystems
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

    @_with_filesystems
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

    @_with_filesystems
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
        meta = {
            "UpperDir": self.diff_dir(layer.id),
            "WorkDir": os.path.join(self._upper_root(layer.id), "work"),
            "MergedDir": self._merged(layer.id) if chain else self.diff_dir(layer.id),
        }
        if chain:
            meta["LowerDir"] = ":".join(self.lower_dirs(chain))
        return meta
