"""
Layer tars streamed between the reactor and a backend thread, never held
whole in memory or on disk:

 - L{ApplyStream}: a request body (ApplyDiff's chunked tar) fed by the
   reactor and read, blocking, by the extracting thread, with flow control
   that pauses the connection when the thread falls behind;
 - L{ResponseStream}: a response body (Diff's tar) written, blocking, by
   the producing thread and delivered to the connection by the reactor,
   waiting while the connection is paused.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from zope.interface import implementer

from txgraph.errors import BadRequest

#: How much of an ApplyDiff body may wait for the extracting thread, which
#: reads it 1 MiB at a time: a larger buffer speeds nothing up, and is
#: memory the reactor's heap keeps in holes after a large layer.
APPLY_HIGH_WATER = 1 << 20
APPLY_LOW_WATER = 256 << 10
#: Diff output is handed to the reactor in chunks of this size.
DIFF_CHUNK = 256 << 10
#: At most this much Diff output may be handed to the reactor and not yet
#: written to the connection: the producing thread waits beyond it.
DIFF_IN_FLIGHT = 4 * DIFF_CHUNK

class ApplyStream:
    """
    The body of an ApplyDiff as a blocking, file-like stream for the
    extracting thread, fed by the reactor, with flow control.

    The reactor calls L{write} with each chunk; when more than
    C{APPLY_HIGH_WATER} bytes wait, the connection is paused until the
    reader drains below C{APPLY_LOW_WATER}.  L{read} blocks in the worker
    thread until data, the end of the body, or an abort arrives.
    """

    def __init__(self, reactor: Any, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._reactor = reactor
        self._pause = pause
        self._resume = resume
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._discard = False
        self._paused = False
        self._cond = threading.Condition()
        self.received = 0
        self.result: Deferred[Any] | None = None
        #: whether the ApplyDiff route took over L{result} to answer it
        self.answered = False

    # reactor side

    def write(self, data: bytes) -> None:
        """
        A chunk of the body arrived.
        """
        self.received += len(data)
        with self._cond:
            if self._discard:
                return
            self._chunks.append(data)
            self._buffered += len(data)
            pause = self._buffered > APPLY_HIGH_WATER and not self._paused
            if pause:
                self._paused = True
            self._cond.notify()
        if pause:
            self._pause()

    def seek(self, offset: int, whence: int = 0) -> None:
        """
        Twisted rewinds request bodies; this one cannot be, and need not.
        """

    def tell(self) -> int:
        """
        How much of the body has arrived.
        """
        return self.received

    def close(self) -> None:
        """
        Nothing to release here.
        """

    def finish(self) -> None:
        """
        The whole body has arrived.
        """
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self, reason: BaseException) -> None:
        """
        The connection was lost before the body ended.
        """
        with self._cond:
            self._error = reason
            self._cond.notify()

    def done(self) -> None:
        """
        The reader is finished (or failed): drop whatever else arrives, and
        let the connection flow again so the body can end.
        """
        with self._cond:
            self._discard = True
            self._chunks.clear()
            self._buffered = 0
            resume = self._paused
            self._paused = False
        if resume:
            self._resume()

    # worker side

    def read(self, n: int = -1) -> bytes:
        """
        Up to C{n} bytes of the body (all that is buffered if C{n} < 0);
        C{b""} at its end.  Blocks until something is there.
        """
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None and not self._chunks:
                raise BadRequest(
                    f"the layer tar stream was cut off after {self.received} bytes: "
                    f"{self._error}"
                )
            if not self._chunks:
                return b""
            if n < 0 or n >= self._buffered:
                data = b"".join(self._chunks)
                self._chunks.clear()
            else:
                parts = []
                need = n
                while need:
                    chunk = self._chunks[0]
                    if len(chunk) <= need:
                        parts.append(self._chunks.popleft())
                        need -= len(chunk)
                    else:
                        parts.append(chunk[:need])
                        self._chunks[0] = chunk[need:]
                        need = 0
                data = b"".join(parts)
            self._buffered -= len(data)
            resume = self._paused and self._buffered < APPLY_LOW_WATER
            if resume:
                self._paused = False
        if resume:
            self._reactor.callFromThread(self._resume)
        return data


@implementer(IPushProducer)
class ResponseStream:
    """
    A blocking, file-like writer for a backend thread that produces a
    response body (Diff's tar), delivered to the connection by the reactor
    in chunks, waiting while the connection is paused, and while more than
    C{DIFF_IN_FLIGHT} bytes are handed over but not yet written (the
    pause alone comes too late: a fast producer can queue tens of MB of
    calls before the reactor runs them and the connection pushes back).
    """

    def __init__(self, reactor: Any, request: IRequest) -> None:
        self._reactor = reactor
        self._request = request
        self._buffer: list[bytes] = []
        self._size = 0
        self._writable = threading.Event()
        self._writable.set()
        self._lost = False
        self._in_flight = 0
        self._delivered = threading.Condition()
        self.started = False
        self.written = 0

    # IPushProducer, called by the reactor
    def pauseProducing(self) -> None:
        """
        The connection's buffer is full.
        """
        self._writable.clear()

    def resumeProducing(self) -> None:
        """
        The connection can take more.
        """
        self._writable.set()

    def stopProducing(self) -> None:
        """
        The connection is gone.
        """
        self._lost = True
        self._writable.set()
        with self._delivered:
            self._delivered.notify_all()

    def _deliver(self, data: bytes) -> None:
        """
        (In the reactor.)  Write a chunk handed over by the worker.
        """
        try:
            if not self._lost:
                self._request.write(data)
        finally:
            with self._delivered:
                self._in_flight -= len(data)
                self._delivered.notify_all()

    # worker side
    def write(self, data: bytes) -> int:
        """
        Queue C{data}; send once a chunk's worth is buffered.
        """
        if data:
            self._buffer.append(bytes(data))
            self._size += len(data)
            if self._size >= DIFF_CHUNK:
                self.flush()
        return len(data)

    def flush(self) -> None:
        """
        Send what is buffered, waiting while the connection is paused.
        """
        if not self._buffer:
            return
        with self._delivered:
            while self._in_flight >= DIFF_IN_FLIGHT and not self._lost:
                self._delivered.wait(1.0)
        self._writable.wait()
        if self._lost:
            raise ConnectionError("dockerd closed the connection during Diff")
        data = b"".join(self._buffer)
        self._buffer = []
        self._size = 0
        self.started = True
        self.written += len(data)
        with self._delivered:
            self._in_flight += len(data)
        self._reactor.callFromThread(self._deliver, data)
