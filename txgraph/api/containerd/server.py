"""
containerd's Snapshots gRPC service over a UNIX socket, served by grpcio.

grpcio runs each call on a thread of a bounded pool; the call is handed to
the reactor (L{ReactorBridge}), where the snapshotter and the layer
machines live, and the gRPC thread waits for the answer.  The reactor is
never blocked.  Errors become the gRPC codes containerd's C{errdefs}
understands, so that containerd (its unpacker, its garbage collector)
reacts as it does to its own snapshotters:

 - L{UnknownSnapshot} (and L{UnknownLayer}): NotFound;
 - L{SnapshotExists} (and L{LayerExists}): AlreadyExists;
 - L{InvalidLayerState}: FailedPrecondition (Remove with children, Commit
   of a snapshot that is not active, the mounts of a committed one);
 - L{BadRequest} (a missing key, a bad filter or field path, a parent
   that is not committed): InvalidArgument;
 - any other txgraph error (a backend failure): Unknown; anything else is
   a bug: Internal.

Every message names the key.

The socket is created in a private directory beside its path and renamed
into place once it is 0660 and owned by root and the socket group, so
that it is never reachable with wider permissions.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import grp
import os
import socket
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from time import perf_counter
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgraph import metrics
from txgraph.api.containerd.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from txgraph.backends import MountSpec
from txgraph.errors import (
    BadRequest,
    ConfigurationError,
    InvalidLayerState,
    LayerExists,
    SnapshotExists,
    TxgraphError,
    UnknownLayer,
    UnknownSnapshot,
)
from txgraph.snapshotter import ACTIVE, COMMITTED, VIEW, Info, Snapshotter

log = Logger()
T = TypeVar("T")

#: How many gRPC calls are served at once (each holds a thread while the
#: reactor works on it).
MAX_WORKERS = 32

#: How many infos each message of List's stream carries (containerd's own
#: service sends 100).
LIST_BATCH = 100

_KINDS = {VIEW: snapshots_pb2.VIEW, ACTIVE: snapshots_pb2.ACTIVE, COMMITTED: snapshots_pb2.COMMITTED}

#: txgraph's errors and the codes containerd's errdefs maps back to its own.
_CODES: tuple[tuple[type[TxgraphError], grpc.StatusCode], ...] = (
    (UnknownSnapshot, grpc.StatusCode.NOT_FOUND),
    (UnknownLayer, grpc.StatusCode.NOT_FOUND),
    (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (LayerExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidLayerState, grpc.StatusCode.FAILED_PRECONDITION),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_code(error: BaseException) -> grpc.StatusCode:
    """
    The gRPC code an error is answered with.
    """
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    if isinstance(error, TxgraphError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


class Stopping(TxgraphError):
    """
    txgraph is stopping: the call cannot be served any more.
    """


class ReactorBridge:
    """
    Runs coroutines on the reactor for gRPC's threads, and gives up on
    every waiting call when the server stops (a call waiting on a stopped
    reactor would hold its thread, and the process, forever).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._waiting: set[concurrent.futures.Future[Any]] = set()
        self._stopped = False

    def call(self, work: Callable[[], Coroutine[Any, Any, T] | T]) -> T:
        """
        (A gRPC thread.)  Run C{work} in the reactor thread (a coroutine
        is run to its end there); return its result or raise its error.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._stopped:
            raise Stopping("txgraph is stopping")
        self._waiting.add(future)

        def settle(result: Any) -> None:
            if future.done():
                return
            if isinstance(result, Failure):
                future.set_exception(result.value)
            else:
                future.set_result(result)

        def run() -> None:
            try:
                outcome = work()
            except BaseException:
                settle(Failure())
                return
            if isinstance(outcome, Coroutine):
                ensureDeferred(outcome).addBoth(settle)
            elif isinstance(outcome, Deferred):
                outcome.addBoth(settle)
            else:
                settle(outcome)

        try:
            self._reactor.callFromThread(run)
            return future.result()
        finally:
            self._waiting.discard(future)

    def stop(self) -> None:
        """
        Fail every call still waiting, and refuse new ones.
        """
        self._stopped = True
        for future in list(self._waiting):
            if not future.done():
                future.set_exception(Stopping("txgraph is stopping"))


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def info_message(info: Info) -> snapshots_pb2.Info:
    """
    The wire form of a snapshot's info.
    """
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=_KINDS[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


def mount_messages(specs: list[MountSpec]) -> list[mount_pb2.Mount]:
    """
    The wire form of mounts.
    """
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in specs]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """
    The Snapshots service: decode, hand to the snapshotter on the reactor
    (once it is ready), encode, or abort with the error's code.
    """

    def __init__(self, snapshotter: Snapshotter, bridge: ReactorBridge) -> None:
        self.snapshotter = snapshotter
        self.bridge = bridge

    def _run(self, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        sn = self.snapshotter

        async def when_ready() -> Any:
            await sn.ready
            result = work()
            if isinstance(result, Coroutine):
                return await result
            return result

        try:
            return self.bridge.call(when_ready)
        except Exception as e:
            code = status_code(e)
            message = e.message if isinstance(e, TxgraphError) else f"{type(e).__name__}: {e}"
            if code == grpc.StatusCode.INTERNAL:
                log.failure("internal error in a containerd call", Failure(e))
            context.abort(code, message)
            raise  # not reached: abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Prepare: an active snapshot.
        """
        labels = dict(request.labels)
        specs = self._run(context, lambda: self.snapshotter.prepare(request.key, request.parent, labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mount_messages(specs))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        View: a read-only view.
        """
        labels = dict(request.labels)
        specs = self._run(context, lambda: self.snapshotter.view(request.key, request.parent, labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mount_messages(specs))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Mounts of an active snapshot or view.
        """
        specs = self._run(context, lambda: self.snapshotter.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=mount_messages(specs))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Commit an active snapshot under a name.
        """
        labels = dict(request.labels)
        self._run(context, lambda: self.snapshotter.commit(request.name, request.key, labels))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Remove a snapshot without children.
        """
        self._run(context, lambda: self.snapshotter.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        A snapshot's info.
        """
        info = self._run(context, lambda: self.snapshotter.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_message(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Change a snapshot's labels.
        """
        given = Info(
            name=request.info.name,
            kind="",
            parent=request.info.parent,
            labels=dict(request.info.labels),
            created_ns=0,
            updated_ns=0,
        )
        paths = list(request.update_mask.paths)
        info = self._run(context, lambda: self.snapshotter.update(given, paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=info_message(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """
        The snapshots matching containerd's filters, streamed in batches.
        """
        wanted = list(request.filters)
        infos: list[Info] = self._run(context, lambda: self.snapshotter.list(wanted))
        for start in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[info_message(i) for i in infos[start : start + LIST_BATCH]]
            )

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        A snapshot's size and inodes.
        """
        size, inodes = self._run(context, lambda: self.snapshotter.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        """
        Release what removals left for later.
        """
        self._run(context, self.snapshotter.cleanup)
        return empty_pb2.Empty()


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """
    The containerd front end's choke point for metrics: every call's time
    and gRPC status code (its error kind too: the code is what containerd
    sees of an error), by method, into L{metrics.current}.  Installed only
    when metrics are on.
    """

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        m = metrics.current
        if handler is None or m is None:
            return handler
        # The service's own methods (grpcio answers unknown ones itself).
        method = details.method.rpartition("/")[2]

        def record(start: float, context: Any, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
            name = code.name
            m.request("containerd", method, perf_counter() - start, name,
                      None if code == grpc.StatusCode.OK else name)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: Any) -> Any:
                start = perf_counter()
                try:
                    reply = inner(request, context)
                except BaseException as e:
                    record(start, context, e)
                    raise
                record(start, context, None)
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def streaming(request: Any, context: Any) -> Iterator[Any]:
                start = perf_counter()
                try:
                    yield from inner_stream(request, context)
                except BaseException as e:
                    record(start, context, e)
                    raise
                record(start, context, None)

            return grpc.unary_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer
            )
        return handler


def _check_unused(path: str) -> None:
    """
    Remove a stale socket at C{path}; refuse one another process serves.
    """
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a socket left by a crash
        return
    finally:
        probe.close()
    raise ConfigurationError(
        f"--containerd-listen: {path} is in use by another process (another txgraph?)"
    )


class ContainerdServer:
    """
    The gRPC server on the containerd socket.
    """

    def __init__(self, snapshotter: Snapshotter, reactor: Any, path: str, group: str | None) -> None:
        self.path = path
        self.bridge = ReactorBridge(reactor)
        self._service = SnapshotsService(snapshotter, self.bridge)
        self._group = group
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """
        Listen: the socket is made in a private directory, given its mode
        and group, then renamed to its path.
        """
        gid = 0
        if self._group:
            try:
                gid = grp.getgrnam(self._group).gr_gid
            except KeyError:
                raise ConfigurationError(f"--socket-group {self._group}: no such group") from None
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        _check_unused(self.path)
        private = tempfile.mkdtemp(prefix=".txgraph-bind-", dir=directory)
        try:
            staged = os.path.join(private, "s.sock")
            server = grpc.server(
                concurrent.futures.ThreadPoolExecutor(
                    max_workers=MAX_WORKERS, thread_name_prefix="txgraph-grpc"
                ),
                interceptors=[MetricsInterceptor()] if metrics.current is not None else None,
            )
            snapshots_pb2_grpc.add_SnapshotsServicer_to_server(self._service, server)
            if server.add_insecure_port(f"unix:{staged}") == 0:
                raise ConfigurationError(f"--containerd-listen: cannot listen on {self.path}")
            server.start()
            os.chown(staged, 0, gid)
            os.chmod(staged, 0o660)
            os.rename(staged, self.path)
            self._server = server
        finally:
            with contextlib.suppress(OSError):
                for name in os.listdir(private):
                    os.unlink(os.path.join(private, name))
                os.rmdir(private)
        log.info("txgraph serving containerd's snapshotter protocol on {path}", path=self.path)

    def stop(self) -> None:
        """
        Stop serving: waiting calls fail, the socket goes.
        """
        self.bridge.stop()
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
