"""Build the integration tests' container images from Debian packages, offline.

A fresh CI machine has ``busybox-static`` and ``debootstrap`` installed but no
registry access, so the images dockerd needs are built here:

- :func:`busybox_rootfs` — a byte-for-byte deterministic rootfs tar of the
  static busybox (its sha256 is the single layer's diffID, stable across runs);
- :func:`debian_rootfs` — ``debootstrap --variant=minbase bookworm``, cleaned
  and tarred, cached under a version key because it takes ~30 s;
- :func:`save_tarball` — wraps a rootfs tar into a single-layer ``docker
  save`` tarball so ``docker load -i`` works without a registry.

The recipes are the ones in ``shared/reference/dockerd-graphdriver-trace.md``
§2.  Everything is cached in :func:`default_cache_dir`; builds write to a
temporary name, are renamed into place, and are serialised by a lock file, so
concurrent test sessions can share the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

#: Bump when a recipe changes, so stale cache entries are not reused.
RECIPE_VERSION: Final = "v1"

BUSYBOX: Final = Path("/bin/busybox")
DEBOOTSTRAP: Final = "/usr/sbin/debootstrap"
GNU_TAR: Final = "/bin/tar"
DEBIAN_SUITE: Final = "bookworm"
DEBIAN_SOURCES: Final = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"

#: Every file in the busybox rootfs gets this mtime (GNU tar ``--mtime``).
FIXED_MTIME: Final = "2024-01-01 00:00:00Z"
#: The same instant, used as ``created`` in generated image configs.
FIXED_CREATED: Final = "2024-01-01T00:00:00Z"

BUSYBOX_TAG: Final = "busybox:local"
DEBIAN_TAG: Final = "debian:local"
DEFAULT_PATH_ENV: Final = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)
BUSYBOX_CONFIG: Final[Mapping[str, Any]] = {
    "Cmd": ["/bin/sh"],
    "Env": [DEFAULT_PATH_ENV],
}
DEBIAN_CONFIG: Final[Mapping[str, Any]] = {
    "Cmd": ["/bin/bash"],
    "Env": [DEFAULT_PATH_ENV],
}

#: ``docker save`` copies of the images, made once by hand (see the trace
#: reference).  Used only as an optional cache for the Debian rootfs.
_PREBUILT_DEBIAN_NAME: Final = "debian-bookworm-minbase.tar.xz"


class ImageBuildError(RuntimeError):
    """An image could not be built (missing tool, failed debootstrap...)."""


def default_cache_dir() -> Path:
    """Return ``$TXGRAPH_TEST_CACHE`` or ``/var/cache/txgraph-tests``."""
    return Path(os.environ.get("TXGRAPH_TEST_CACHE") or "/var/cache/txgraph-tests")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# cache plumbing


def _cache_dir(cache_dir: Path | None) -> Path:
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir/.name.lock`` (across processes)."""
    with open(cache_dir / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space...) in mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _unmount_below(root: Path) -> None:
    """Lazily unmount everything mounted at or below ``root``, deepest first."""
    for point in sorted(_mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _remove_tree(root: Path) -> None:
    """Remove a scratch tree, first unmounting anything a tool left in it.

    Refuses to delete while something is still mounted below ``root``, so a
    failed unmount can never make the removal reach into another filesystem.
    """
    if not root.exists():
        return
    _unmount_below(root)
    left = _mounts_under(root)
    if left:
        raise ImageBuildError(f"refusing to remove {root}: still mounted: {left}")
    shutil.rmtree(root)


# ---------------------------------------------------------------------------
# busybox


def _busybox_applets(busybox: Path) -> list[str]:
    listing = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout
    return sorted(name for name in listing.split() if name != "busybox")


def _populate_busybox_root(root: Path, busybox: Path) -> None:
    """Lay out the busybox tree of the recipe, with explicit modes (no umask)."""
    for rel in (
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "proc",
        "sys", "dev", "root", "var", "home",
    ):
        (root / rel).mkdir()
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755)
    (root / "tmp").chmod(0o1777)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in _busybox_applets(busybox):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name in ("passwd", "group"):
        (root / "etc" / name).chmod(0o644)


def busybox_rootfs(cache_dir: Path | None = None, *, busybox: Path = BUSYBOX) -> Path:
    """Return a deterministic rootfs tar of busybox-static, building it if needed.

    The tree is the recipe's (busybox plus one ``bin/`` symlink per applet,
    ``/etc/passwd``, ``/etc/group``, ``tmp`` mode 1777), archived by GNU tar
    with sorted names, a fixed mtime and numeric owner 0.  With Debian's
    busybox-static 1:1.35.0-4+deb12u1+b1 its sha256 is ``0cfcb66a36bb…``,
    the diffID of ``shared/images/busybox.tar.xz``.  The cache key includes
    the binary's hash, so a busybox upgrade yields a new file.
    """
    cache = _cache_dir(cache_dir)
    if not busybox.is_file():
        raise ImageBuildError(f"{busybox} not found: install busybox-static")
    key = sha256_file(busybox)[:16]
    final = cache / f"busybox-rootfs-{RECIPE_VERSION}-{key}.tar"
    if final.exists():
        return final
    with _locked(cache, "busybox"):
        if final.exists():
            return final
        work = Path(tempfile.mkdtemp(prefix=".busybox-root.", dir=cache))
        try:
            root = work / "root"
            root.mkdir()
            _populate_busybox_root(root, busybox)
            with _atomic_output(final) as tmp:
                subprocess.run(
                    [
                        GNU_TAR, "--sort=name", f"--mtime={FIXED_MTIME}",
                        "--owner=0", "--group=0", "--numeric-owner",
                        "-C", str(root), "-cf", str(tmp), ".",
                    ],
                    check=True, capture_output=True,
                )
        finally:
            _remove_tree(work)
    return final


# ---------------------------------------------------------------------------
# debian


def debian_mirror(sources: Path = DEBIAN_SOURCES) -> str:
    """Return the Debian mirror apt is configured with for the ``bookworm`` suite.

    Reads the deb822 stanza of ``debian.sources`` whose ``Suites`` include
    ``bookworm`` (first URI); ``$TXGRAPH_DEBIAN_MIRROR`` overrides it, and
    ``/etc/apt/sources.list`` then ``deb.debian.org`` are the fallbacks.
    """
    override = os.environ.get("TXGRAPH_DEBIAN_MIRROR")
    if override:
        return override
    if sources.is_file():
        for stanza in sources.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            if (
                "deb" in fields.get("types", "").split()
                and DEBIAN_SUITE in fields.get("suites", "").split()
                and fields.get("uris")
            ):
                return fields["uris"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == DEBIAN_SUITE:
                return words[1]
    return DEFAULT_MIRROR


def prebuilt_debian_image() -> Path | None:
    """Return the ready-made ``docker save`` copy of debian:local, if present.

    Looked for in ``/work/shared/images`` and in ``shared/images`` beside the
    repository.  Only a cache: nothing requires it to exist.
    """
    repo = Path(__file__).resolve().parents[2]
    for directory in (Path("/work/shared/images"), repo.parent / "shared" / "images"):
        candidate = directory / _PREBUILT_DEBIAN_NAME
        if candidate.is_file():
            return candidate
    return None


_DEBIAN_CLEAN_FILES: Final = (
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/log/*.log",
    "var/log/apt/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
)
_DEBIAN_CLEAN_TREES: Final = ("var/lib/apt/lists/*", "dev/*")


def _clean_debian_root(root: Path) -> None:
    """Drop caches, logs and device nodes, as the recipe's ``rm`` lines do."""
    for pattern in _DEBIAN_CLEAN_TREES:
        for name in glob.glob(str(root / pattern)):
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name)
            else:
                os.unlink(name)
    for pattern in _DEBIAN_CLEAN_FILES:
        for name in glob.glob(str(root / pattern)):
            if not os.path.isdir(name) or os.path.islink(name):
                os.unlink(name)


def debootstrap_rootfs(
    out: Path, *, mirror: str | None = None, work_dir: Path | None = None
) -> Path:
    """Run debootstrap minbase bookworm, clean the tree and tar it to ``out``.

    Uncached; :func:`debian_rootfs` is the cached entry point.  The tar is
    made as in the recipe: ``--sort=name --owner=0 --group=0 --numeric-owner
    --xattrs`` (so every entry is owned by 0, like the prebuilt copy).
    """
    if not os.path.exists(DEBOOTSTRAP):
        raise ImageBuildError(f"{DEBOOTSTRAP} not found: install debootstrap")
    mirror = mirror or debian_mirror()
    work = Path(tempfile.mkdtemp(prefix=".debootstrap.", dir=work_dir or out.parent))
    root = work / "root"
    log = work / "debootstrap.log"
    try:
        with open(log, "wb") as log_file:
            result = subprocess.run(
                [DEBOOTSTRAP, "--variant=minbase", DEBIAN_SUITE, str(root), mirror],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "LC_ALL": "C"},
            )
        if result.returncode != 0:
            tail = log.read_bytes()[-4000:].decode(errors="replace")
            debootstrap_log = root / "debootstrap" / "debootstrap.log"
            if debootstrap_log.is_file():
                tail += "\n--- debootstrap/debootstrap.log ---\n"
                tail += debootstrap_log.read_bytes()[-4000:].decode(errors="replace")
            raise ImageBuildError(
                f"debootstrap {DEBIAN_SUITE} from {mirror} failed "
                f"(exit {result.returncode}):\n{tail}"
            )
        _unmount_below(root)
        _clean_debian_root(root)
        with _atomic_output(out) as tmp:
            subprocess.run(
                [
                    GNU_TAR, "--sort=name", "--owner=0", "--group=0",
                    "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(tmp), ".",
                ],
                check=True, capture_output=True,
            )
    finally:
        _remove_tree(work)
    return out


def extract_single_layer(saved: Path, out: Path) -> Path:
    """Copy the one ``layer.tar`` of a (possibly xz-compressed) ``docker save`` tar.

    Streams the archive once, then checks that the manifest names exactly
    that layer and that its sha256 is the config's only diffID.
    """
    opener: Any = lzma.open if saved.name.endswith(".xz") else open
    layers: dict[str, str] = {}
    small: dict[str, bytes] = {}
    with _atomic_output(out) as tmp:
        with opener(saved, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as archive:
            for member in archive:
                source = archive.extractfile(member) if member.isfile() else None
                if source is None:
                    continue
                if member.name.endswith("/layer.tar"):
                    if layers:
                        raise ImageBuildError(f"{saved} has more than one layer")
                    layers[member.name] = _copy_hashing(source, tmp)
                elif member.name.endswith(".json") and member.size < 1 << 20:
                    small[member.name] = source.read()
        manifest = json.loads(small["manifest.json"])
        if len(manifest) != 1 or list(manifest[0]["Layers"]) != list(layers):
            raise ImageBuildError(f"{saved} is not a single-layer image save")
        config = json.loads(small[manifest[0]["Config"]])
        diff_ids = config["rootfs"]["diff_ids"]
        if diff_ids != ["sha256:" + next(iter(layers.values()))]:
            raise ImageBuildError(f"{saved}: layer does not match its diffID {diff_ids}")
    return out


def _copy_hashing(source: IO[bytes], dest: Path) -> str:
    digest = hashlib.sha256()
    with open(dest, "wb") as f:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


#: ``prebuilt`` default of :func:`debian_rootfs`: look for the shared copy.
AUTO: Final = "auto"


def debian_rootfs(
    cache_dir: Path | None = None,
    *,
    prebuilt: Path | str | None = AUTO,
    mirror: str | None = None,
) -> Path:
    """Return a Debian bookworm minbase rootfs tar, building it at most once.

    Cache entries are keyed by suite, variant and :data:`RECIPE_VERSION`, and
    by where they came from: ``…-debootstrap.tar`` (built here) or
    ``…-prebuilt.tar`` (the layer of a ``docker save`` copy).  With
    ``prebuilt=AUTO`` (the default) a debootstrap entry is preferred, then a
    prebuilt entry, then the shared copy from :func:`prebuilt_debian_image`,
    and debootstrap is the last resort.  ``prebuilt=None`` forces the
    debootstrap path (cached); a path names a ``docker save`` file to use.
    """
    cache = _cache_dir(cache_dir)
    stem = f"debian-{DEBIAN_SUITE}-minbase-{RECIPE_VERSION}"
    built = cache / f"{stem}-debootstrap.tar"
    copied = cache / f"{stem}-prebuilt.tar"
    if built.exists():
        return built
    source: Path | None
    if prebuilt == AUTO:
        if copied.exists():
            return copied
        source = prebuilt_debian_image()
    else:
        source = Path(prebuilt) if prebuilt is not None else None
    with _locked(cache, "debian"):
        if built.exists():
            return built
        if source is not None:
            if not copied.exists():
                extract_single_layer(source, copied)
            return copied
        return debootstrap_rootfs(built, mirror=mirror, work_dir=cache)


# ---------------------------------------------------------------------------
# docker save tarballs


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        return repo_tag, "latest"
    return repo, tag


def _tar_add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def save_tarball(
    rootfs_tar: Path,
    repo_tag: str,
    config: Mapping[str, Any],
    out: Path,
    *,
    comment: str | None = None,
    architecture: str = "amd64",
    created: str = FIXED_CREATED,
) -> Path:
    """Write a single-layer ``docker save`` tarball of ``rootfs_tar`` to ``out``.

    ``config`` is the image's container config (``Cmd``, ``Env``,
    ``Entrypoint``, ``WorkingDir``...).  The image config JSON gets
    ``rootfs.diff_ids`` = the layer tar's sha256, ``architecture``, ``os``
    linux and a fixed ``created``, so the output (and the image ID, the
    config's sha256) is the same for the same inputs.  The archive holds
    ``manifest.json``, ``<config sha256>.json``, ``<layer id>/{VERSION,json,
    layer.tar}`` and the legacy ``repositories`` file, as ``docker save``
    writes them; ``docker load -i`` accepts it offline.  Returns ``out``.
    """
    diff_id = "sha256:" + sha256_file(rootfs_tar)
    repo, tag = _split_repo_tag(repo_tag)
    history: dict[str, Any] = {
        "created": created,
        "created_by": "txgraph tests/integration/images.py",
    }
    if comment:
        history["comment"] = comment
    image_config: dict[str, Any] = {
        "architecture": architecture,
        "config": dict(config),
        "created": created,
        "history": [history],
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    if comment:
        image_config["comment"] = comment
    config_bytes = _canonical_json(image_config)
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    # docker save derives a v1 layer ID from the layer's chain; any stable
    # 64-hex name works for docker load, which only follows manifest.json.
    layer_id = hashlib.sha256(f"{diff_id}\n{config_digest}".encode()).hexdigest()
    v1_json = _canonical_json(
        {
            "id": layer_id,
            "created": created,
            "config": dict(config),
            "architecture": architecture,
            "os": "linux",
        }
    )
    manifest = [
        {
            "Config": f"{config_digest}.json",
            "RepoTags": [f"{repo}:{tag}"],
            "Layers": [f"{layer_id}/layer.tar"],
        }
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_output(out) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as archive:
        _tar_add_bytes(archive, f"{config_digest}.json", config_bytes)
        directory = tarfile.TarInfo(layer_id)
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        _tar_add_bytes(archive, f"{layer_id}/VERSION", b"1.0")
        _tar_add_bytes(archive, f"{layer_id}/json", v1_json)
        layer = tarfile.TarInfo(f"{layer_id}/layer.tar")
        layer.size = rootfs_tar.stat().st_size
        layer.mode = 0o644
        with open(rootfs_tar, "rb") as f:
            archive.addfile(layer, f)
        _tar_add_bytes(archive, "manifest.json", _canonical_json(manifest))
        _tar_add_bytes(archive, "repositories", _canonical_json({repo: {tag: layer_id}}))
    return out


def _cached_save(rootfs: Path, repo_tag: str, config: Mapping[str, Any], comment: str) -> Path:
    key = hashlib.sha256(
        _canonical_json([rootfs.name, repo_tag, dict(config), comment])
    ).hexdigest()[:12]
    safe_tag = repo_tag.replace("/", "_").replace(":", "_")
    out = rootfs.with_name(f"{rootfs.stem}.{safe_tag}-{key}.image.tar")
    if not out.exists():
        save_tarball(rootfs, repo_tag, config, out, comment=comment)
    return out


def busybox_image(cache_dir: Path | None = None) -> Path:
    """Return a cached ``docker save`` tarball of ``busybox:local`` (CMD /bin/sh)."""
    return _cached_save(
        busybox_rootfs(cache_dir), BUSYBOX_TAG, BUSYBOX_CONFIG,
        "busybox-static from Debian bookworm",
    )


def debian_image(cache_dir: Path | None = None, *, prebuilt: Path | str | None = AUTO) -> Path:
    """Return a cached ``docker save`` tarball of ``debian:local`` (CMD /bin/bash)."""
    return _cached_save(
        debian_rootfs(cache_dir, prebuilt=prebuilt), DEBIAN_TAG, DEBIAN_CONFIG,
        "debootstrap --variant=minbase bookworm",
    )
