"""
The containerd front end: containerd's snapshotter gRPC service
(C{containerd.services.snapshots.v1.Snapshots}) on a UNIX socket, served
by grpcio (L{txgraph.api.containerd.server}) from the generated code in
L{txgraph.api.containerd.proto}, each call handed to the reactor where
L{txgraph.snapshotter.Snapshotter} and the layer machines live.

This module itself imports no grpcio (about 16 MB of the daemon's memory):
the daemon checks C{--containerd-listen} with L{socket_path}, and imports
the server only when it serves containerd.
"""

from __future__ import annotations

from txgraph.errors import ConfigurationError

__all__ = ["socket_path"]


def socket_path(listen: str) -> str:
    """
    The path of C{--containerd-listen unix:PATH} (C{unix://PATH} too); a
    L{ConfigurationError} naming the value otherwise.  A C{systemd:} socket
    is refused: grpcio (1.85) has no server call that serves on a listening
    descriptor it did not make, only C{add_insecure_port} on an address.
    """
    if listen.startswith("systemd:"):
        raise ConfigurationError(
            f"invalid --containerd-listen {listen!r}: grpcio's server binds its own socket "
            "and cannot adopt one systemd passed; give unix:/path/to/snapshotter.sock (txgraph "
            "creates it 0660, and a socket-activated txgraph is started by its plugin socket)"
        )
    if not listen.startswith("unix:"):
        raise ConfigurationError(
            f"invalid --containerd-listen {listen!r}: containerd reaches proxy snapshotters "
            "over a UNIX socket, give unix:/path/to/snapshotter.sock"
        )
    path = listen[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    if not path.startswith("/") or path.endswith("/") or "\0" in path:
        raise ConfigurationError(
            f"invalid --containerd-listen {listen!r}: the socket's path must be absolute"
        )
    return path
