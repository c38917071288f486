"""
The HTTP site of the plugin socket: requests on a UNIX socket, ApplyDiff
bodies streamed to the API as they arrive (never spooled), and JSON bodies
too large for dockerd's tiny calls refused before they are read.
"""

from __future__ import annotations

from typing import Any, Protocol

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import Request as ServerRequest
from twisted.web.server import Site

from txgraph.api.streams import ApplyStream

log = Logger()

#: dockerd's JSON bodies are tiny; anything larger than this is refused.
MAX_JSON_BODY = 1 << 20


class StreamingAPI(Protocol):
    """
    What the site serves: Klein routes, and the start of an ApplyDiff as
    soon as its headers are in (L{txgraph.api.graphdriver.GraphDriverAPI}).
    """

    app: Klein

    def start_apply(self, request: Request, path: bytes) -> ApplyStream:
        """
        Start applying, reading the body as it arrives.
        """


class UnixSocketRequest(ServerRequest):
    """
    A request served on a UNIX socket (the plugin and admin sockets).
    """

    def getRequestHostname(self) -> bytes:
        """
        Klein asks every request for its host name; a request without a
        Host header (HTTP/1.0) would take it from the socket's address,
        which a UNIX socket does not have.
        """
        if self.getHeader(b"host") is None:
            return b"localhost"
        return super().getRequestHostname()


class PluginRequest(UnixSocketRequest):
    """
    A request that streams ApplyDiff bodies to the driver instead of
    spooling them, and refuses oversized JSON bodies early.
    """

    content: Any

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        path = getattr(channel, "_path", b"")
        command = getattr(channel, "_command", b"")
        site = getattr(channel, "site", None)
        api = getattr(site, "api", None)
        if (
            api is not None
            and command == b"POST"
            and path.split(b"?", 1)[0] == b"/GraphDriver.ApplyDiff"
        ):
            self.content = api.start_apply(self, path)
            return
        if length is not None and length > MAX_JSON_BODY:
            self.content = OversizedBody(length)
            return
        if length is None:
            self.content = OversizedBody(None)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if isinstance(self.content, ApplyStream):
            self.content.finish()
        # dockerd sends no Content-Type, and none is needed; without one,
        # Twisted never tries to parse a body as a form (which would read a
        # streaming body from the reactor thread).
        self.requestHeaders.removeHeader(b"Content-Type")
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if isinstance(self.content, ApplyStream):
            self.content.abort(reason.value)
            result = self.content.result
            if result is not None and not self.content.answered:
                # Nobody is left to answer: log the outcome rather than
                # leave it to the garbage collector as an unhandled error.
                result.addErrback(
                    lambda f: log.warn(
                        "ApplyDiff failed after dockerd closed the connection: {error}",
                        error=f.getErrorMessage(),
                    )
                )
        super().connectionLost(reason)


class OversizedBody:
    """
    Stands in for a JSON body that is too big (or chunked): counts and
    drops it, so the handler can answer with an error.
    """

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)

    def seek(self, offset: int, whence: int = 0) -> None:
        pass

    def tell(self) -> int:
        return self.received

    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class PluginSite(Site):
    """
    A Site whose requests stream ApplyDiff bodies to C{api}.
    """

    requestFactory = PluginRequest

    def __init__(self, api: StreamingAPI, **kwargs: Any) -> None:
        super().__init__(api.app.resource(), **kwargs)
        self.api = api

    def log(self, request: Any) -> None:
        """
        No access log: dockerd makes a dozen calls per container, and
        failures are logged where they are answered (L{txgraph.api.graphdriver}).
        """
