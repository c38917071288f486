"""Regenerate txgraph's gRPC modules from its own ``.proto`` files.

Two packages are generated (:data:`PACKAGES`): :mod:`txgraph.api.containerd.proto`
(containerd's snapshotter service, from this package's ``proto/``) and
:mod:`txgraph.testing.cri_proto` (the part of Kubernetes' CRI image service
the tests use to pull through containerd's CRI plugin, from that package's
``proto/``).

``python -m txgraph.api.containerd.proto.generate`` rewrites the checked-in
``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` of both packages;
``generate(DIR, package)`` writes one package's files into ``DIR`` (the unit
test compares the two).  The output depends only on the ``.proto`` files and
on the grpcio-tools release, which is pinned (:data:`GRPCIO_TOOLS_VERSION`):
another release writes other code, so it is refused rather than silently
used.

protoc names generated modules after the ``.proto`` paths
(``containerd/types/mount.proto`` -> ``containerd.types.mount_pb2``) and
imports them absolutely; the modules are laid flat in this package instead
and those imports rewritten to relative ones (``from . import mount_pb2``),
so that the package can move without any edit.  The ``.proto`` file names
(``containerd/types/mount.proto``...) stay as protoc saw them: they are the
names registered in protobuf's descriptor pool.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The grpcio-tools release the checked-in code was generated with.
GRPCIO_TOOLS_VERSION: Final = "1.85.1"

PACKAGE_DIR: Final = Path(__file__).resolve().parent
#: The ``txgraph`` package's directory, and the checkout's (for messages).
TXGRAPH_DIR: Final = PACKAGE_DIR.parents[2]
PROTO_DIR: Final = PACKAGE_DIR / "proto"
#: The sources, relative to :data:`PROTO_DIR` (their names in the descriptor pool).
PROTO_FILES: Final = (
    "containerd/types/mount.proto",
    "containerd/services/snapshots/v1/snapshots.proto",
)
#: The generated files' suffixes, per ``.proto`` file.
SUFFIXES: Final = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


@dataclass(frozen=True)
class ProtoPackage:
    """One generated Python package: its directory, whose ``proto/`` holds the
    sources, and those sources' paths relative to ``proto/`` (their names in
    protobuf's descriptor pool)."""

    name: str
    directory: Path
    files: tuple[str, ...]

    @property
    def proto_dir(self) -> Path:
        """The directory protoc reads the sources from."""
        return self.directory / "proto"

    def generated_names(self) -> list[str]:
        """The file names :func:`generate` writes for this package, in a stable order."""
        return [Path(p).stem + suffix for p in self.files for suffix in SUFFIXES]


#: containerd's snapshotter service: this package.
CONTAINERD: Final = ProtoPackage("txgraph.api.containerd.proto", PACKAGE_DIR, PROTO_FILES)
#: The CRI image service the tests pull images with (txgraph.testing.cri_proto).
CRI: Final = ProtoPackage(
    "txgraph.testing.cri_proto",
    TXGRAPH_DIR / "testing" / "cri_proto",
    ("runtime/v1/api.proto",),
)
#: Every package :func:`main` regenerates.
PACKAGES: Final = (CONTAINERD, CRI)


class GenerateError(RuntimeError):
    """The generation could not run or protoc failed."""


def _check_tools_version() -> None:
    try:
        found = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        raise GenerateError(
            f"grpcio-tools is not installed: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        ) from None
    if found != GRPCIO_TOOLS_VERSION:
        raise GenerateError(
            f"grpcio-tools {found} is installed, but the generated code is pinned to "
            f"{GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION} "
            "(or change GRPCIO_TOOLS_VERSION and the requirements in setup.cfg together)"
        )


def generated_names(package: ProtoPackage = CONTAINERD) -> list[str]:
    """The file names :func:`generate` writes for ``package``, in a stable order."""
    return package.generated_names()


def _relative_imports(text: str, modules: set[str]) -> str:
    """Rewrite protoc's absolute imports of the generated ``modules`` to relative ones."""

    def repl(match: re.Match[str]) -> str:
        module = match.group("module")
        if module not in modules:
            return match.group(0)
        return f"from . import {module}"

    return re.sub(
        r"^from (?:[A-Za-z_][\w]*\.)*?(?:[A-Za-z_]\w*) import (?P<module>\w+_pb2(?:_grpc)?)\b",
        repl,
        text,
        flags=re.MULTILINE,
    )


def generate(output_dir: Path, package: ProtoPackage = CONTAINERD) -> list[Path]:
    """Run protoc on ``package``'s ``.proto`` files and write the modules flat
    into ``output_dir``.

    Returns the files written (:func:`generated_names`, in that order).
    """
    _check_tools_version()
    from grpc_tools import protoc  # the pinned tool, imported only here

    include = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="txgraph-protoc-") as tmp:
        argv = [
            "protoc",
            f"--proto_path={package.proto_dir}",
            f"--proto_path={include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *package.files,
        ]
        status = protoc.main(argv)
        if status != 0:
            raise GenerateError(f"protoc exited {status}: {' '.join(argv)}")
        modules = {Path(p).stem + s.removesuffix(".py").removesuffix(".pyi")
                   for p in package.files for s in SUFFIXES}
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for proto in package.files:
            stem = proto.removesuffix(".proto")
            for suffix in SUFFIXES:
                source = Path(tmp) / (stem + suffix)
                if not source.exists():
                    raise GenerateError(f"protoc did not write {source.name} for {proto}")
                target = output_dir / (Path(stem).name + suffix)
                target.write_text(_relative_imports(source.read_text(), modules))
                written.append(target)
    return written


def main() -> int:
    """Regenerate the checked-in modules of every package in :data:`PACKAGES`;
    print what was written."""
    try:
        for package in PACKAGES:
            for path in generate(package.directory, package):
                print(path.relative_to(TXGRAPH_DIR.parent))
    except GenerateError as error:
        print(f"txgraph.api.containerd.proto.generate: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
