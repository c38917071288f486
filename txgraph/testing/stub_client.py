"""
The plugin's HTTP site driven without a socket, reactor or threads, for
unit tests: requests framed exactly as dockerd frames them (POST, no
Content-Type) fed to the real L{PluginSite} over an in-memory transport,
and the raw responses split into status, headers and body.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.testing import StringTransport

from txgraph.api.graphdriver import GraphDriverAPI
from txgraph.api.site import PluginSite
from txgraph.driver import Driver


class ImmediateReactor:
    """
    Runs "from a thread" calls at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        """
        Call C{f(*args)} now, in the caller's thread.
        """
        f(*args)


class Client:
    """
    A stub HTTP client talking to a PluginSite over a StringTransport.
    """

    def __init__(self, driver: Driver) -> None:
        self.site = PluginSite(GraphDriverAPI(driver, ImmediateReactor()))

    def connect(self) -> tuple[Any, StringTransport]:
        """
        A new connection to the site: its protocol and transport.
        """
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def post(self, method: str, body: bytes | dict[str, Any] | None) -> tuple[int, dict[str, str], bytes]:
        """
        POST C{body} (a dict is sent as JSON) to C{/method} as dockerd
        does, on a new connection; the parsed response.
        """
        if isinstance(body, dict):
            body = json.dumps(body).encode() + b"\n"
        body = body or b""
        protocol, transport = self.connect()
        protocol.dataReceived(
            f"POST /{method} HTTP/1.1\r\nHost: \r\n"
            f"Accept: application/vnd.docker.plugins.v1.2+json\r\n"
            f"User-Agent: Go-http-client/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return parse(transport.value())


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """
    Split an HTTP/1.1 response into status, headers and (de-chunked) body.
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            body = rest[size + 2 :]
        body = out
    return status, headers, body
