"""
Property tests of request validation: hypothesis sends thousands of
malformed and out-of-order plugin calls, framed as dockerd frames them
(the stub client of test_api.py), to the real API, driver, layer
machines, SQLite store and overlay backend, all in this process.  There is
no reactor and there are no threads: backend work is queued and run once
the whole request is in, as a backend thread would run it.

Whatever arrives, txgraph keeps answering, every answer is well-formed
(JSON with a non-empty C{Err} and a 4xx status for a refusal, the expected
shape for a success), an error names the field or the problem, and a
refused call changes nothing: neither the persisted rows and config, nor
the layers on disk, nor the mounts.  The in-memory registry always agrees
with the database.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import string
import tarfile
import tempfile
import unicodedata
from collections import Counter, deque
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_layers import InlineThread
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txgraph import mounts
from txgraph.api.site import MAX_JSON_BODY
from txgraph.backends import Backend
from txgraph.backends.overlay import OverlayBackend
from txgraph.backends.threaded import AsyncBackend
from txgraph.driver import Driver
from txgraph.store import Store
from txgraph.testing.queued import QueuedCalls
from txgraph.testing.stub_client import Client, ImmediateReactor, parse
from txgraph.testing.tars import files_tar

#: A handful of IDs, so that calls collide: parents, children, -init layers.
POOL = ["a" * 64, "b" * 64, "c" * 64 + "-init", "0" * 64]
#: Characters no ID may hold (path, RBD snapshot and query separators).
REFUSED_IN_IDS = set("/@%&+#")


def valid_id(value: str) -> bool:
    """
    The oracle for a valid ID, written independently of txgraph's own: a
    name of at most 255 UTF-8 bytes, safe as one file name, without
    whitespace, control or formatting characters, nor /, @, %, &, + or #.
    """
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return (
        0 < size <= 255
        and value not in (".", "..")
        and not any(
            c in REFUSED_IN_IDS or c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
            for c in value
        )
    )

JSON_METHODS = [
    "Plugin.Activate",
    "GraphDriver.Init",
    "GraphDriver.Capabilities",
    "GraphDriver.Status",
    "GraphDriver.Create",
    "GraphDriver.CreateReadWrite",
    "GraphDriver.Remove",
    "GraphDriver.Get",
    "GraphDriver.Put",
    "GraphDriver.Exists",
    "GraphDriver.GetMetadata",
    "GraphDriver.Cleanup",
    "GraphDriver.Changes",
    "GraphDriver.DiffSize",
    "GraphDriver.Diff",
]
#: Methods that take an ID, and the other fields each reads.
ID_METHODS = {
    "GraphDriver.Create": ("Parent", "MountLabel", "StorageOpt"),
    "GraphDriver.CreateReadWrite": ("Parent", "MountLabel", "StorageOpt"),
    "GraphDriver.Remove": (),
    "GraphDriver.Get": ("MountLabel",),
    "GraphDriver.Put": (),
    "GraphDriver.Exists": (),
    "GraphDriver.GetMetadata": (),
    "GraphDriver.Changes": ("Parent",),
    "GraphDriver.DiffSize": ("Parent",),
    "GraphDriver.Diff": ("Parent",),
}

#: What the whole run saw, by (method, status, reason): the coverage check.
SEEN: Counter[tuple[str, int, str]] = Counter()


# -- the daemon, in-process ----------------------------------------------------


class QueuedBackend(QueuedCalls, AsyncBackend):
    """
    The backend's thread-pool adapter, minus the threads: each call is
    queued and runs when L{drain} is called, after the request is in (an
    ApplyDiff reads its body as a backend thread would).
    """

    def __init__(self, backend: Backend) -> None:
        QueuedCalls.__init__(self)
        self.sync = backend


class Daemon:
    """
    txgraph in this process: the real API over the stub client, the real
    driver, registry and store, and the real overlay backend in a
    temporary state directory.
    """

    def __init__(self) -> None:
        # tmpfs when there is one: the store fsyncs every commit.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.state_dir = tempfile.mkdtemp(prefix="txgraph-validation-", dir=shm)
        self.store = Store(os.path.join(self.state_dir, "txgraph.db"), InlineThread())  # type: ignore[arg-type]
        self.store.open_thd()
        backend = OverlayBackend(self.state_dir, {"mountopt": ""})
        backend.start()
        self.driver = Driver(ImmediateReactor(), self.store, backend, None, {}, self.state_dir)  # type: ignore[arg-type]
        self.backend = QueuedBackend(backend)
        self.driver.backend = self.backend
        self.driver.registry.backend = self.backend
        started = ensureDeferred(self.driver.start())
        self.backend.drain()
        assert started.called
        self.client = Client(self.driver)  # type: ignore[arg-type]

    def close(self) -> None:
        for point in sorted(mounts.mounted_under(self.state_dir), key=len, reverse=True):
            mounts.unmount(point)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def request(
        self,
        method: str,
        body: bytes,
        *,
        verb: str = "POST",
        query: str = "",
        chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """
        One call on a fresh connection, framed as dockerd frames it; the
        backend work it queued is run; the complete answer is returned.
        """
        protocol, transport = unix_connection(self.client)
        head = (
            f"{verb} /{method}{'?' + query if query else ''} HTTP/1.1\r\nHost: \r\n"
            "Accept: application/vnd.docker.plugins.v1.2+json\r\n"
            "User-Agent: Go-http-client/1.1\r\n"
        ).encode()
        if chunked:
            data = head + b"Transfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 4096):
                chunk = body[i : i + 4096]
                data += b"%x\r\n%s\r\n" % (len(chunk), chunk)
            data += b"0\r\n\r\n"
        else:
            data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        protocol.dataReceived(data)
        self.backend.drain()
        raw = transport.value()
        protocol.connectionLost(Failure(ConnectionDone()))
        assert raw, f"no answer to {method}"
        status, headers, payload = parse(raw)
        if headers.get("transfer-encoding") == "chunked":
            assert raw.endswith(b"0\r\n\r\n"), f"{method}: the answer never ended"
        return status, headers, payload

    def snapshot(self) -> tuple[Any, ...]:
        """
        Everything persisted: rows, config, layer directories and their
        files, and mounts.
        """
        rows = sorted((sorted(vars(r).items()) for r in self.store.load_layers_thd()), key=repr)
        config = sorted(self.store.get_config_thd().items(), key=repr)
        root = os.path.join(self.state_dir, "overlay")
        disk = []
        for name in sorted(os.listdir(root)):
            files = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name, "diff")):
                dirnames.sort()
                for f in sorted(filenames):
                    st_ = os.lstat(os.path.join(dirpath, f))
                    files.append((os.path.relpath(os.path.join(dirpath, f), root), st_.st_size))
            disk.append((name, tuple(files)))
        return rows, config, disk, sorted(mounts.mounted_under(self.state_dir))

    def registry_rows(self) -> list[Any]:
        return sorted((sorted(vars(r).items()) for r in self.driver.registry.rows()), key=repr)


def unix_connection(client: Client) -> tuple[Any, StringTransport]:
    """
    A connection as on txgraph's socket: both ends are UNIX addresses.
    """
    protocol = client.site.buildProtocol(None)
    transport = StringTransport(
        hostAddress=UNIXAddress(b"/run/docker/plugins/txgraph.sock"), peerAddress=UNIXAddress(None)
    )
    protocol.makeConnection(transport)
    return protocol, transport


def _json(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


GOOD_TAR = files_tar({"etc/hostname": b"txgraph\n", "bin/sh": b"#!" + b"x" * 3000})
TARS = {
    "good": GOOD_TAR,
    "empty": b"",
    "end-only": bytes(1024),
    "truncated": GOOD_TAR[:1500],
    "garbage": b"this is not a tar at all" * 40,
    "escape": files_tar({"../../../etc/passwd": b"pwned"}),
}


# -- strategies -------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _not_an_id(value: Any) -> bool:
    return not (isinstance(value, str) and valid_id(value))


#: Strings that look like IDs, and are not.
odd_id_strings = st.one_of(
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=20),
              st.sampled_from(sorted(REFUSED_IN_IDS) + [" ", "\t", "\n", "\0", "\x7f", "\x85",
                                                        "\u2028", "\u202e", "\ud800"]),
              st.text(max_size=20)),
    st.text(alphabet=string.hexdigits, min_size=62, max_size=66),
    st.builds(lambda i, suffix: POOL[i % 4][:64] + suffix, st.integers(0, 3),
              st.sampled_from(["\n", "\r\n", "\0", "/..", "-init\n", "-init-init", "-INIT", " ", "/"])),
    st.sampled_from([
        "../../etc", "/", ".", "..", "a" * 256, "a" * 10_000, "\u00e9" * 128,
        "\ud800" * 64, "a b", "", "a@b", "x/y",
    ]),
).filter(_not_an_id)
#: Values an ID field must refuse: wrong types and odd strings.
bad_ids = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), json_scalars, max_size=2), odd_id_strings,
)
#: A non-string, non-null value (for MountLabel, Home).
not_strings = json_values.filter(lambda v: v is not None and not isinstance(v, str))
bad_maps = st.one_of(
    json_values.filter(lambda v: v is not None and not isinstance(v, list)),
    st.lists(json_values.filter(lambda v: not isinstance(v, dict)), min_size=1, max_size=3),
    st.lists(
        st.fixed_dictionaries(
            {"container_id": json_values, "host_id": json_values, "size": json_values}
        ).filter(
            lambda m: not all(type(v) is int and v >= 0 for v in m.values()) or m["size"] == 0
        ),
        min_size=1,
        max_size=2,
    ),
)
#: (field, bad value, what the error must mention) for each kind of field.
bad_fields: dict[str, st.SearchStrategy[tuple[Any, str]]] = {
    "ID": bad_ids.map(lambda v: (v, "ID")),
    "Parent": bad_ids.filter(lambda v: v not in (None, "")).map(lambda v: (v, "Parent")),
    "MountLabel": not_strings.map(lambda v: (v, "MountLabel")),
    "StorageOpt": st.one_of(
        json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
        st.dictionaries(st.text(max_size=5), not_strings, min_size=1, max_size=3),
    ).map(lambda v: (v, "StorageOpt")),
}
init_bad_fields: dict[str, st.SearchStrategy[tuple[Any, str]]] = {
    "Home": not_strings.map(lambda v: (v, "Home")),
    "Opts": st.one_of(
        json_values.filter(lambda v: v is not None and not isinstance(v, list)),
        st.lists(not_strings, min_size=1, max_size=3),
    ).map(lambda v: (v, "Opts")),
    "UIDMaps": bad_maps.map(lambda v: (v, "UIDMaps")),
    "GIDMaps": bad_maps.map(lambda v: (v, "GIDMaps")),
}
#: Storage options Init must refuse, and the key the error must name.
bad_opts = st.sampled_from([
    (["size=5G"], "size"),
    (["overlay2.size=1G"], "overlay2.size"),
    (["txgraph.bogus=1"], "txgraph.bogus"),
    (["txgraph.overlay.nope=1"], "txgraph.overlay.nope"),
    (["txgraph.overlay.mountopt=upperdir=/etc"], "upperdir"),
    (["txgraph.backend=rbd"], "txgraph.backend"),
    (["novalue"], "novalue"),
])


# -- the state machine ---------------------------------------------------------------


class ValidationMachine(RuleBasedStateMachine):
    """
    A txgraph that is sent good, bad and out-of-order calls at random.
    """

    def __init__(self) -> None:
        super().__init__()
        self.daemon = Daemon()

    def teardown(self) -> None:
        self.daemon.close()

    # -- checking answers ----------------------------------------------------

    def call(
        self,
        method: str,
        body: bytes,
        *,
        expect_refusal: str | None = None,
        **kw: Any,
    ) -> tuple[int, Any]:
        """
        Send a call; check that the answer is well-formed and, if it is a
        refusal, that nothing persisted changed.  With C{expect_refusal},
        the call must be refused (400, 404 or 405) with a message that
        contains it.
        """
        before = self.daemon.snapshot()
        status, headers, payload = self.daemon.request(method, body, **kw)
        note(f"{kw.get('verb', 'POST')} {method}?{kw.get('query', '')} {body[:200]!r} -> {status} {payload[:300]!r}")
        assert status in (200, 400, 404, 405, 409), (status, payload)
        if status == 200 and method == "GraphDriver.Diff" and kw.get("verb", "POST") == "POST":
            assert headers["content-type"] == "application/x-tar"
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tf:
                tf.getmembers()
            reply: Any = payload
        else:
            assert headers["content-type"] == "application/vnd.docker.plugins.v1+json"
            reply = json.loads(payload)
            assert isinstance(reply, dict)
            if status == 200:
                assert not reply.get("Err")
            else:
                assert isinstance(reply.get("Err"), str) and reply["Err"].strip()
                SEEN[(method, status, _reason(reply["Err"]))] += 1
        if expect_refusal is not None:
            assert status in (400, 404, 405), (status, reply)
            assert expect_refusal in reply["Err"], (expect_refusal, reply["Err"])
        after = self.daemon.snapshot()
        if status != 200:
            if method == "GraphDriver.ApplyDiff" and "layer tar" in reply["Err"]:
                self._check_emptied(before, after, kw["query"])
            else:
                assert after == before, f"refused {method} changed the state: {reply}"
        else:
            SEEN[(method, 200, "")] += 1
        return status, reply

    def _check_emptied(self, before: Any, after: Any, query: str) -> None:
        # A tar refused while it was being applied leaves its layer empty,
        # at rest and uncommitted (docs/architecture.md); nothing else moves.
        layer_id = re.search(r"id=([^&]*)", query).group(1)  # type: ignore[union-attr]
        rows = {dict(r)["id"]: dict(r) for r in after[0]}
        row = rows[layer_id]
        assert (row["state"], row["committed"], row["size"]) == ("created", False, None)
        assert dict(after[2])[layer_id] == ()
        others = lambda snap: [r for r in snap[0] if dict(r)["id"] != layer_id]  # noqa: E731
        assert others(after) == others(before)
        assert after[3] == before[3]

    @invariant()
    def keeps_serving_and_memory_matches_disk(self) -> None:
        assert self.daemon.request("Plugin.Activate", b"")[0] == 200
        assert self.daemon.registry_rows() == sorted(
            (sorted(vars(r).items()) for r in self.daemon.store.load_layers_thd()), key=repr
        )

    # -- well-formed calls, in any order: each kind its own rule, so that ---------
    # -- sequences such as Create, Get, Remove or Create, Create child, -----------
    # -- ApplyDiff parent come up often --------------------------------------------

    @rule(
        rw=st.booleans(),
        layer=st.sampled_from(POOL),
        parent=st.none() | st.sampled_from(POOL),
    )
    def create(self, rw: bool, layer: str, parent: str | None) -> None:
        body = {"ID": layer, **({"Parent": parent} if parent else {})}
        self.call("GraphDriver.CreateReadWrite" if rw else "GraphDriver.Create", _json(body))

    @rule(
        layer=st.sampled_from(POOL),
        parent=st.none() | st.sampled_from(POOL),
        tar=st.sampled_from(sorted(TARS)),
        chunked=st.booleans(),
    )
    def apply_diff(self, layer: str, parent: str | None, tar: str, chunked: bool) -> None:
        own = self.daemon.driver.registry._layers.get(layer)
        if own is not None and parent is None:
            parent = own.row.parent  # mostly the right parent; sometimes not
        query = f"id={layer}&parent={parent or ''}"
        status, reply = self.call("GraphDriver.ApplyDiff", TARS[tar], query=query, chunked=chunked)
        if status == 200:
            assert tar in ("good", "empty", "end-only")
            assert reply == {"Size": 3010 if tar == "good" else 0}

    @rule(layer=st.sampled_from(POOL))
    def get(self, layer: str) -> None:
        status, reply = self.call("GraphDriver.Get", _json({"ID": layer}))
        if status == 200:
            assert os.path.isdir(reply["Dir"]) and reply["Dir"].startswith(self.daemon.state_dir)

    @rule(layer=st.sampled_from(POOL))
    def put(self, layer: str) -> None:
        self.call("GraphDriver.Put", _json({"ID": layer}))

    @rule(layer=st.sampled_from(POOL))
    def remove(self, layer: str) -> None:
        self.call("GraphDriver.Remove", _json({"ID": layer}))

    @rule(
        method=st.sampled_from(["GraphDriver.Exists", "GraphDriver.GetMetadata", "GraphDriver.Status",
                                "GraphDriver.Capabilities", "GraphDriver.Cleanup", "Plugin.Activate"]),
        layer=st.sampled_from(POOL),
    )
    def harmless(self, method: str, layer: str) -> None:
        status, reply = self.call(method, _json({"ID": layer}))
        if method == "GraphDriver.Exists":
            assert reply == {"Exists": layer in self.daemon.driver.registry}
        elif method != "GraphDriver.GetMetadata":
            assert status == 200

    @rule(
        method=st.sampled_from(["GraphDriver.Changes", "GraphDriver.DiffSize", "GraphDriver.Diff"]),
        layer=st.sampled_from(POOL),
        parent=st.none() | st.sampled_from(POOL),
    )
    def read(self, method: str, layer: str, parent: str | None) -> None:
        status, reply = self.call(method, _json({"ID": layer, "Parent": parent or ""}))
        if status == 200 and method == "GraphDriver.DiffSize":
            assert isinstance(reply["Size"], int) and reply["Size"] >= 0

    @rule(maps=st.sampled_from([None, [{"container_id": 0, "host_id": 100000, "size": 65536}]]))
    def init(self, maps: Any) -> None:
        status, reply = self.call("GraphDriver.Init", _json(
            {"Home": "/var/lib/docker/txgraph", "Opts": None, "UIDMaps": maps, "GIDMaps": maps}
        ))
        if status != 200:
            assert "while layers exist" in reply["Err"]

    @rule(go=st.integers(0, 4))
    def out_of_order(self, go: int) -> None:
        """
        The out-of-order calls the issue names, in a row, on two layers of
        their own (outside the pool), whatever the pool's state.  (Only one
        draw in five runs it: it is 27 calls.)
        """
        if go:
            return
        parent, child, unknown = "e" * 64, "f" * 64 + "-init", "9" * 64

        def expect(method: str, body: Any, status: int, message: str, **kw: Any) -> None:
            code, reply = self.call(method, body if isinstance(body, bytes) else _json(body), **kw)
            assert code == status and message in str(reply), (method, code, reply)

        expect("GraphDriver.Create", {"ID": parent}, 200, "")
        # With a layer made, Init keeps the ID maps it has and refuses the
        # other ones (which is which depends on the run's earlier Inits).
        answers = sorted((
            self.call("GraphDriver.Init", _json(
                {"Home": "/var/lib/docker/txgraph", "Opts": None, "UIDMaps": maps, "GIDMaps": maps}
            ))
            for maps in (None, [{"container_id": 0, "host_id": 100000, "size": 65536}])
        ), key=lambda answer: answer[0])
        assert [code for code, _ in answers] == [200, 400], answers
        assert "cannot change UIDMaps/GIDMaps" in answers[1][1]["Err"], answers
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 200, "3010", query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.Put", {"ID": parent}, 409, "Put without Get")
        expect("GraphDriver.ApplyDiff", TARS["escape"], 400, "leads outside the layer",
               query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.ApplyDiff", TARS["truncated"], 400, "layer tar",
               query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 200, "3010", query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.CreateReadWrite", {"ID": child, "Parent": parent}, 200, "")
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 409, "other layers are made from it",
               query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.Remove", {"ID": parent}, 409, "it is the parent of")
        expect("GraphDriver.Get", {"ID": child}, 200, "Dir")
        expect("GraphDriver.Remove", {"ID": child}, 409, "it is mounted")
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 409, "it is mounted",
               query=f"id={child}&parent={parent}", chunked=True)
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 400, "is not the parent of",
               query=f"id={child}&parent=", chunked=True)
        expect("GraphDriver.Diff", {"ID": parent}, 200, "etc/hostname")
        expect("GraphDriver.DiffSize", {"ID": parent}, 200, "3010")
        expect("GraphDriver.Changes", {"ID": child, "Parent": parent}, 200, "Changes")
        expect("GraphDriver.Diff", {"ID": unknown}, 404, "unknown layer")
        expect("GraphDriver.Diff", {"ID": child, "Parent": unknown}, 404, "unknown layer")
        expect("GraphDriver.Changes", {"ID": parent, "Parent": child}, 400, "not an ancestor")
        expect("GraphDriver.ApplyDiff", GOOD_TAR, 404, "unknown layer", query=f"id={unknown}&parent=",
               chunked=True)
        expect("GraphDriver.Create", {"ID": child, "Parent": unknown}, 409, "already exists")
        expect("GraphDriver.Create", {"ID": unknown, "Parent": unknown}, 404, "does not exist")
        # Malformed IDs, whatever the random bodies drew.
        expect("GraphDriver.Create", {"ID": unknown, "Parent": "../" + parent}, 400, "invalid Parent")
        expect("GraphDriver.Get", {"ID": parent + "/.."}, 400, "invalid ID")
        expect("GraphDriver.Put", {"ID": child}, 200, "")
        expect("GraphDriver.Put", {"ID": child}, 409, "Put without Get")
        expect("GraphDriver.Remove", {"ID": child}, 200, "")
        # Committed by its child, childless again: a new ApplyDiff is taken.
        expect("GraphDriver.ApplyDiff", TARS["end-only"], 200, "Size",
               query=f"id={parent}&parent=", chunked=True)
        expect("GraphDriver.Remove", {"ID": parent}, 200, "")
        expect("GraphDriver.Remove", {"ID": parent}, 200, "")

    # -- malformed calls: a wrong field, a wrong body, a wrong route -------------------

    @rule(data=st.data())
    def bad_field(self, data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(sorted(ID_METHODS) + ["GraphDriver.Init"]), label="method")
        if method == "GraphDriver.Init":
            body: dict[str, Any] = {"Home": "/var/lib/docker/x", "Opts": None, "UIDMaps": None, "GIDMaps": None}
            if data.draw(st.booleans(), label="bad option"):
                body["Opts"], expected = data.draw(bad_opts, label="opts")
            else:
                field = data.draw(st.sampled_from(sorted(init_bad_fields)), label="field")
                body[field], expected = data.draw(init_bad_fields[field], label="value")
        else:
            field = data.draw(st.sampled_from(("ID",) + ID_METHODS[method]), label="field")
            value, expected = data.draw(bad_fields[field], label="value")
            body = {"ID": data.draw(st.sampled_from(POOL), label="ID"), field: value}
        self.call(method, _json(body), expect_refusal=expected)

    @rule(data=st.data(), method=st.sampled_from(JSON_METHODS))
    def bad_body(self, data: st.DataObject, method: str) -> None:
        kind = data.draw(st.sampled_from(["json", "fields", "bytes", "odd"]), label="kind")
        if kind == "json":
            body = data.draw(json_values, label="body")
            status, reply = self.call(method, _json(body))
            if not isinstance(body, (dict, type(None))):
                assert status == 400 and "must be a JSON object" in reply["Err"]
        elif kind == "fields":
            self.call(method, _json(data.draw(random_bodies, label="body")))
        elif kind == "bytes":
            self.call(method, data.draw(st.binary(max_size=300), label="body"))
        else:
            case = data.draw(st.sampled_from(sorted(ODD_BODIES)), label="case")
            raw, expected, chunked = ODD_BODIES[case]
            self.call(method, raw, expect_refusal=expected, chunked=chunked)

    @rule(data=st.data())
    def bad_route(self, data: st.DataObject) -> None:
        if data.draw(st.booleans(), label="ApplyDiff query"):
            query = data.draw(bad_queries, label="query")
            status, reply = self.call("GraphDriver.ApplyDiff", GOOD_TAR, query=query, chunked=True)
            assert status == 400 and re.search(r"\b(id|parent)\b", reply["Err"]), reply
            return
        verb = data.draw(st.sampled_from(["GET", "PUT", "DELETE", "POST"]), label="verb")
        method = data.draw(st.sampled_from(
            JSON_METHODS + ["GraphDriver.ApplyDiff", "GraphDriver.Nope", "Plugin.Nope", "GraphDriver.Get/x", "x"]
        ), label="method")
        known = method in JSON_METHODS or method == "GraphDriver.ApplyDiff"
        assume(not (verb == "POST" and known))
        status, reply = self.call(method, _json({"ID": POOL[0]}), verb=verb)
        assert status == (405 if known else 404), (status, reply)
        assert ("POST" in reply["Err"]) if known else ("unknown plugin call" in reply["Err"])


random_bodies = st.fixed_dictionaries({}, optional={
    "ID": json_values | st.sampled_from(POOL), "Parent": json_values | st.sampled_from(POOL),
    "MountLabel": json_values, "StorageOpt": json_values, "Home": json_values,
    "Opts": json_values, "UIDMaps": json_values, "GIDMaps": json_values,
})
#: Bodies refused before any field is read: (body, what the error says, chunked).
ODD_BODIES = {
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply", False),
    "huge-int": (b'{"ID": ' + b"9" * 5000 + b"}", "malformed JSON", False),
    "chunked": (_json({"ID": POOL[0]}), "Content-Length", True),
    "too-large": (b" " * (MAX_JSON_BODY + 1), "too large", False),
    "utf16": (json.dumps([POOL[0]]).encode("utf-16"), "JSON object", False),
    "bad-utf8": (b'{"ID": "\xff\xfe"}', "malformed JSON", False),
    "trailing": (_json({"ID": POOL[0]}) + b"{}", "malformed JSON", False),
}
bad_queries = st.one_of(
    st.sampled_from(["", "parent=", "id=", "id=../x&parent=", f"id={POOL[0]}&parent=z%2Fz",
                     f"id={POOL[0]}%0A&parent=", f"id={POOL[0]}%00&parent=", f"id={POOL[0]}%40snap",
                     f"parent={POOL[0]}"]),
    odd_id_strings.map(lambda s: "id=" + quote(s.encode("utf-8", "surrogatepass"), safe="")),
    odd_id_strings.filter(bool).map(
        lambda s: f"id={POOL[0]}&parent=" + quote(s.encode("utf-8", "surrogatepass"), safe="")
    ),
)


def _reason(message: str) -> str:
    """
    A message without its IDs and numbers, to count kinds of refusal.
    """
    message = re.sub(r"[0-9a-f]{64}(-init)?", "<id>", message)
    message = re.sub(r"'[^']*'", "'…'", message)
    return re.sub(r"\d+", "N", message)[:90]


TestValidation = ValidationMachine.TestCase
TestValidation.settings = settings(
    max_examples=int(os.environ.get("TXGRAPH_VALIDATION_EXAMPLES", "100")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def test_coverage_of_the_run() -> None:
    """
    The run above (same module, so it ran first) sent thousands of calls
    and reached each out-of-order case the issue names.
    """
    if not SEEN:
        pytest.skip("the property test did not run in this session")
    total = sum(SEEN.values())
    reasons = {f"{m} {s} {r}" for (m, s, r) in SEEN}
    print(f"\n{total} checked calls, {len(reasons)} kinds of answer")
    assert total >= 3000
    for needle in [
        "GraphDriver.Put 409 layer <id>: Put without Get",
        "GraphDriver.Remove 409 layer <id>: cannot remove: it is mounted",
        "GraphDriver.Remove 409 cannot remove layer <id>: it is the parent of",
        "GraphDriver.ApplyDiff 409 cannot ApplyDiff to layer <id>: other layers are made from it",
        "GraphDriver.ApplyDiff 409 layer <id>: cannot ApplyDiff: it is mounted",
        "GraphDriver.ApplyDiff 404 unknown layer <id>",
        "GraphDriver.ApplyDiff 400 layer tar",
        "GraphDriver.ApplyDiff 400 ApplyDiff parent",
        "GraphDriver.Diff 404 unknown layer <id>",
        "GraphDriver.Changes 404 unknown layer <id>",
        "GraphDriver.Create 409 layer <id> already exists",
        "GraphDriver.Create 404 parent layer <id> of <id> does not exist",
        "GraphDriver.Init 400 cannot change UIDMaps/GIDMaps",
    ]:
        assert any(r.startswith(needle) for r in reasons), f"never reached: {needle}\n" + "\n".join(sorted(reasons))
    assert any(" 400 invalid ID" in r for r in reasons)
    assert any(" 400 invalid Parent" in r for r in reasons)
    for method in ["GraphDriver.Get", "GraphDriver.Put", "GraphDriver.ApplyDiff", "GraphDriver.Diff",
                   "GraphDriver.Remove", "GraphDriver.CreateReadWrite", "GraphDriver.Changes"]:
        assert SEEN[(method, 200, "")], f"{method} never succeeded"


# -- single properties -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=300) | odd_id_strings | st.sampled_from(POOL + [
    "empty", "Base", "Snap", "overlayTest", "mpg3f1ddm7e6v3dqk5ppnv1bq", "a:b,c", ".tmp", "x." + "0" * 64,
    "\u00e9" * 127, "a" * 255]))
def test_id_syntax(value: str) -> None:
    """
    check_id accepts exactly the IDs the oracle does (any name safe as
    one file name, dockerd's query and a log line: not even a trailing
    newline), and names the field when it refuses.
    """
    from txgraph.driver import check_id
    from txgraph.errors import BadRequest

    if valid_id(value):
        assert check_id(value, "Parent") == value
    else:
        with pytest.raises(BadRequest, match="Parent"):
            check_id(value, "Parent")


def test_init_refuses_new_id_maps_while_layers_exist() -> None:
    """
    Init with other UIDMaps/GIDMaps than the existing layers were made
    with is refused (their files carry the old host ids), and persists
    nothing; with no layers, or the same maps, Init works.
    """
    daemon = Daemon()
    try:
        remap = [{"container_id": 0, "host_id": 100000, "size": 65536}]

        def init(maps: Any) -> tuple[int, Any]:
            status, _, body = daemon.request("GraphDriver.Init", _json(
                {"Home": "/h", "Opts": None, "UIDMaps": maps, "GIDMaps": maps}))
            return status, json.loads(body)

        assert init(remap) == (200, {})
        assert daemon.request("GraphDriver.Create", _json({"ID": POOL[0]}))[0] == 200
        assert init(remap) == (200, {})
        before = daemon.snapshot()
        for maps in (None, [], [{"container_id": 0, "host_id": 200000, "size": 65536}]):
            status, reply = init(maps)
            assert status == 400 and "cannot change UIDMaps/GIDMaps" in reply["Err"]
            assert daemon.snapshot() == before
        assert daemon.request("GraphDriver.Remove", _json({"ID": POOL[0]}))[0] == 200
        assert init(None) == (200, {})
    finally:
        daemon.close()


@pytest.mark.parametrize("request_line", [
    b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    b"POST /GraphDriver.Get HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /GraphDriver.Nope HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /GraphDriver.Status HTTP/1.0\r\n\r\n",
])
def test_no_host_header(request_line: bytes) -> None:
    """
    A request without a Host header (HTTP/1.0, or a careless client) on
    the UNIX socket is served like any other, not failed with a 500
    (the socket's address has no host name to fall back on).
    """
    from test_api import FakeDriver

    protocol, transport = unix_connection(Client(FakeDriver()))
    protocol.dataReceived(request_line)
    status, headers, body = parse(transport.value())
    assert status != 500, body
    assert headers["content-type"] == "application/vnd.docker.plugins.v1+json"
    reply = json.loads(body)
    assert (status == 200) == ("Err" not in reply), reply


def test_diff_output_in_flight_is_bounded() -> None:
    """
    A Diff producer thread may run ahead of the reactor by at most
    DIFF_IN_FLIGHT bytes: however fast it produces, it waits until the
    reactor has written what it handed over (before this bound, a fast
    producer queued tens of MB of writes before the connection pushed back).
    """
    import threading

    from txgraph.api.streams import DIFF_CHUNK, DIFF_IN_FLIGHT, ResponseStream

    class QueueingReactor:
        def __init__(self) -> None:
            self.calls: deque[tuple[Any, tuple[Any, ...]]] = deque()

        def callFromThread(self, f: Any, *args: Any) -> None:
            self.calls.append((f, args))

    class Request:
        def __init__(self) -> None:
            self.written = 0

        def write(self, data: bytes) -> None:
            self.written += len(data)

    reactor, request = QueueingReactor(), Request()
    stream = ResponseStream(reactor, request)  # type: ignore[arg-type]
    total = 64 * DIFF_CHUNK
    done = threading.Event()

    def produce() -> None:
        for _ in range(total // (1 << 20)):
            stream.write(bytes(1 << 20))
        stream.flush()
        done.set()

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    peak = 0
    while not done.is_set() or reactor.calls:
        if not done.wait(0.05) or reactor.calls:
            queued = sum(len(args[0]) for _, args in reactor.calls)
            peak = max(peak, queued)
            assert queued <= DIFF_IN_FLIGHT + (1 << 20)
            while reactor.calls:
                f, args = reactor.calls.popleft()
                f(*args)
    worker.join(5)
    assert request.written == total
    assert peak > 0


def test_diff_producer_released_when_connection_lost() -> None:
    """
    A producer waiting for the reactor is released, with an error, when
    the connection goes away.
    """
    import threading

    from txgraph.api.streams import DIFF_IN_FLIGHT, ResponseStream

    class Never:
        def callFromThread(self, f: Any, *args: Any) -> None:
            pass

    stream = ResponseStream(Never(), None)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for _ in range(2 * DIFF_IN_FLIGHT // (1 << 20) + 2):
                stream.write(bytes(1 << 20))
        except ConnectionError as e:
            errors.append(e)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    worker.join(0.5)
    assert worker.is_alive(), "the producer should be waiting for the reactor"
    stream.stopProducing()
    worker.join(5)
    assert not worker.is_alive() and errors


def test_plain_id_fast_path_agrees_with_the_full_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    id_problem answers IDs of plain printable ASCII from one regex; every
    ASCII character, alone, inside an ID and at its ends, and IDs at and
    past the length limit, get the same answer as from the walk through
    each character (the fast path switched off).
    """
    import re

    from txgraph import driver

    values = ["", ".", "..", "...", "a" * 255, "a" * 256, "." * 255, "x." + "0" * 64]
    for c in map(chr, range(128)):
        values += [c, c * 2, f"ab{c}cd", f"{c}abc", f"abc{c}", "a" * 254 + c]
    fast = {v: driver.id_problem(v) for v in values}
    monkeypatch.setattr(driver, "_PLAIN_ID", re.compile(r"(?!)"))
    slow = {v: driver.id_problem(v) for v in values}
    assert fast == slow
    assert fast["a" * 255] is None and fast["a" * 256] is not None and fast["ab/cd"] is not None
