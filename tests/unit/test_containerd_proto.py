"""The containerd snapshotter protocol in txgraph/api/containerd/proto/.

The checked-in generated modules (of this package and of
txgraph/testing/cri_proto/, which the same generator writes) must be exactly
what the pinned grpcio-tools makes of the checked-in ``.proto`` files, and
the messages must have containerd's wire format (the gogoproto options
dropped from containerd's file must not have changed it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from txgraph.api.containerd.proto import generate, mount_pb2, snapshots_pb2, snapshots_pb2_grpc


@pytest.mark.parametrize("package", generate.PACKAGES, ids=lambda p: p.name)
def test_generated_code_matches_proto(tmp_path: Path, package: generate.ProtoPackage) -> None:
    """Regenerating each package into a temporary directory gives byte-identical files."""
    written = generate.generate(tmp_path, package)
    assert [p.name for p in written] == package.generated_names()
    for path in written:
        checked_in = package.directory / path.name
        assert checked_in.exists(), f"{checked_in.name} is not checked in"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in.name} differs from the .proto's generated code: "
            "run python -m txgraph.api.containerd.proto.generate"
        )


@pytest.mark.parametrize("package", generate.PACKAGES, ids=lambda p: p.name)
def test_generated_imports_are_relative(package: generate.ProtoPackage) -> None:
    """No generated module imports a sibling by an absolute path (a move needs only
    a regeneration)."""
    roots = {Path(f).parts[0] for f in package.files}
    for name in package.generated_names():
        text = (package.directory / name).read_text()
        for root in roots:
            absolute = re.compile(rf"^\s*(from|import) {re.escape(root)}[. ]", re.MULTILINE)
            assert not absolute.search(text), (name, root)


def test_packages_are_shipped() -> None:
    """setup.cfg lists every generated package and ships its stubs and sources."""
    text = (generate.TXGRAPH_DIR.parent / "setup.cfg").read_text()
    for package in generate.PACKAGES:
        assert f"\n    {package.name}\n" in text, package.name
        assert f"\n{package.name} =\n    *.pyi\n" in text, package.name
        for proto in package.files:
            assert f"    proto/{Path(proto).parent}/*.proto\n" in text, proto


def test_relative_import_rewrite() -> None:
    """Only the generated modules' imports are rewritten, not google.protobuf's."""
    text = (
        "from containerd.types import mount_pb2 as m\n"
        "from google.protobuf import empty_pb2 as e\n"
    )
    assert generate._relative_imports(text, {"mount_pb2"}) == (
        "from . import mount_pb2 as m\nfrom google.protobuf import empty_pb2 as e\n"
    )


def test_service_names_are_containerds() -> None:
    """The service, methods and message names are containerd's (what containerd calls)."""
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup",
    ]
    assert service.methods_by_name["List"].output_type.name == "ListSnapshotsResponse"
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert {v.name: v.number for v in snapshots_pb2.Kind.DESCRIPTOR.values} == {
        "UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3,
    }
    assert hasattr(snapshots_pb2_grpc, "SnapshotsStub")
    assert hasattr(snapshots_pb2_grpc, "add_SnapshotsServicer_to_server")


def test_info_wire_format() -> None:
    """Info's bytes are what containerd's gogo code writes: the stdtime,
    non-nullable Timestamps are plain google.protobuf.Timestamp messages in
    fields 4 and 5, labels a map in field 6."""
    info = snapshots_pb2.Info(
        name="a",
        parent="b",
        kind=snapshots_pb2.COMMITTED,
        created_at=timestamp_pb2.Timestamp(seconds=1, nanos=2),
        updated_at=timestamp_pb2.Timestamp(seconds=3, nanos=4),
        labels={"k": "v"},
    )
    assert info.SerializeToString(deterministic=True) == bytes.fromhex(
        "0a0161"  # 1: name "a"
        "120162"  # 2: parent "b"
        "1803"  # 3: kind COMMITTED
        "220408011002"  # 4: created_at {seconds 1, nanos 2}
        "2a0408031004"  # 5: updated_at {seconds 3, nanos 4}
        "3206" "0a016b" "120176"  # 6: labels entry {key "k", value "v"}
    )


def test_update_and_mount_wire_format() -> None:
    """UpdateSnapshotRequest's mask (field 3) and Mount's fields have containerd's numbers."""
    request = snapshots_pb2.UpdateSnapshotRequest(
        snapshotter="s", info=snapshots_pb2.Info(name="n"),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
    )
    assert request.SerializeToString() == bytes.fromhex(
        "0a0173" "1203" "0a016e" "1a08" "0a066c6162656c73"
    )
    mount = mount_pb2.Mount(type="t", source="s", target="g", options=["ro"])
    assert mount.SerializeToString() == bytes.fromhex("0a0174" "120173" "1a0167" "2202726f")
