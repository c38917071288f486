"""Pulls through containerd's CRI plugin: the path on which layers carry ``containerd.io/snapshot.ref``.

containerd 1.6's pull-time unpacker (``unpacker.go``, behind
``client.Pull(..., WithPullUnpack)``: CRI, nerdctl, Docker's containerd
store) prepares every layer snapshot with the label
``containerd.io/snapshot.ref=<chain ID>``, and a snapshotter that answers
that Prepare with AlreadyExists makes containerd skip fetching and
unpacking the layer.  ``ctr images pull/import`` do not take that path, and
Debian 12 has no nerdctl or crictl, so the harness calls CRI's
``PullImage`` itself (``Containerd.cri_pull``).

- ``txgraph/testing/cri_proto`` is compared with the runtime.v1 descriptor
  compiled into containerd itself;
- a CRI pull into containerd's own overlayfs leaves committed layer
  snapshots labelled with their chain ID (checked through the Snapshots
  service);
- a small recording proxy snapshotter shows the calls a proxy plugin sees
  on that path, and, answering AlreadyExists for a chain ID it already
  holds, that a second containerd then skips the layer (the remote-snapshot
  shortcut docs/containerd.md describes).
"""

from __future__ import annotations

import itertools
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from containerd import CONTAINERD, CRI_NAMESPACE, Containerd, PushedImage, Registry, push_image
from google.protobuf import descriptor_pb2, json_format

from txgraph.api.containerd.proto import snapshots_pb2, snapshots_pb2_grpc
from txgraph.testing.cri_proto import api_pb2
from txgraph.testing.snapshotter.client import NAMESPACE_HEADER, Snapshotter, Target

pytestmark = pytest.mark.containerd

SNAPSHOT_REF = "containerd.io/snapshot.ref"
#: The gRPC metadata key that puts what a call creates under a containerd lease.
LEASE_HEADER = "containerd-lease"
_names = itertools.count()


# -- the CRI .proto against containerd's own descriptor ----------------------------


def _compiled_descriptor(binary: Path, package: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of ``package`` that ``binary`` registers
    (gogo/golang protobuf keep every file's descriptor gzipped in the binary)."""
    data = binary.read_bytes()
    magic = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # Go's gzip header
    start = data.find(magic)
    while start >= 0:
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:start + (1 << 20)])
            descriptor = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # not a descriptor: any other gzip stream or garbage
            descriptor = None
        if descriptor is not None and descriptor.package == package and descriptor.message_type:
            return descriptor
        start = data.find(magic, start + 1)
    raise AssertionError(f"{binary} registers no descriptor of package {package}")


def test_cri_proto_matches_containerds() -> None:
    """Every message, field (number, type, label, message type), enum value and
    method of txgraph/testing/cri_proto is containerd 1.6.20's runtime.v1."""
    theirs = _compiled_descriptor(Path(CONTAINERD), "runtime.v1")
    ours = descriptor_pb2.FileDescriptorProto()
    api_pb2.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == theirs.package == "runtime.v1"

    def fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple[Any, ...]]:
        return {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}

    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        their = their_messages[message.name]
        mine = fields(message)
        assert mine.items() <= fields(their).items(), message.name
        for nested in message.nested_type:  # map entries
            [their_nested] = [n for n in their.nested_type if n.name == nested.name]
            assert fields(nested) == fields(their_nested), f"{message.name}.{nested.name}"
    their_enums = {e.name: e for e in theirs.enum_type}
    for enum in ours.enum_type:
        assert [(v.name, v.number) for v in enum.value] == [
            (v.name, v.number) for v in their_enums[enum.name].value
        ], enum.name
    [their_service] = [s for s in theirs.service if s.name == "ImageService"]
    their_methods = {m.name: (m.input_type, m.output_type) for m in their_service.method}
    for method in ours.service[0].method:
        assert their_methods[method.name] == (method.input_type, method.output_type)


def test_cri_config_is_private(tmp_path: Path) -> None:
    """With cri_snapshotter the config enables CRI with that snapshotter, its own
    empty CNI directories and registry config_path, and a plain-HTTP hosts.toml."""
    daemon = Containerd(
        tmp_path, cri_snapshotter="txgraph", plain_http_registries=["127.0.0.1:5999"]
    )
    try:
        text = daemon.config_toml()
        assert "disabled_plugins = []" in text
        assert '[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "txgraph"' in text
        assert f'conf_dir = "{tmp_path.resolve()}/cni/net.d"' in text
        assert f'config_path = "{tmp_path.resolve()}/certs.d"' in text
        assert "/etc/cni" not in text and "/var/lib/containerd" not in text
        assert daemon.hosts_toml("127.0.0.1:5999").splitlines()[1:] == [
            'server = "http://127.0.0.1:5999"', "",
            '[host."http://127.0.0.1:5999"]', '  capabilities = ["pull", "resolve"]',
        ]
    finally:
        daemon.cleanup()
    with pytest.raises(ValueError, match="give cri_snapshotter"):
        Containerd(tmp_path, plain_http_registries=["127.0.0.1:5999"])
    with pytest.raises(ValueError, match="is not a HOST:PORT"):
        Containerd(tmp_path, cri_snapshotter="overlayfs", plain_http_registries=["a/b"])


# -- the image in the registry -------------------------------------------------------


@pytest.fixture(scope="module")
def pushed_busybox(containerd: Containerd, registry: Registry, busybox_image: Path) -> PushedImage:
    """busybox:local imported into the session containerd and pushed (plain HTTP)
    to the session registry; its chain IDs read back from the registry."""
    return push_image(containerd, registry, busybox_image, "txgraph-test/cri-busybox")


@pytest.fixture
def cri_overlayfs(
    tmp_path: Path, registry: Registry
) -> Iterator[Containerd]:
    """A containerd whose CRI plugin unpacks with containerd's own overlayfs and
    reaches the session registry over plain HTTP."""
    daemon = Containerd(
        tmp_path / "containerd", cri_snapshotter="overlayfs",
        plain_http_registries=[registry.host],
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


def test_cri_pull_labels_committed_layers(
    cri_overlayfs: Containerd, pushed_busybox: PushedImage
) -> None:
    """A CRI pull (as the kubelet pulls) unpacks through the labelling unpacker:
    the committed layer snapshots in namespace k8s.io are named by their chain
    ID and keep the label containerd.io/snapshot.ref=<chain ID> that the
    unpacker gave Prepare and Commit; nothing else is labelled (CRI's
    disable_snapshot_annotations defaults to true in 1.6)."""
    log = cri_overlayfs.log_tail(1 << 20)
    assert r'loading plugin \"io.containerd.grpc.v1.cri\"' in log, log
    assert "Start cri plugin with config" in log, log

    image_id = cri_overlayfs.cri_pull(pushed_busybox.reference)
    status = cri_overlayfs.cri_image_status(pushed_busybox.reference)
    assert status is not None and status.id == image_id
    assert pushed_busybox.reference in status.repo_tags

    client = Snapshotter(Target(f"unix://{cri_overlayfs.address}", "overlayfs", CRI_NAMESPACE))
    try:
        snapshots = {info.name: info for info in client.walk()}
    finally:
        client.close()
    assert sorted(snapshots) == sorted(pushed_busybox.chain_ids)
    parent = ""
    for chain_id in pushed_busybox.chain_ids:
        info = snapshots[chain_id]
        assert info.kind == snapshots_pb2.COMMITTED and info.parent == parent
        assert info.labels == {SNAPSHOT_REF: chain_id}, info.labels
        parent = chain_id

    cri_overlayfs.cri_remove_image(pushed_busybox.reference)
    assert cri_overlayfs.cri_image_status(pushed_busybox.reference) is None


# -- what a proxy snapshotter sees ----------------------------------------------------


@dataclass
class Call:
    """One call a proxy snapshotter received."""

    method: str
    namespace: str | None
    request: dict[str, Any]
    answer: str = "OK"


@dataclass
class RecordingSnapshotter(snapshots_pb2_grpc.SnapshotsServicer):
    """A proxy snapshotter that records every call and forwards it to another
    containerd's Snapshots service (``backend``: its overlayfs, in a namespace of
    its own), so that containers really get mounts and layers really unpack.

    With ``shortcut`` it is a minimal remote snapshotter: a Prepare labelled
    ``containerd.io/snapshot.ref=X`` is answered AlreadyExists when the backend
    holds a committed snapshot labelled X with the requested parent, as a
    snapshotter on a shared pool would answer for a layer another host
    published.  (Only a test device: containerd's metadata garbage collection
    of one client would remove snapshots another client committed here.)
    """

    backend: Snapshotter
    shortcut: bool = False
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> Call:
        fields = json_format.MessageToDict(request, preserving_proto_field_name=True)
        namespace = dict(context.invocation_metadata()).get(NAMESPACE_HEADER)
        call = Call(method, namespace, fields)
        with self.lock:
            self.calls.append(call)
        return call

    def _forward(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        call = self._record(method, request, context)
        forwarded = type(request)()
        forwarded.CopyFrom(request)
        forwarded.snapshotter = self.backend.target.snapshotter
        try:
            return getattr(self.backend.stub, method)(
                forwarded, metadata=self.backend.metadata, timeout=120
            )
        except grpc.RpcError as error:
            call.answer = error.code().name
            context.abort(error.code(), error.details() or "")

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Prepare, or AlreadyExists for a labelled chain ID the backend holds."""
        target = request.labels.get(SNAPSHOT_REF)
        if self.shortcut and target:
            held = [
                info for info in self.backend.walk(f'labels."{SNAPSHOT_REF}"=={target}')
                if info.kind == snapshots_pb2.COMMITTED and info.parent == request.parent
            ]
            if held:
                call = self._record("Prepare", request, context)
                call.answer = "ALREADY_EXISTS"
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"target snapshot {target!r}")
        return self._forward("Prepare", request, context)

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("View", request, context)

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Mounts", request, context)

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Commit", request, context)

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Remove", request, context)

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Stat", request, context)

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Update", request, context)

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Forwarded (a stream)."""
        yield from self._forward("List", request, context)

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Usage", request, context)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Forwarded."""
        return self._forward("Cleanup", request, context)

    def take(self) -> list[Call]:
        """The calls recorded since the last take()."""
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def recorder(containerd: Containerd, tmp_path: Path) -> Iterator[tuple[RecordingSnapshotter, Path]]:
    """A RecordingSnapshotter (with the shortcut) served on a unix socket, forwarding to
    the session containerd's overlayfs in a namespace of its own, under a lease (else
    that containerd's garbage collector removes the snapshots, which nothing there
    references, whenever it runs); the lease and the snapshots are removed afterwards."""
    namespace = f"cri-recorder-{os.getpid()}-{next(_names)}"
    lease = f"recorder-{next(_names)}"
    containerd.ctr("leases", "create", "--id", lease, "--expires", "0", namespace=namespace)
    backend = Snapshotter(Target(f"unix://{containerd.address}", "overlayfs", namespace))
    backend.metadata = (*backend.metadata, (LEASE_HEADER, lease))
    servicer = RecordingSnapshotter(backend, shortcut=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(servicer, server)
    socket_path = Path(containerd.address).parent / f"{lease}.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        yield servicer, socket_path
    finally:
        server.stop(grace=None).wait()
        socket_path.unlink(missing_ok=True)
        try:
            for info in backend.walk():  # views and active snapshots first
                if info.kind != snapshots_pb2.COMMITTED:
                    backend.remove(info.name)
            while leftover := backend.walk():  # committed ones: children first
                parents = {info.parent for info in leftover}
                for info in leftover:
                    if info.name not in parents:
                        backend.remove(info.name)
        finally:
            backend.close()
            containerd.ctr("leases", "delete", lease, namespace=namespace)


def _cri_node(tmp_path: Path, name: str, socket_path: Path, registry: Registry) -> Containerd:
    return Containerd(
        tmp_path / name, proxy_plugins={"recorder": socket_path}, cri_snapshotter="recorder",
        plain_http_registries=[registry.host],
    )


def test_proxy_sees_the_remote_snapshot_shortcut(
    tmp_path: Path,
    registry: Registry,
    pushed_busybox: PushedImage,
    recorder: tuple[RecordingSnapshotter, Path],
) -> None:
    """Two containerds with the same proxy snapshotter CRI-pull the same image.

    The first one's unpacker: Stat(chain ID) NotFound at containerd's
    metadata (not sent to the proxy), then Prepare of
    ``k8s.io/<n>/extract-<unique> <chain ID>`` with the parent's backend key
    and only the label containerd.io/snapshot.ref=<chain ID>, Mounts-free
    apply, Commit as ``k8s.io/<m>/<chain ID>`` with the same label.  The
    second one's Prepare is answered AlreadyExists; containerd then lists the
    proxy's committed snapshots with that label and parent, adopts the one
    found, and its unpacker's second Stat succeeds: no Commit, the layer is
    neither fetched nor unpacked, and the image is pulled all the same.
    """
    servicer, socket_path = recorder
    [chain_id] = pushed_busybox.chain_ids  # busybox:local has one layer
    first = _cri_node(tmp_path, "node-a", socket_path, registry)
    second = _cri_node(tmp_path, "node-b", socket_path, registry)
    try:
        first.start()
        servicer.take()
        first.cri_pull(pushed_busybox.reference)
        calls = servicer.take()
        calls = [c for c in calls if c.method != "List" or c.request.get("filters")]
        methods = [(c.method, c.answer) for c in calls]
        assert methods == [("Prepare", "OK"), ("Commit", "OK")], calls
        prepare, commit = calls
        assert {c.namespace for c in calls} == {CRI_NAMESPACE}
        assert prepare.request["snapshotter"] == "recorder"
        assert prepare.request["key"].startswith(f"{CRI_NAMESPACE}/")
        assert prepare.request["key"].endswith(f" {chain_id}")
        assert "/extract-" in prepare.request["key"]
        assert "parent" not in prepare.request  # the first layer
        assert prepare.request["labels"] == {SNAPSHOT_REF: chain_id}
        assert commit.request["key"] == prepare.request["key"]
        assert commit.request["name"].startswith(f"{CRI_NAMESPACE}/")
        assert commit.request["name"].endswith(f"/{chain_id}")
        assert commit.request["labels"] == {SNAPSHOT_REF: chain_id}
        published = commit.request["name"]

        second.start()
        servicer.take()
        second.cri_pull(pushed_busybox.reference)
        calls = servicer.take()
        methods = [(c.method, c.answer) for c in calls]
        assert methods[:1] == [("Prepare", "ALREADY_EXISTS")], calls
        assert ("Commit", "OK") not in methods, calls
        listing = [c for c in calls if c.method == "List"]
        assert listing and listing[0].request["filters"] == [
            f'labels."{SNAPSHOT_REF}"=={chain_id},parent==""'
        ], listing
        stats = [c for c in calls if c.method == "Stat"]
        assert stats and stats[0].request["key"] == published, calls
        assert second.cri_image_status(pushed_busybox.reference) is not None
        client = Snapshotter(Target(f"unix://{second.address}", "recorder", CRI_NAMESPACE))
        try:
            [adopted] = client.walk()
        finally:
            client.close()
        assert adopted.name == chain_id and adopted.kind == snapshots_pb2.COMMITTED
    finally:
        second.cleanup()
        first.cleanup()
