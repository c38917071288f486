"""
Tests for the Klein resource, through a stub client: raw HTTP requests,
framed exactly as dockerd frames them (POST, no Content-Type, chunked
ApplyDiff bodies), fed to the real L{PluginSite} over an in-memory
transport.  No socket, no reactor, no threads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from txgraph.api.site import MAX_JSON_BODY
from txgraph.api.streams import ApplyStream
from txgraph.errors import InvalidLayerState, UnknownLayer
from txgraph.model import Change, ChangeKind
from txgraph.testing.stub_client import Client, parse

A = "a" * 64
B = "b" * 64


class FakeBackendRunner:
    """
    Stands in for the backend thread pool: runs inline.
    """

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return succeed(fn(*args))


class FakeDriver:
    """
    Records what the API asks of the driver; answers as configured.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.ready: Deferred[None] = succeed(None)
        self.changes_result = [Change("/etc", ChangeKind.MODIFY), Change("/etc/x", ChangeKind.ADD)]
        self.error: Exception | None = None
        self.backend = FakeBackendRunner()
        self.apply_streams: list[ApplyStream] = []
        self.apply_result: Deferred[int] = Deferred()
        self.diff_data = b""

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error

    async def init(self, home: str, opts: list[str], uid_maps: Any, gid_maps: Any) -> None:
        self._record("init", home, opts, uid_maps, gid_maps)

    async def create(self, layer_id: str, parent: str | None, rw: bool, opt: dict[str, str]) -> None:
        self._record("create", layer_id, parent, rw, opt)

    async def remove(self, layer_id: str) -> None:
        self._record("remove", layer_id)

    async def get(self, layer_id: str) -> str:
        self._record("get", layer_id)
        return f"/mnt/{layer_id}"

    async def put(self, layer_id: str) -> None:
        self._record("put", layer_id)

    def exists(self, layer_id: str) -> bool:
        self._record("exists", layer_id)
        return layer_id == A

    async def metadata(self, layer_id: str) -> dict[str, str]:
        self._record("metadata", layer_id)
        return {"Dir": "/x"}

    async def status(self) -> list[tuple[str, str]]:
        self._record("status")
        return [("Backend", "fake")]

    async def cleanup(self) -> None:
        self._record("cleanup")

    def capabilities(self) -> dict[str, bool]:
        return {"ReproducesExactDiffs": False}

    async def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        self._record("changes", layer_id, parent)
        return self.changes_result

    async def diff_size(self, layer_id: str, parent: str | None) -> int:
        self._record("diff_size", layer_id, parent)
        return 42

    async def check_read(self, layer_id: str, parent: str | None) -> None:
        self._record("check_read", layer_id, parent)

    async def diff(self, layer_id: str, parent: str | None, out: Any) -> None:
        self._record("diff", layer_id, parent)
        for i in range(0, len(self.diff_data), 1000):
            out.write(self.diff_data[i : i + 1000])

    async def apply_diff(self, layer_id: str, parent: str | None, stream: ApplyStream) -> int:
        self._record("apply_diff", layer_id, parent)
        if layer_id not in (A, B):
            raise UnknownLayer(f"unknown layer {layer_id}")
        self.apply_streams.append(stream)
        return await self.apply_result


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def client(driver: FakeDriver) -> Client:
    return Client(driver)  # type: ignore[arg-type]


def test_activate(client: Client) -> None:
    """
    Plugin.Activate, with its empty body, says txgraph is a GraphDriver.
    """
    status, headers, body = client.post("Plugin.Activate", None)
    assert status == 200
    assert json.loads(body) == {"Implements": ["GraphDriver"]}
    assert headers["content-type"] == "application/vnd.docker.plugins.v1+json"


@pytest.mark.parametrize(
    "method, request_body, call, reply",
    [
        ("GraphDriver.Init", {"Home": "/var/lib/docker/txgraph", "Opts": None, "UIDMaps": None, "GIDMaps": None},
         ("init", "/var/lib/docker/txgraph", [], None, None), {}),
        ("GraphDriver.Init", {"Home": "/h", "Opts": ["txgraph.overlay.mountopt=x"],
                              "UIDMaps": [{"container_id": 0, "host_id": 200000, "size": 65536}], "GIDMaps": None},
         ("init", "/h", ["txgraph.overlay.mountopt=x"], [{"container_id": 0, "host_id": 200000, "size": 65536}], None), {}),
        ("GraphDriver.Create", {"ID": A}, ("create", A, None, False, {}), {}),
        ("GraphDriver.Create", {"ID": B, "Parent": A}, ("create", B, A, False, {}), {}),
        ("GraphDriver.CreateReadWrite", {"ID": B + "-init", "Parent": A, "StorageOpt": {"size": "1G"}},
         ("create", B + "-init", A, True, {"size": "1G"}), {}),
        ("GraphDriver.Remove", {"ID": A}, ("remove", A), {}),
        ("GraphDriver.Get", {"ID": A}, ("get", A), {"Dir": f"/mnt/{A}"}),
        ("GraphDriver.Put", {"ID": A}, ("put", A), {}),
        ("GraphDriver.Exists", {"ID": A}, ("exists", A), {"Exists": True}),
        ("GraphDriver.Exists", {"ID": B}, ("exists", B), {"Exists": False}),
        ("GraphDriver.GetMetadata", {"ID": A}, ("metadata", A), {"Metadata": {"Dir": "/x"}}),
        ("GraphDriver.Status", {}, ("status",), {"Status": [["Backend", "fake"]]}),
        ("GraphDriver.Cleanup", {}, ("cleanup",), {}),
        ("GraphDriver.Changes", {"ID": B, "Parent": A}, ("changes", B, A),
         {"Changes": [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/x", "Kind": 1}]}),
        ("GraphDriver.DiffSize", {"ID": B, "Parent": A}, ("diff_size", B, A), {"Size": 42}),
        ("GraphDriver.DiffSize", {"ID": B}, ("diff_size", B, None), {"Size": 42}),
    ],
)
def test_endpoints(
    client: Client, driver: FakeDriver, method: str, request_body: dict[str, Any],
    call: tuple[Any, ...], reply: dict[str, Any],
) -> None:
    """
    Each endpoint decodes dockerd's JSON into the driver call and encodes
    the reply in dockerd's shape.
    """
    status, _, body = client.post(method, request_body)
    assert (status, json.loads(body)) == (200, reply)
    assert driver.calls == [call]


@pytest.mark.parametrize(
    "paths",
    [
        [],
        ["/a"],
        ['/q"uote', "/back\\slash", "/tab\tnew\nline", "/ünï/çødé", "/emoji\U0001f600", "/bad\udcff"],
    ],
)
def test_changes_encoded_as_json_dumps(
    client: Client, driver: FakeDriver, paths: list[str]
) -> None:
    """
    Changes answers byte for byte what json.dumps of the list of dicts
    gives (it is encoded without making those dicts): escapes, non-ASCII
    and undecodable names included.
    """
    kinds = [ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE]
    driver.changes_result = [Change(p, kinds[i % 3]) for i, p in enumerate(paths)]
    status, headers, body = client.post("GraphDriver.Changes", {"ID": B, "Parent": A})
    expected = {"Changes": [{"Path": p, "Kind": i % 3} for i, p in enumerate(paths)]}
    assert status == 200
    assert headers["content-type"] == "application/vnd.docker.plugins.v1+json"
    assert body == json.dumps(expected).encode() + b"\n"


def test_capabilities(client: Client) -> None:
    """
    Capabilities is wrapped as dockerd's code (not its docs) expects.
    """
    status, _, body = client.post("GraphDriver.Capabilities", {})
    assert json.loads(body) == {"Capabilities": {"ReproducesExactDiffs": False}}


@pytest.mark.parametrize(
    "method, body, message",
    [
        ("GraphDriver.Get", b"{not json", "malformed JSON"),
        ("GraphDriver.Get", b"[1, 2]", "must be a JSON object"),
        ("GraphDriver.Get", {}, "missing ID"),
        ("GraphDriver.Get", {"ID": 7}, "missing ID"),
        ("GraphDriver.Get", {"ID": "../../etc"}, "invalid ID"),
        ("GraphDriver.Get", {"ID": "a" * 256}, "more than a file name may be (255)"),
        ("GraphDriver.Get", {"ID": "."}, "invalid ID"),
        ("GraphDriver.Get", {"ID": "a" * 64 + "/x"}, "a path separator"),
        ("GraphDriver.Get", {"ID": "Base@snap"}, "RBD's snapshot separator"),
        ("GraphDriver.Get", {"ID": "a\nb"}, "whitespace"),
        ("GraphDriver.Get", {"ID": "a\x00b"}, "control"),
        ("GraphDriver.Get", {"ID": "a\u202eb"}, "formatting"),
        ("GraphDriver.Get", {"ID": "a&parent=b"}, "ApplyDiff's query"),
        ("GraphDriver.Get", {"ID": A, "MountLabel": 3}, "invalid MountLabel"),
        ("GraphDriver.Create", {"ID": A, "Parent": ".."}, "invalid Parent"),
        ("GraphDriver.CreateReadWrite", {"ID": A, "StorageOpt": {"size": 1}}, "invalid StorageOpt"),
        ("GraphDriver.CreateReadWrite", {"ID": A, "StorageOpt": ["size=1"]}, "invalid StorageOpt"),
        ("GraphDriver.Init", {"Home": "/h", "Opts": "x=y"}, "invalid Opts"),
        ("GraphDriver.Init", {"Home": 5}, "invalid Home"),
        ("GraphDriver.Init", {"UIDMaps": [{"container_id": 0, "host_id": -1, "size": 1}]}, "UIDMaps[0].host_id"),
        ("GraphDriver.Init", {"GIDMaps": [{"container_id": 0, "host_id": 1}]}, "GIDMaps[0].size"),
        ("GraphDriver.Changes", {"ID": A, "Parent": "no/pe"}, "invalid Parent"),
    ],
)
def test_bad_requests(
    client: Client, driver: FakeDriver, method: str, body: Any, message: str
) -> None:
    """
    A malformed request is a 400 whose Err names what was wrong, and the
    driver is not called.
    """
    status, _, reply = client.post(method, body)
    assert status == 400
    assert message in json.loads(reply)["Err"]
    assert driver.calls == []


def test_body_too_large(client: Client, driver: FakeDriver) -> None:
    """
    A JSON body over the limit is refused without being kept.
    """
    status, _, reply = client.post("GraphDriver.Get", b" " * (MAX_JSON_BODY + 1))
    assert status == 400 and "too large" in json.loads(reply)["Err"]


@pytest.mark.parametrize(
    "error, status",
    [
        (UnknownLayer(f"unknown layer {A}"), 404),
        (InvalidLayerState("Put without Get"), 409),
        (RuntimeError("kaboom"), 500),
    ],
)
def test_driver_errors(client: Client, driver: FakeDriver, error: Exception, status: int) -> None:
    """
    Driver errors become {"Err": ...} with their status; unexpected ones
    are 500 internal errors naming the exception.
    """
    driver.error = error
    code, _, reply = client.post("GraphDriver.Put", {"ID": A})
    assert code == status
    assert str(error) in json.loads(reply)["Err"]


def test_requests_wait_until_ready(client: Client, driver: FakeDriver) -> None:
    """
    Requests that arrive while state is being restored wait for it; the
    handshake does not.
    """
    driver.ready = Deferred()
    protocol, transport = client.connect()
    body = json.dumps({"ID": A}).encode()
    protocol.dataReceived(
        b"POST /GraphDriver.Get HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert transport.value() == b"" and driver.calls == []
    assert client.post("Plugin.Activate", None)[0] == 200
    driver.ready.callback(None)
    assert parse(transport.value())[0] == 200
    assert driver.calls == [("get", A)]


def _chunked_apply(protocol: Any, query: str, chunks: list[bytes], finish: bool = True) -> None:
    protocol.dataReceived(
        f"POST /GraphDriver.ApplyDiff?{query} HTTP/1.1\r\nHost: \r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    for chunk in chunks:
        protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    if finish:
        protocol.dataReceived(b"0\r\n\r\n")


def test_apply_diff_streams(client: Client, driver: FakeDriver) -> None:
    """
    ApplyDiff starts as soon as the headers are in and reads the body as it
    arrives; the answer is the size the driver returns.
    """
    protocol, transport = client.connect()
    _chunked_apply(protocol, f"id={B}&parent={A}", [b"x" * 512], finish=False)
    assert driver.calls == [("apply_diff", B, A)]
    stream = driver.apply_streams[0]
    assert stream.read(100) == b"x" * 100
    protocol.dataReceived(b"%x\r\n%s\r\n" % (90, b"y" * 90))
    protocol.dataReceived(b"0\r\n\r\n")
    assert stream.read(-1) == b"x" * 412 + b"y" * 90
    assert stream.read(10) == b""
    assert transport.value() == b""
    driver.apply_result.callback(502)
    status, _, body = parse(transport.value())
    assert (status, json.loads(body)) == (200, {"Size": 502})


def test_apply_diff_base_layer(client: Client, driver: FakeDriver) -> None:
    """
    dockerd sends parent= empty for a base layer.
    """
    protocol, transport = client.connect()
    _chunked_apply(protocol, f"id={A}&parent=", [b"tar"])
    assert driver.calls == [("apply_diff", A, None)]


def test_apply_diff_pauses_when_behind(client: Client, driver: FakeDriver) -> None:
    """
    When the extracting side falls behind, the connection stops being
    read, and resumes once it catches up.
    """
    protocol, transport = client.connect()
    chunk = b"z" * (1 << 20)
    _chunked_apply(protocol, f"id={A}&parent=", [chunk] * 9, finish=False)
    assert transport.producerState == "paused"
    stream = driver.apply_streams[0]
    while stream.read(1 << 20):
        if transport.producerState == "producing":
            break
    assert transport.producerState == "producing"


@pytest.mark.parametrize(
    "query, message",
    [
        ("id=../x&parent=", "invalid id"),
        ("parent=", "missing id"),
        (f"id={B}&parent=z%2Fz", "invalid parent"),
        # Escaped bytes that are not UTF-8 are refused, not replaced by
        # U+FFFD (which would make them another, valid ID).
        ("id=%ED%A0%80&parent=", "not valid UTF-8"),
        (f"id={B}&parent=%FF", "invalid parent"),
    ],
)
def test_apply_diff_bad_query(client: Client, driver: FakeDriver, query: str, message: str) -> None:
    """
    A bad ApplyDiff query is refused, its body drained, and the driver not
    called.
    """
    protocol, transport = client.connect()
    _chunked_apply(protocol, query, [b"a" * 1000, b"b" * 1000])
    status, _, body = parse(transport.value())
    assert status == 400 and message in json.loads(body)["Err"]
    assert driver.calls == []


def test_apply_diff_unknown_layer(client: Client, driver: FakeDriver) -> None:
    """
    ApplyDiff to a layer that was never created is a 404.
    """
    protocol, transport = client.connect()
    _chunked_apply(protocol, f"id={'c' * 64}&parent=", [b"data"])
    status, _, body = parse(transport.value())
    assert status == 404 and "unknown layer" in json.loads(body)["Err"]


def test_apply_diff_connection_lost(client: Client, driver: FakeDriver) -> None:
    """
    A body cut off by a lost connection fails the read with a clear error.
    """
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    protocol, transport = client.connect()
    _chunked_apply(protocol, f"id={A}&parent=", [b"a" * 10], finish=False)
    stream = driver.apply_streams[0]
    assert stream.read(10) == b"a" * 10
    protocol.connectionLost(Failure(ConnectionLost()))
    with pytest.raises(Exception, match="cut off after 10 bytes"):
        stream.read(10)


def test_apply_diff_failure_after_connection_lost_is_consumed(
    client: Client, driver: FakeDriver
) -> None:
    """
    An ApplyDiff that fails after its connection is gone (dockerd gave up)
    has nobody to answer: its failure is logged once, never left as an
    "Unhandled error in Deferred".
    """
    import gc

    from twisted.internet.error import ConnectionLost
    from twisted.logger import formatEvent, globalLogPublisher
    from twisted.python.failure import Failure

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        protocol, _ = client.connect()
        _chunked_apply(protocol, f"id={'c' * 64}&parent=", [b"data"], finish=False)
        protocol.connectionLost(Failure(ConnectionLost()))
        del protocol
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) + str(e.get("log_failure", "")) for e in events]
    assert not [t for t in texts if "Unhandled error" in t], texts
    assert [t for t in texts if "unknown layer" in t], texts


def test_diff_streams_tar(client: Client, driver: FakeDriver) -> None:
    """
    Diff answers 200 with the tar the driver produced, streamed.
    """
    driver.diff_data = bytes(range(256)) * 4000
    status, headers, body = client.post("GraphDriver.Diff", {"ID": B, "Parent": A})
    assert status == 200
    assert headers["content-type"] == "application/x-tar"
    assert body == driver.diff_data
    assert driver.calls == [("check_read", B, A), ("diff", B, A)]


def test_diff_error_is_not_200(client: Client, driver: FakeDriver) -> None:
    """
    A Diff that cannot start answers with a non-200 JSON error, never a
    200 that dockerd would take for a tar.
    """
    driver.error = UnknownLayer(f"unknown layer {B}")
    status, _, body = client.post("GraphDriver.Diff", {"ID": B})
    assert status == 404 and "unknown layer" in json.loads(body)["Err"]
