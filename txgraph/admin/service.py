"""
L{AdminAPI}: what the daemon serves on its admin socket
(C{<state-dir>/admin.sock}, mode 0600): status, ls, gc and make-thin's
publishing, as JSON or JSON lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from txgraph.admin.tasks import (
    layer_list,
    publish_layers,
    run_gc,
    status_report,
    thin_info,
)
from txgraph.api.metrics import CONTENT_TYPE
from txgraph.errors import BadRequest, TxgraphError


class AdminAPI:
    """
    What the admin socket serves: status, ls and gc, as JSON.
    """

    app = Klein()

    def __init__(self, driver: Any, snapshotter: Any = None) -> None:
        self.driver = driver
        self.snapshotter = snapshotter
        #: The metrics' text, as C{--metrics-listen} serves it
        #: (L{txgraph.api.metrics.render}); None while metrics are off.
        self.render_metrics: Callable[[], Deferred[bytes]] | None = None

    async def _ready(self) -> None:
        if not self.driver.ready.called:
            await self.driver.ready
        if self.snapshotter is not None and not self.snapshotter.ready.called:
            await self.snapshotter.ready

    @app.route("/status", methods=["POST"])
    async def status(self, request: IRequest) -> bytes:
        """
        The status report.
        """
        await self._ready()
        reads = await self.driver.backend.cluster_reads()
        lines = await self.driver.status(reads)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(status_report(self.driver, lines, reads, self.snapshotter)).encode()

    @app.route("/ls", methods=["POST"])
    async def ls(self, request: IRequest) -> bytes:
        """
        The layer list.
        """
        await self._ready()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(layer_list(self.driver, self.snapshotter)).encode()

    @app.route("/thin/info", methods=["POST"])
    async def thin_info(self, request: IRequest) -> bytes:
        """
        The cluster, pool and filesystem of the shared layers.
        """
        await self._ready()
        request.setHeader(b"Content-Type", b"application/json")
        try:
            return json.dumps(await thin_info(self.driver)).encode()
        except TxgraphError as e:
            request.setResponseCode(e.status)
            return json.dumps({"Err": e.message}).encode()

    @app.route("/thin/publish", methods=["POST"])
    async def thin_publish(self, request: IRequest) -> bytes:
        """
        Store layers as shared images, streamed as JSON lines (progress,
        one event per layer, the final report or an error).
        """
        from twisted.internet import reactor

        await self._ready()
        args = json.loads(request.content.read() or b"{}")
        request.setHeader(b"Content-Type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        def from_thread(report: Callable[[int], None]) -> Callable[[int], None]:
            return lambda done: reactor.callFromThread(report, done)  # type: ignore[attr-defined]

        try:
            layers = args.get("layers") if isinstance(args, dict) else None
            if not isinstance(layers, list):
                raise BadRequest("thin/publish: 'layers' must be a list")
            results = await publish_layers(self.driver, layers, emit, from_thread)
            emit({"event": "done", "layers": results})
        except TxgraphError as e:
            emit({"event": "error", "error": e.message})
        return b""

    @app.route("/metrics", methods=["POST"])
    async def metrics(self, request: IRequest) -> bytes:
        """
        The metrics' text exposition, as at C{--metrics-listen}'s
        C{/metrics} (rendered in a thread), for C{txgraph-admin top}; 404
        when metrics are off.
        """
        if self.render_metrics is None:
            request.setResponseCode(404)
            return (
                b"metrics are off: start txgraph with --metrics-listen "
                b"(e.g. tcp:9495:interface=127.0.0.1)"
            )
        body = await self.render_metrics()
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        return body

    @app.route("/gc", methods=["POST"])
    async def gc(self, request: IRequest) -> bytes:
        """
        Garbage collection, streamed as JSON lines (findings, progress, the
        final report).
        """
        await self._ready()
        args = json.loads(request.content.read() or b"{}")
        request.setHeader(b"Content-Type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        await run_gc(
            self.driver,
            bool(args.get("apply")),
            args.get("docker_home"),
            float(args.get("min_age", 300)),
            emit,
            self.snapshotter,
        )
        return b""
