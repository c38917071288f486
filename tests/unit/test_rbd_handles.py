"""
The rbd backend's handles opened ahead of a commit (issue 18), with a fake
opener in place of librbd: a commit takes the handle instead of opening
the image; every handle is closed exactly once, when taken and used, when
its image is removed, after the idle limit, when too many are held, and
at stop.  The integration tests check the same against a real cluster
(tests/integration/test_rbd_backend.py: the snapshot through a held
handle sees every write rbd-fuse made).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from txgraph.backends.rbd.handles import Handles


class FakeImage:
    """An open image: counts its closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class Opener:
    """Opens fake images; C{gate} holds opens back; C{failing} names fail."""

    def __init__(self) -> None:
        self.images: list[FakeImage] = []
        self.gate = threading.Event()
        self.gate.set()
        self.failing: set[str] = set()

    def __call__(self, name: str) -> FakeImage:
        self.gate.wait(10)
        if name in self.failing:
            raise OSError(f"cannot open {name}")
        image = FakeImage(name)
        self.images.append(image)
        return image


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def opener() -> Opener:
    return Opener()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def handles(opener: Opener, clock: Clock) -> Iterator[Handles]:
    h = Handles(opener, idle=60.0, limit=3, clock=clock)
    h.start()
    yield h
    h.close_all()


def test_take_gives_the_handle_opened_ahead(handles: Handles, opener: Opener) -> None:
    """A commit takes the one handle opened for its image (waiting for the
    open); the caller closes it; nothing is held afterwards."""
    opener.gate.clear()
    handles.open_soon("a")
    handles.open_soon("a")
    assert handles.held() == ["a"]
    threading.Timer(0.05, opener.gate.set).start()
    image = handles.take("a")
    assert isinstance(image, FakeImage) and image.name == "a"
    assert len(opener.images) == 1 and image.closes == 0
    assert handles.held() == [] and handles.take("a") is None
    assert (handles.opened, handles.taken) == (1, 1)


def test_take_without_a_handle_is_none(handles: Handles) -> None:
    assert handles.take("never") is None
    assert handles.taken == 0


def test_failed_open_is_taken_as_none(handles: Handles, opener: Opener) -> None:
    """A failed open costs the commit nothing but its own open."""
    opener.failing.add("bad")
    handles.open_soon("bad")
    assert handles.take("bad") is None
    handles.open_soon("bad")
    handles.drop("bad")
    assert handles.held() == []


def test_drop_closes_before_removal(handles: Handles, opener: Opener) -> None:
    """Dropping waits for an open in progress and closes its handle, so
    nothing watches the image when the caller removes it."""
    opener.gate.clear()
    handles.open_soon("a")
    threading.Timer(0.05, opener.gate.set).start()
    handles.drop("a")
    assert [i.closes for i in opener.images] == [1]
    assert handles.take("a") is None
    handles.drop("a")
    assert [i.closes for i in opener.images] == [1]


def test_idle_handles_are_closed(handles: Handles, opener: Opener, clock: Clock) -> None:
    """A handle unused for the idle limit is closed; a younger one stays."""
    handles.open_soon("old")
    clock.now += 30
    handles.open_soon("young")
    assert handles.ready("old", 10) and handles.ready("young", 10)
    assert handles.sweep() == 100.0 + 60.0
    assert handles.held() == ["old", "young"]
    clock.now += 30
    assert handles.sweep() == 130.0 + 60.0
    assert handles.held() == ["young"]
    assert {i.name: i.closes for i in opener.images} == {"old": 1, "young": 0}
    clock.now += 30
    assert handles.sweep() is None
    assert [i.closes for i in opener.images] == [1, 1]


def test_the_expiry_thread_closes_idle_handles(opener: Opener) -> None:
    """Without any call, the backend's own thread closes an idle handle."""
    h = Handles(opener, idle=0.05, limit=3)
    h.start()
    try:
        h.open_soon("a")
        for _ in range(200):
            if opener.images and opener.images[0].closes:
                break
            threading.Event().wait(0.01)
        assert h.held() == [] and [i.closes for i in opener.images] == [1]
    finally:
        h.close_all()


def test_at_most_limit_handles(handles: Handles, opener: Opener) -> None:
    """The oldest handle is closed to make room for a new one."""
    for name in ("a", "b", "c", "d"):
        handles.open_soon(name)
    assert handles.held() == ["b", "c", "d"]
    assert all(handles.ready(name, 10) for name in ("b", "c", "d"))
    assert {i.name: i.closes for i in opener.images} == {"a": 1, "b": 0, "c": 0, "d": 0}


def test_close_all_closes_everything_and_stops(opener: Opener) -> None:
    """At stop every handle is closed, the opens in progress included, and
    no new one is opened."""
    h = Handles(opener, limit=3)
    h.start()
    opener.gate.clear()
    h.open_soon("a")
    h.open_soon("b")
    threading.Timer(0.05, opener.gate.set).start()
    h.close_all()
    assert sorted((i.name, i.closes) for i in opener.images) == [("a", 1), ("b", 1)]
    h.open_soon("c")
    assert h.held() == [] and len(opener.images) == 2


def test_not_started_opens_nothing(opener: Opener) -> None:
    """A backend that is not started (or a cluster never connected) holds
    no handles."""
    h = Handles(opener)
    h.open_soon("a")
    assert h.held() == [] and h.take("a") is None
    h.close_all()
