"""The CRI image service subset in txgraph/testing/cri_proto/.

The tests pull images through containerd's CRI plugin with it, so its
names must be the ones containerd serves (``/runtime.v1.ImageService/...``)
and its messages must have the CRI's wire format.  The integration test
tests/integration/test_containerd_cri.py compares every message and field
with the descriptor compiled into containerd itself; this one pins the
bytes without containerd.
"""

from __future__ import annotations

from txgraph.testing.cri_proto import api_pb2, api_pb2_grpc


def test_service_names_are_the_cris() -> None:
    """The service and its four methods have the names containerd routes."""
    service = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert service.full_name == "runtime.v1.ImageService"
    assert [m.name for m in service.methods] == [
        "ListImages", "ImageStatus", "PullImage", "RemoveImage",
    ]
    assert service.methods_by_name["PullImage"].input_type.full_name == (
        "runtime.v1.PullImageRequest"
    )
    assert hasattr(api_pb2_grpc, "ImageServiceStub")


def test_pull_request_wire_format() -> None:
    """PullImageRequest: image (1) an ImageSpec whose image is field 1 and
    annotations a map in field 2; sandbox_config (3) with metadata (1)."""
    request = api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image="a", annotations={"k": "v"}),
        sandbox_config=api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="p", attempt=1)
        ),
    )
    assert request.SerializeToString(deterministic=True) == bytes.fromhex(
        "0a0b" "0a0161" "1206" "0a016b" "120176"  # 1: image {image "a", annotations {k: v}}
        "1a07" "0a05" "0a0170" "2001"  # 3: sandbox_config {metadata {name "p", attempt 1}}
    )


def test_image_wire_format() -> None:
    """Image: id 1, repo_tags 2, repo_digests 3, size 4 (uint64), uid 5 (Int64Value),
    username 6, spec 7, pinned 8."""
    image = api_pb2.Image(
        id="i", repo_tags=["t"], repo_digests=["d"], size=300,
        uid=api_pb2.Int64Value(value=0), username="u",
        spec=api_pb2.ImageSpec(image="s"), pinned=True,
    )
    assert image.SerializeToString() == bytes.fromhex(
        "0a0169" "120174" "1a0164" "20ac02" "2a00" "320175" "3a03" "0a0173" "4001"
    )
    assert api_pb2.PullImageResponse(image_ref="r").SerializeToString() == b"\x0a\x01r"
