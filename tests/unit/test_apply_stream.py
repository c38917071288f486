"""
Tests for L{ApplyStream}'s hand-over between the reactor (writing the
ApplyDiff body chunk by chunk) and the extracting thread (reading it), with
a real reader thread: the body arrives whole and in order, an abort wakes
the reader, and flow control pauses and resumes the connection.
"""

from __future__ import annotations

import threading

import pytest

from txgraph.api.streams import APPLY_HIGH_WATER, ApplyStream
from txgraph.errors import BadRequest
from txgraph.testing.stub_client import ImmediateReactor

#: Sizes around which a batching hand-over would change behaviour.
BATCH = 256 << 10


class Reader(threading.Thread):
    """
    Reads the stream to its end, keeping every piece read() returned.
    """

    def __init__(self, stream: ApplyStream, n: int = -1) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.n = n
        self.pieces: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while piece := self.stream.read(self.n):
                self.pieces.append(piece)
        except BaseException as e:
            self.error = e


def stream() -> tuple[ApplyStream, list[str]]:
    flow: list[str] = []
    s = ApplyStream(
        ImmediateReactor(), lambda: flow.append("pause"), lambda: flow.append("resume")
    )
    return s, flow


def test_many_small_chunks_arrive_whole() -> None:
    """
    A body written as many small chunks (as dockerd sends it) reaches a
    reader thread whole and in order.
    """
    s, _ = stream()
    reader = Reader(s)
    reader.start()
    body = bytes(range(256)) * (4 * BATCH // 256 + 7)
    for i in range(0, len(body), 1000):
        s.write(body[i : i + 1000])
    s.finish()
    reader.join(10)
    assert not reader.is_alive()
    assert reader.error is None
    assert b"".join(reader.pieces) == body


def test_buffered_data_is_read_without_waiting() -> None:
    """
    What is already buffered is returned at once, however little.
    """
    s, _ = stream()
    s.write(b"0123456789")
    assert s.read(4) == b"0123"
    assert s.read(100) == b"456789"


def test_abort_wakes_the_reader() -> None:
    """
    A connection lost mid-body ends the read with an error, after what
    arrived before it.
    """
    s, _ = stream()
    reader = Reader(s, n=1 << 20)
    reader.start()
    s.write(b"x" * 100)
    s.abort(ConnectionError("gone"))
    reader.join(10)
    assert not reader.is_alive()
    assert b"".join(reader.pieces) == b"x" * 100
    assert isinstance(reader.error, BadRequest)


def test_flow_control_still_pauses_and_resumes() -> None:
    """
    Beyond APPLY_HIGH_WATER the connection is paused, and resumed once the
    reader drains the buffer.
    """
    s, flow = stream()
    chunk = b"y" * (64 << 10)
    for _ in range(APPLY_HIGH_WATER // len(chunk) + 1):
        s.write(chunk)
    assert flow == ["pause"]
    s.read()
    assert flow == ["pause", "resume"]


@pytest.mark.parametrize("size", [1, BATCH - 1, BATCH, BATCH + 1])
def test_sizes_read_in_pieces(size: int) -> None:
    """
    Bodies of various sizes, read in pieces smaller than the body, arrive
    whole.
    """
    s, _ = stream()
    reader = Reader(s, n=10_000)
    reader.start()
    body = b"z" * size
    for i in range(0, size, 4096):
        s.write(body[i : i + 4096])
    s.finish()
    reader.join(10)
    assert b"".join(reader.pieces) == body
