"""
The HTTP face of txgraph: a Klein resource speaking Docker's GraphDriver
plugin protocol (v1) exactly as dockerd speaks it.

Every call is C{POST /<Method>} with a JSON body and no Content-Type.  This
module decodes and validates the JSON (errors name the field), calls the
L{txgraph.driver.Driver}, and answers JSON; any failure is C{{"Err": msg}}
with a non-200 status, which dockerd reports as C{"<Method>: msg"}.

Two calls stream, and never hold a whole layer in memory or on disk:

 - ApplyDiff's body is a chunked tar.  Twisted would normally spool a body
   to a temporary file before the resource runs; L{txgraph.api.site.PluginRequest} instead
   starts the apply as soon as the headers are in and feeds the body to it
   through a bounded L{txgraph.api.streams.ApplyStream}, pausing the connection when the
   extracting thread falls behind.
 - Diff answers with a tar produced in a backend thread and written to the
   connection through L{txgraph.api.streams.ResponseStream}, which waits while the connection
   is paused.  An error before the first byte is a JSON error; an error
   after it aborts the connection, so that dockerd sees a truncated
   response rather than a short tar.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import parse_qs, urlsplit

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IRequest
from twisted.web.server import Request as ServerRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from txgraph import metrics
from txgraph.api.site import MAX_JSON_BODY, OversizedBody
from txgraph.api.streams import ApplyStream, ResponseStream
from txgraph.driver import Driver, check_id
from txgraph.errors import BadRequest, TxgraphError
from txgraph.model import Change

log = Logger()

CONTENT_TYPE = b"application/vnd.docker.plugins.v1+json"


# -- JSON handling -------------------------------------------------------------


def _optional_id(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value in (None, ""):
        return None
    return check_id(value, field)


def _string_map(body: dict[str, Any], field: str) -> dict[str, str]:
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"invalid {field}: expected an object of strings")
    return value


def _string(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"invalid {field}: expected a string, got {type(value).__name__}")
    return value


def _id_maps(body: dict[str, Any], field: str) -> list[dict[str, int]] | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest(f"invalid {field}: expected a list of ID mappings")
    result = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise BadRequest(f"invalid {field}[{i}]: expected an object")
        mapping = {}
        for key in ("container_id", "host_id", "size"):
            v = entry.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BadRequest(
                    f"invalid {field}[{i}].{key}: expected a non-negative integer"
                )
            mapping[key] = v
        if mapping["size"] == 0:
            raise BadRequest(f"invalid {field}[{i}].size: must be at least 1")
        result.append(mapping)
    return result


def _decode(request: IRequest) -> dict[str, Any]:
    content = request.content
    if isinstance(content, OversizedBody):
        if content.length is None:
            raise BadRequest(
                "request body must have a Content-Length (chunked JSON is not accepted)"
            )
        raise BadRequest(
            f"request body too large: {content.length} bytes (limit {MAX_JSON_BODY})"
        )
    raw = content.read() if content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON in request body: {e}") from None
    except RecursionError:
        # [[[[... deep enough to exhaust the decoder's recursion limit.
        raise BadRequest("malformed JSON in request body: nested too deeply") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(
            f"request body must be a JSON object, not {type(body).__name__}"
        )
    return body


def _respond(request: IRequest, status: int, payload: dict[str, Any] | bytes) -> bytes:
    """
    Answer with C{payload} as JSON (already encoded, if bytes).
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", CONTENT_TYPE)
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload).encode() + b"\n"


def _changes_json(changes: list[Change]) -> bytes:
    """
    C{{"Changes": [{"Path": ..., "Kind": ...}, ...]}}, byte for byte as
    C{json.dumps} writes it, without first making a dict of each change:
    for a layer of 10,000 files those dicts and the encoder's pieces were
    5 MB of small objects at once, on the reactor thread, for one answer
    (and a peak of small objects leaves Python's allocator holding more
    memory afterwards; see docs/performance.md, "RSS").
    """
    entries = ", ".join(
        f'{{"Path": {encode_basestring_ascii(c.path)}, "Kind": {int(c.kind)}}}'
        for c in changes
    )
    return f'{{"Changes": [{entries}]}}\n'.encode()


def _error(request: IRequest, failure: Failure) -> bytes:
    error = failure.value
    if isinstance(error, TxgraphError):
        log.info(
            "{uri} failed ({status}): {message}",
            uri=request.uri.decode(errors="replace"),
            status=error.status,
            message=error.message,
        )
        return _respond(request, error.status, {"Err": error.message})
    log.failure("internal error serving {uri}", failure, uri=request.uri)
    return _respond(
        request,
        500,
        {"Err": f"internal error in txgraph: {type(error).__name__}: {error}"},
    )


def _outcome(result: Any) -> tuple[str, str | None]:
    """
    A call's HTTP status and, for an error, its kind (for L{metrics.timed}).
    """
    if isinstance(result, Failure):
        error = result.value
        status = error.status if isinstance(error, TxgraphError) else 500
        return str(status), type(error).__name__
    return "200", None


Handler = Callable[[Any, dict[str, Any]], Awaitable[dict[str, Any] | bytes]]

#: The routes; bound per instance of L{GraphDriverAPI} (Klein's descriptor).
app = Klein()


def _endpoint(method: str) -> Callable[[Handler], Callable[[Any, IRequest], Deferred[bytes]]]:
    """
    Route C{POST /<method>} to a handler that takes the decoded JSON body
    and returns the JSON reply; errors become C{{"Err": ...}}.
    """

    def decorator(handler: Handler) -> Callable[[Any, IRequest], Deferred[bytes]]:
        def route(self: GraphDriverAPI, request: IRequest) -> Deferred[bytes]:
            async def serve() -> bytes:
                body = _decode(request)
                if method != "Plugin.Activate":
                    await self.driver_ready()
                return _respond(request, 200, await handler(self, body))

            d = metrics.timed("graphdriver", method, lambda: ensureDeferred(serve()), _outcome)
            d.addErrback(lambda f: _error(request, f))
            return d

        route.__name__ = handler.__name__
        route.__doc__ = handler.__doc__
        return app.route(f"/{method}", methods=["POST"])(route)

    return decorator


class GraphDriverAPI:
    """
    The GraphDriver plugin protocol, served by Klein, onto a L{Driver}.
    """

    app = app

    def __init__(self, driver: Driver, reactor: Any) -> None:
        self.driver = driver
        self._reactor = reactor

    async def driver_ready(self) -> None:
        """
        Wait until the driver has restored and recovered its state.
        """
        if not self.driver.ready.called:
            ready: Deferred[None] = Deferred()
            def fire(result: object) -> object:
                ready.callback(None)
                return result

            self.driver.ready.addBoth(fire)
            await ready

    @app.handle_errors(HTTPException)
    def unrouted(self, request: IRequest, failure: Failure) -> bytes:
        """
        A call to no route (an unknown method) or with the wrong HTTP verb:
        answered in the protocol's JSON, like every other error.
        """
        error = failure.value
        path = request.path.decode("utf-8", "replace")[:200]
        method = request.method.decode("utf-8", "replace")[:20]
        if isinstance(error, NotFound):
            message = f"unknown plugin call {path!r}: txgraph serves Plugin.Activate and GraphDriver.*"
        elif isinstance(error, MethodNotAllowed):
            message = f"plugin calls are POST, not {method!r} ({path!r})"
        else:
            message = f"cannot serve {method!r} {path!r}: {getattr(error, 'description', error)}"
        status = getattr(error, "code", None) or 400
        if metrics.current is not None:
            metrics.current.request("graphdriver", "unknown", None, str(status), type(error).__name__)
        log.info("{uri} failed ({status}): {message}", uri=path, status=status, message=message)
        return _respond(request, status, {"Err": message})

    @_endpoint("Plugin.Activate")
    async def activate(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        The handshake: txgraph implements the GraphDriver protocol.
        """
        return {"Implements": ["GraphDriver"]}

    @_endpoint("GraphDriver.Init")
    async def init(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Init: dockerd's home directory, storage options and ID maps.
        """
        opts = body.get("Opts")
        if opts is None:
            opts = []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise BadRequest("invalid Opts: expected a list of key=value strings")
        await self.driver.init(
            _string(body, "Home"),
            opts,
            _id_maps(body, "UIDMaps"),
            _id_maps(body, "GIDMaps"),
        )
        return {}

    @_endpoint("GraphDriver.Capabilities")
    async def capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Capabilities.
        """
        return {"Capabilities": self.driver.capabilities()}

    @_endpoint("GraphDriver.Status")
    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Status: key/value pairs for C{docker info}.
        """
        return {"Status": [list(pair) for pair in await self.driver.status()]}

    @_endpoint("GraphDriver.Create")
    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Create an image layer.
        """
        _string(body, "MountLabel")
        await self.driver.create(
            check_id(body.get("ID")),
            _optional_id(body, "Parent"),
            False,
            _string_map(body, "StorageOpt"),
        )
        return {}

    @_endpoint("GraphDriver.CreateReadWrite")
    async def create_read_write(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Create a container layer.
        """
        _string(body, "MountLabel")
        await self.driver.create(
            check_id(body.get("ID")),
            _optional_id(body, "Parent"),
            True,
            _string_map(body, "StorageOpt"),
        )
        return {}

    @_endpoint("GraphDriver.Remove")
    async def remove(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Remove a layer.
        """
        await self.driver.remove(check_id(body.get("ID")))
        return {}

    @_endpoint("GraphDriver.Get")
    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Mount a layer and take a reference.
        """
        _string(body, "MountLabel")
        return {"Dir": await self.driver.get(check_id(body.get("ID")))}

    @_endpoint("GraphDriver.Put")
    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Drop a reference.
        """
        await self.driver.put(check_id(body.get("ID")))
        return {}

    @_endpoint("GraphDriver.Exists")
    async def exists(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Whether a layer exists.
        """
        return {"Exists": self.driver.exists(check_id(body.get("ID")))}

    @_endpoint("GraphDriver.GetMetadata")
    async def metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Backend details of a layer, for C{docker inspect}.
        """
        return {"Metadata": await self.driver.metadata(check_id(body.get("ID")))}

    @_endpoint("GraphDriver.Cleanup")
    async def cleanup(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        dockerd is shutting down.
        """
        await self.driver.cleanup()
        return {}

    @_endpoint("GraphDriver.Changes")
    async def changes(self, body: dict[str, Any]) -> bytes:
        """
        The changes of a layer against its parent.
        """
        changes = await self.driver.changes(
            check_id(body.get("ID")), _optional_id(body, "Parent")
        )
        return _changes_json(changes)

    @_endpoint("GraphDriver.DiffSize")
    async def diff_size(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        The size of a layer's changes.
        """
        return {
            "Size": await self.driver.diff_size(
                check_id(body.get("ID")), _optional_id(body, "Parent")
            )
        }

    @app.route("/GraphDriver.Diff", methods=["POST"])
    def diff(self, request: ServerRequest) -> Deferred[bytes]:
        """
        Stream the layer tar of a layer's changes.
        """
        stream = ResponseStream(self._reactor, request)

        async def serve() -> bytes:
            body = _decode(request)
            await self.driver_ready()
            layer_id = check_id(body.get("ID"))
            parent = _optional_id(body, "Parent")
            await self.driver.check_read(layer_id, parent)
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"application/x-tar")
            request.registerProducer(stream, True)
            try:
                await self.driver.diff(layer_id, parent, stream)  # type: ignore[arg-type]
                # What is still buffered is sent from a thread too: flushing
                # waits while the connection is paused.
                await self.driver.backend.run(stream.flush)
            finally:
                request.unregisterProducer()
            if metrics.current is not None:
                metrics.current.diffed_bytes.inc(stream.written)
            return b""

        d = metrics.timed("graphdriver", "GraphDriver.Diff", lambda: ensureDeferred(serve()), _outcome)

        def failed(failure: Failure) -> bytes:
            if stream.started:
                log.failure(
                    "Diff failed after {n} bytes; aborting the response",
                    failure,
                    n=stream.written,
                )
                transport = getattr(request.channel, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                return b""
            return _error(request, failure)

        d.addErrback(failed)
        return d

    @app.route("/GraphDriver.ApplyDiff", methods=["POST"])
    def apply_diff(self, request: IRequest) -> Deferred[bytes]:
        """
        Answer an ApplyDiff whose body was streamed to the driver as it
        arrived (see L{start_apply}).
        """
        content = request.content
        if not isinstance(content, ApplyStream) or content.result is None:
            return fail(
                Failure(BadRequest("ApplyDiff body was not streamed"))
            ).addErrback(lambda f: _error(request, f))
        d: Deferred[Any] = Deferred()
        # Hand the outcome over (the apply's own Deferred keeps nothing).
        content.answered = True
        content.result.addBoth(d.callback)
        d.addCallback(lambda size: _respond(request, 200, {"Size": size}))
        d.addErrback(lambda f: _error(request, f))
        return d

    def start_apply(self, request: Request, path: bytes) -> ApplyStream:
        """
        Called when an ApplyDiff's headers are in: start applying, reading
        the body as it arrives.
        """
        # Flow control pauses reading from the connection itself.
        transport: Any = request.channel.transport
        stream = ApplyStream(
            self._reactor, transport.pauseProducing, transport.resumeProducing
        )

        async def apply() -> int:
            try:
                # Bytes that are not UTF-8 stay as lone surrogates, which
                # check_id refuses by name (a replacement character would
                # make them a different, valid ID).
                query = parse_qs(urlsplit(path.decode("utf-8", "surrogateescape")).query,
                                 keep_blank_values=True, errors="surrogateescape")
                layer_id = check_id((query.get("id") or [""])[0], "id")
                parent = (query.get("parent") or [""])[0] or None
                if parent is not None:
                    check_id(parent, "parent")
                await self.driver_ready()
                size = await self.driver.apply_diff(layer_id, parent, stream)  # type: ignore[arg-type]
                if metrics.current is not None:
                    metrics.current.applied_bytes.inc(stream.received)
                return size
            finally:
                stream.done()

        stream.result = metrics.timed(
            "graphdriver", "GraphDriver.ApplyDiff", lambda: ensureDeferred(apply()), _outcome
        )
        return stream
