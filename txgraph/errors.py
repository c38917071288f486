"""
The errors txgraph reports to dockerd and to administrators.

Every error a request can cause is a L{TxgraphError} subclass whose message
names what was wrong; the API layer turns it into C{{"Err": message}} with
the error's HTTP status.  Anything else escaping to the API is a bug and is
reported as an internal error with status 500.
"""

from __future__ import annotations


class TxgraphError(Exception):
    """
    Base class of the errors a client may cause or be told about.

    @cvar status: the HTTP status the API answers with.
    """

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(TxgraphError):
    """
    The request itself is malformed: bad JSON, a wrong type, a missing or
    unsafe field.
    """

    status = 400


class UnknownLayer(TxgraphError):
    """
    The request names a layer txgraph does not have.
    """

    status = 404


class LayerExists(TxgraphError):
    """
    Create was asked for an ID that already names a different layer.
    """

    status = 409


class InvalidLayerState(TxgraphError):
    """
    The layer cannot do what was asked in the state it is in (Put without
    Get, Remove while mounted or with children, ApplyDiff on a layer with
    children, anything on a faulty layer).
    """

    status = 409


class ConfigurationError(TxgraphError):
    """
    An option (command line or Init.Opts) is unknown or invalid; the message
    names the key.
    """

    status = 400


class BackendError(TxgraphError):
    """
    The storage backend failed to carry out an operation (a mount, a mkfs,
    a cluster call).  The message says which operation on which layer.
    """

    status = 500


class SchemaTooNew(TxgraphError):
    """
    The state database was written by a newer txgraph than this one; it
    refuses to run rather than corrupt it.
    """


class ArchiveError(BadRequest):
    """
    A layer tar is malformed or tries to reach outside its layer; the message
    names the entry.
    """


class UnknownSnapshot(TxgraphError):
    """
    A containerd request names a snapshot txgraph does not have (gRPC
    NotFound).
    """

    status = 404


class SnapshotExists(TxgraphError):
    """
    A containerd Prepare, View or Commit names a snapshot that exists
    (gRPC AlreadyExists).
    """

    status = 409
