"""The part of Kubernetes' CRI that txgraph's tests speak to containerd's CRI plugin.

``proto/runtime/v1/api.proto`` is txgraph's own copy of the CRI image
service's PullImage, ImageStatus, ListImages and RemoveImage (package
``runtime.v1``, the names and field numbers compiled into containerd
1.6.20); ``api_pb2``, ``api_pb2_grpc`` and the ``.pyi`` stub are generated
from it by ``python -m txgraph.api.containerd.proto.generate`` and checked in, as
for :mod:`txgraph.api.containerd.proto`.  Tests use it to pull images the way
Kubernetes does (tests/integration/containerd.py's ``Containerd.cri_pull``):
that is the pull path on which containerd's unpacker labels layer snapshots
with ``containerd.io/snapshot.ref``.
"""
