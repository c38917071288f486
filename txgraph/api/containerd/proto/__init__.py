"""containerd's snapshotter gRPC protocol, from txgraph's own ``.proto`` files.

``proto/`` holds the sources (containerd v1.6.20's names and field numbers,
plain proto3); ``mount_pb2``, ``snapshots_pb2`` and ``snapshots_pb2_grpc``
(and their ``.pyi`` stubs) are generated from them by
``python -m txgraph.api.containerd.proto.generate`` and checked in; a unit test
proves they match.  The generated modules import each other relatively, so
moving this package only needs a regeneration.
"""
