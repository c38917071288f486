"""
A small client of dockerd's Engine API over its UNIX socket, for
C{txgraph-admin make-thin}: inspect an image, save it, load one.

Blocking (C{http.client}); used by the command line only.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

from txgraph.errors import TxgraphError

DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineError(TxgraphError):
    """
    dockerd refused or failed a request; the message says which and why.
    """


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over a UNIX socket: dockerd's API, txgraph's admin socket (and, in
    the tests, the plugin socket, as dockerd speaks to it).
    """

    def __init__(self, path: str, timeout: float = 3600) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def socket_path(host: str | None) -> str:
    """
    The UNIX socket of a C{DOCKER_HOST}-style address (default: C{$DOCKER_HOST}
    or dockerd's default socket).
    """
    host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    if host.startswith("unix://"):
        return host[len("unix://") :]
    if host.startswith("/"):
        return host
    raise EngineError(f"docker host {host!r}: only unix:// sockets are supported")


class Engine:
    """
    dockerd, through its API socket.
    """

    def __init__(self, host: str | None = None, timeout: float = 3600) -> None:
        self.path = socket_path(host)
        self.timeout = timeout

    def _request(
        self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            conn.request(method, url, body=body, headers=headers or {})
            response = conn.getresponse()
        except FileNotFoundError:
            raise EngineError(f"dockerd's socket {self.path} does not exist (is dockerd running?)") from None
        except ConnectionRefusedError:
            raise EngineError(f"dockerd does not answer on {self.path}") from None
        if response.status >= 300:
            text = response.read().decode(errors="replace")
            try:
                text = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                pass
            raise EngineError(f"dockerd: {method} {url}: {response.status}: {text.strip()}")
        return response

    def inspect_image(self, ref: str) -> dict[str, Any]:
        """
        C{docker image inspect REF}.
        """
        quoted = urllib.parse.quote(ref, safe="")
        try:
            return json.loads(self._request("GET", f"/images/{quoted}/json").read())
        except EngineError as e:
            if ": 404:" in e.message:
                raise EngineError(f"dockerd has no image {ref!r}") from None
            raise

    def save(self, ref: str) -> IO[bytes]:
        """
        C{docker save REF}, as a stream.
        """
        quoted = urllib.parse.quote(ref, safe="")
        return self._request("GET", f"/images/{quoted}/get")

    def load(self, tar: bytes) -> list[str]:
        """
        C{docker load}: returns dockerd's messages; raises on its errors.
        """
        response = self._request(
            "POST", "/images/load", body=tar, headers={"Content-Type": "application/x-tar"}
        )
        messages = []
        for event in _json_lines(response):
            if "error" in event or "errorDetail" in event:
                detail = event.get("errorDetail", {}).get("message") or event.get("error")
                raise EngineError(f"dockerd could not load the thin image: {detail}")
            if event.get("stream"):
                messages.append(str(event["stream"]).strip())
        return messages


def _json_lines(response: IO[bytes]) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    buffer = ""
    for line in response:
        buffer += line.decode(errors="replace")
        while buffer.strip():
            try:
                value, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            if isinstance(value, dict):
                yield value
