"""
The containerd front end: containerd's snapshotter gRPC service
(C{containerd.services.snapshots.v1.Snapshots}) on a UNIX socket, served
by grpcio (L{txgraph.api.containerd.server}) from the generated code in
L{txgraph.api.containerd.proto}, each call handed to the reactor where
L{txgraph.snapshotter.Snapshotter} and the layer machines live.
"""
