"""
Tests for containerd's snapshotter semantics (txgraph.snapshotter) on the
layer registry, with the unit tests' fake backend and an inline SQLite
store: kinds, parents, renames at Commit, the errors containerd's errdefs
tells apart, Update's field paths, List's filters (txgraph.filters), the
order of writes recovery relies on, and holding the layers of a backend
whose mounts are its own.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_layers import FakeBackend, Harness

from txgraph import filters
from txgraph.backends import LayerInfo
from txgraph.errors import BadRequest, InvalidLayerState, SnapshotExists, UnknownSnapshot
from txgraph.layers.registry import LayerRegistry
from txgraph.snapshotstore import SnapshotStore
from txgraph.snapshotter import TARGET_REF, Info, Snapshotter


class Clock:
    """A nanosecond clock that ticks once per reading."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


class SnapshotHarness(Harness):
    """A snapshotter over the layer harness's registry and store."""

    def __init__(
        self, tmp_path: Any, holds: bool = False, fake_class: type[FakeBackend] = FakeBackend
    ) -> None:
        super().__init__(tmp_path, maps=holds, commits=True, fake_class=fake_class)
        self.fake.holds_client_mounts = holds  # type: ignore[misc]
        self.snapshots = SnapshotStore(self.store)
        self.clock_ns = Clock()
        self.sn = Snapshotter(self.registry, self.snapshots, self.registry.backend, self.clock_ns)
        self.run(self.sn.start())

    def restart(self) -> Snapshotter:
        """A new registry and snapshotter on the same database (a restart)."""
        self.registry = LayerRegistry(self.store, self.registry.backend, self.clock)
        self.run(self.registry.restore(self.store.load_layers_thd(), False))
        self.sn = Snapshotter(self.registry, self.snapshots, self.registry.backend, self.clock_ns)
        self.run(self.sn.start())
        return self.sn

    def rows(self) -> dict[str, str]:
        """Persisted snapshots: key -> kind."""
        return {r.key: r.kind for r in self.snapshots.load_snapshots_thd()}


@pytest.fixture
def s(tmp_path: Any) -> SnapshotHarness:
    return SnapshotHarness(tmp_path)


def _prepare_commit(s: SnapshotHarness, name: str, parent: str = "") -> None:
    s.run(s.sn.prepare(f"{name}-a", parent, {}))
    s.run(s.sn.commit(name, f"{name}-a", {"l": name}))


def test_prepare_commit_view_remove(s: SnapshotHarness) -> None:
    """The life of a chain: kinds, parents, layers, persisted rows; a
    committed snapshot keeps its layer under its new name."""
    mounts = s.run(s.sn.prepare("base-a", "", {"a": "1"}))
    assert [m.options[0] for m in mounts] == ["rw"]
    layer = s.sn._by_key["base-a"].row.layer_id
    assert s.rows() == {"base-a": "active"}
    s.run(s.sn.commit("base", "base-a", {"b": "2"}))
    info = s.sn.stat("base")
    assert (info.kind, info.parent, info.labels) == ("committed", "", {"b": "2"})
    assert s.sn._by_key["base"].row.layer_id == layer
    assert s.registry.lookup(layer).row.committed
    with pytest.raises(UnknownSnapshot, match="base-a"):
        s.sn.stat("base-a")
    view = s.run(s.sn.view("v", "base", {}))
    assert view[0].options[0] == "ro"
    assert s.sn.stat("v").kind == "view" and s.sn.stat("v").parent == "base"
    view_layer = s.sn._by_key["v"].row.layer_id
    assert s.registry.lookup(view_layer).row.parent == layer
    assert s.registry.lookup(view_layer).row.committed
    s.run(s.sn.prepare("top", "base", {}))
    assert s.rows() == {"base": "committed", "v": "view", "top": "active"}
    with pytest.raises(InvalidLayerState, match="cannot remove snapshot base: it has 2 child"):
        s.run(s.sn.remove("base"))
    for key in ("top", "v", "base"):
        s.run(s.sn.remove(key))
    assert s.rows() == {} and s.registry.rows() == []


def test_errors_name_the_key(s: SnapshotHarness) -> None:
    """Each refusal has the class the front end maps to containerd's code
    (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument) and names
    the key."""
    _prepare_commit(s, "c")
    s.run(s.sn.prepare("a", "c", {}))
    s.run(s.sn.view("v", "c", {}))
    with pytest.raises(SnapshotExists, match="snapshot a: already exists"):
        s.run(s.sn.prepare("a", "", {}))
    with pytest.raises(SnapshotExists, match="committed snapshot c: already exists"):
        s.run(s.sn.commit("c", "a", {}))
    with pytest.raises(UnknownSnapshot, match="parent snapshot nope of x"):
        s.run(s.sn.prepare("x", "nope", {}))
    with pytest.raises(BadRequest, match="parent a of x is not a committed snapshot"):
        s.run(s.sn.prepare("x", "a", {}))
    with pytest.raises(InvalidLayerState, match="snapshot v is not active"):
        s.run(s.sn.commit("v2", "v", {}))
    with pytest.raises(InvalidLayerState, match="snapshot c is committed"):
        s.run(s.sn.mounts("c"))
    with pytest.raises(UnknownSnapshot, match="snapshot gone does not exist"):
        s.run(s.sn.remove("gone"))
    with pytest.raises(BadRequest, match="missing snapshot key"):
        s.run(s.sn.prepare("", "", {}))
    assert "x" not in s.sn._by_key and s.rows() == {"c": "committed", "a": "active", "v": "view"}


def test_update_field_paths(s: SnapshotHarness) -> None:
    """Update as containerd's storage.UpdateInfo: labels.<key> sets or (empty)
    deletes one, labels or no path replaces all, other paths are refused; the
    update time moves, the creation time does not."""
    s.run(s.sn.prepare("a", "", {"l1": "v1", "l2": "v2", "l3": "v3"}))
    before = s.sn.stat("a")
    given = Info("a", "active", "", {"l1": "updated", "l4": "v4"}, 0, 0)
    after = s.run(s.sn.update(given, ["labels.l1", "labels.l2"]))
    assert after.labels == {"l1": "updated", "l3": "v3"}
    assert after.created_ns == before.created_ns and after.updated_ns > before.updated_ns
    assert s.run(s.sn.update(given, ["labels"])).labels == {"l1": "updated", "l4": "v4"}
    assert s.run(s.sn.update(Info("a", "", "", {"x": "y"}, 0, 0), [])).labels == {"x": "y"}
    with pytest.raises(BadRequest, match="cannot update 'parent' field on snapshot 'a'"):
        s.run(s.sn.update(given, ["parent"]))
    assert s.restart().stat("a").labels == {"x": "y"}


def test_list_filters(s: SnapshotHarness) -> None:
    """List with containerd's filter syntax, as its unpacker and GC send it."""
    _prepare_commit(s, "p")
    s.run(s.sn.prepare("a", "p", {"containerd.io/snapshot.ref": "sha256:abc"}))
    s.run(s.sn.view("v", "p", {}))
    s.run(s.sn.prepare("n", "", {}))

    def names(*texts: str) -> list[str]:
        return sorted(i.name for i in s.sn.list(texts))

    assert names() == ["a", "n", "p", "v"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p"') == ["a"]
    assert names("kind==committed") == ["p"]
    assert names("kind==view", "name==n") == ["n", "v"]
    assert names('parent!=""') == ["a", "v"]
    assert names("labels.l") == ["p"]
    assert names("labels.l!=p") == ["a", "n", "v"]
    assert names("name~=^[av]$") == ["a", "v"]
    with pytest.raises(BadRequest, match="invalid filter"):
        s.sn.list(["name=="])


@pytest.mark.parametrize(
    ("text", "fields", "expected"),
    [
        ('labels."a.b"==x', {("labels", "a.b"): "x"}, True),
        ("labels.a.b==x", {("labels", "a", "b"): "x"}, True),
        ('name=="with \\"quote\\""', {("name",): 'with "quote"'}, True),
        ("name==/x", {("name",): "/x"}, False),
        ("name~=|a|b|", {("name",): "a|b"}, False),
        ("name==a, kind==view", {("name",): "a", ("kind",): "view"}, True),
        ("name", {}, False),
    ],
)
def test_filter_grammar(text: str, fields: dict[tuple[str, ...], str], expected: bool) -> None:
    """Selectors, quoted fields and values, presence, and the comma's "and"."""

    def adaptor(path: Any) -> tuple[str, bool]:
        key = tuple(path)
        return fields.get(key, ""), key in fields

    try:
        assert filters.parse(text)(adaptor) is expected
    except BadRequest:
        assert not expected


def test_row_before_layer_and_layer_before_row_removal(s: SnapshotHarness) -> None:
    """The snapshot row is on disk before its layer is prepared, and still
    there when its layer is removed: a crash between never leaves a layer
    without its snapshot."""
    seen: list[tuple[str, dict[str, str]]] = []
    prepare, remove = s.fake.prepare, s.fake.remove

    def recording_prepare(layer: Any) -> Any:
        seen.append(("prepare", s.rows()))
        return prepare(layer)

    def recording_remove(layer: Any) -> None:
        seen.append(("remove", s.rows()))
        remove(layer)

    s.fake.prepare = recording_prepare  # type: ignore[method-assign]
    s.fake.remove = recording_remove  # type: ignore[method-assign]
    s.run(s.sn.prepare("a", "", {}))
    s.run(s.sn.remove("a"))
    assert seen == [("prepare", {"a": "active"}), ("remove", {"a": "active"})]
    assert s.rows() == {}


def test_failed_prepare_leaves_nothing(s: SnapshotHarness) -> None:
    """A Prepare whose layer cannot be made leaves no row and no layer, and
    the key can be used again."""
    s.fake.failing.add("prepare")
    with pytest.raises(Exception, match="prepare of"):
        s.run(s.sn.prepare("a", "", {}))
    assert s.rows() == {} and s.registry.rows() == [] and "a" not in s.sn._by_key
    s.fake.failing.clear()
    s.run(s.sn.prepare("a", "", {}))


def test_restart_drops_rows_without_layer(s: SnapshotHarness) -> None:
    """At start, a row whose layer the layers' recovery removed (a Prepare
    that never completed, a Remove cut short) is dropped; the others stay."""
    _prepare_commit(s, "c")
    s.run(s.sn.prepare("a", "c", {}))
    gone = s.sn._by_key["a"].row.layer_id
    s.store.delete_layer_thd(gone)
    sn = s.restart()
    assert [i.name for i in sn.list([])] == ["c"]
    assert s.rows() == {"c": "committed"}


def test_usage(s: SnapshotHarness) -> None:
    """Active: measured now; committed: as measured at Commit; view: nothing."""
    s.run(s.sn.prepare("a", "", {}))
    assert s.run(s.sn.usage("a")) == (4096, 1)
    s.run(s.sn.commit("c", "a", {}))
    assert s.run(s.sn.usage("c")) == (4096, 1)
    s.run(s.sn.view("v", "c", {}))
    assert s.run(s.sn.usage("v")) == (0, 0)


def test_held_layers(tmp_path: Any) -> None:
    """A backend whose mounts are its own: the layer is mounted (one Get)
    from Prepare or View to Commit or Remove, and again at Mounts."""
    s = SnapshotHarness(tmp_path, holds=True)
    s.run(s.sn.prepare("a", "", {}))
    layer = s.sn._by_key["a"].row.layer_id
    assert (s.registry.lookup(layer).row.state, s.registry.lookup(layer).row.refcount) == ("mounted", 1)
    s.run(s.sn.mounts("a"))
    assert s.registry.lookup(layer).row.refcount == 1
    s.run(s.sn.commit("c", "a", {}))
    assert s.registry.lookup(layer).row.state == "created"
    s.run(s.sn.view("v", "c", {}))
    view = s.sn._by_key["v"].row.layer_id
    assert s.registry.lookup(view).row.state == "mounted"
    s.run(s.sn.remove("v"))
    assert view not in s.registry
    calls = [name for name, layer_id, _ in s.fake.calls if layer_id == view]
    assert calls[:3] == ["prepare", "commit", "map"] and calls[-1] == "remove"


# -- the remote-snapshot shortcut ----------------------------------------------------

CHAIN_1 = "sha256:" + "1" * 64
CHAIN_2 = "sha256:" + "2" * 64


class SharingBackend(FakeBackend):
    """
    The fake backend with a pool of shared layers: chain ID -> the chain
    it was made on.
    """

    shares_layers = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool: dict[str, str] = {}

    def shared_chain_parent(self, chain: str) -> str | None:
        return self.pool.get(chain)

    def adopt_shared(self, layer: LayerInfo, chain: str) -> int:
        self._call("adopt_shared", layer)
        return 0

    def publish_chain(
        self, layer: LayerInfo, chain: list[LayerInfo], chain_id: str, parent_chain: str
    ) -> bool:
        self._call("publish_chain", layer)
        if chain_id in self.pool:
            return False
        self.pool[chain_id] = parent_chain
        return True


@pytest.fixture
def shared(tmp_path: Any) -> SnapshotHarness:
    return SnapshotHarness(tmp_path, fake_class=SharingBackend)


def _pool(s: SnapshotHarness) -> dict[str, str]:
    assert isinstance(s.fake, SharingBackend)
    return s.fake.pool


def _unpack(s: SnapshotHarness, name: str, parent: str, chain: str) -> None:
    """What containerd's unpacker does on a node that unpacks a layer."""
    labels = {TARGET_REF: chain}
    s.run(s.sn.prepare(f"extract-{name}", parent, labels))
    s.run(s.sn.commit(name, f"extract-{name}", labels))


def test_commit_with_chain_label_publishes(shared: SnapshotHarness) -> None:
    """A layer containerd unpacked is published under its chain ID, on its
    parent's chain, once; a commit without the label publishes nothing."""
    _unpack(shared, "one", "", CHAIN_1)
    _unpack(shared, "two", "one", CHAIN_2)
    assert _pool(shared) == {CHAIN_1: "", CHAIN_2: CHAIN_1}
    assert shared.sn.published == 2
    _prepare_commit(shared, "plain")
    assert shared.sn.published == 2


def test_prepare_of_pooled_chain_takes_the_shortcut(shared: SnapshotHarness) -> None:
    """A Prepare labelled with a chain the pool holds (on the right parent
    chain) answers AlreadyExists and leaves a committed snapshot, named by
    the Prepare's key, that containerd's List filter finds; its layer is
    the shared one (adopted, committed); children are made on it."""
    _pool(shared).update({CHAIN_1: "", CHAIN_2: CHAIN_1})
    with pytest.raises(SnapshotExists, match=CHAIN_1):
        shared.run(shared.sn.prepare("k8s.io/1/extract-1 " + CHAIN_1, "", {TARGET_REF: CHAIN_1}))
    key = "k8s.io/1/extract-1 " + CHAIN_1
    found = shared.sn.list([f'labels."{TARGET_REF}"=={CHAIN_1},parent==""'])
    assert [(i.name, i.kind, i.labels) for i in found] == [(key, "committed", {TARGET_REF: CHAIN_1})]
    layer = shared.sn._by_key[key].row.layer_id
    assert ("adopt_shared", layer, "applying") in shared.fake.calls
    assert shared.registry.lookup(layer).row.committed
    assert shared.rows() == {key: "committed"}
    with pytest.raises(SnapshotExists):
        shared.run(shared.sn.prepare("extract-2", key, {TARGET_REF: CHAIN_2}))
    assert shared.sn.stat("extract-2").parent == key
    assert shared.sn.adopted == 2
    # A restart keeps both, committed.
    sn = shared.restart()
    assert {i.name: i.kind for i in sn.list([])} == {key: "committed", "extract-2": "committed"}


def test_shortcut_needs_the_same_parent_chain(shared: SnapshotHarness) -> None:
    """A chain the pool holds on another parent chain, a parent without a
    chain label, or a chain the pool lacks: the layer is unpacked as
    usual (an active snapshot with mounts)."""
    _pool(shared)[CHAIN_2] = CHAIN_1
    _prepare_commit(shared, "unlabelled")
    for key, parent, chain in [
        ("on-nothing", "", CHAIN_2),
        ("on-unlabelled", "unlabelled", CHAIN_2),
        ("missing", "", CHAIN_1),
    ]:
        assert shared.run(shared.sn.prepare(key, parent, {TARGET_REF: chain}))
        assert shared.sn.stat(key).kind == "active"
    assert shared.sn.adopted == 0


def test_failed_adoption_falls_back_to_unpacking(shared: SnapshotHarness) -> None:
    """If the shared layer cannot be taken (removed meanwhile), nothing is
    left of the attempt and the Prepare is served as usual."""
    _pool(shared)[CHAIN_1] = ""
    shared.fake.failing.add("adopt_shared")
    mounts = shared.run(shared.sn.prepare("x", "", {TARGET_REF: CHAIN_1}))
    assert mounts
    assert shared.sn.stat("x").kind == "active"
    assert shared.rows() == {"x": "active"}
    assert len(shared.registry.rows()) == 1


def test_overlay_like_backend_never_shortcuts(s: SnapshotHarness) -> None:
    """A backend without shared layers ignores the label: unpacked, not published."""
    _unpack(s, "one", "", CHAIN_1)
    assert (s.sn.adopted, s.sn.published) == (0, 0)
