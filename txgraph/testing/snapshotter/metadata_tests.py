"""The tests of containerd's snapshotter suite about the snapshot API itself
(``testsuite.go``): the basic workflow, Stat of active and committed
snapshots, parents, Update, Remove, Walk with and without filters, Stat
inside Walk, and closing the client twice.
"""

from __future__ import annotations

import functools
import os
import random
import time

import grpc

from txgraph.api.containerd.proto import snapshots_pb2
from txgraph.testing import fstest
from txgraph.testing.snapshotter.client import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    Info,
    Snapshotter,
    grpc_code,
    grpc_error,
)
from txgraph.testing.snapshotter.mount import mount_all, unmount_all
from txgraph.testing.snapshotter.suite import Suite, assert_labels, check_info


class SnapshotMetadataTests:
    """The snapshot API checks; mixed into the class L{make_snapshotter_tests}
    makes, which gives them the ``suite`` fixture."""

    def test_basic(self, suite: Suite) -> None:
        """Basic: the workflow prepare, write, commit, prepare on it, commit,
        walk, view; removing a parent with a child fails."""
        sn, opt = suite.sn, suite.opt
        initial = fstest.apply(
            fstest.create_file("/foo", b"foo\n", 0o777),
            fstest.create_dir("/a", 0o755),
            fstest.create_dir("/a/b", 0o755),
            fstest.create_dir("/a/b/c", 0o755),
        )
        diff = fstest.apply(
            fstest.create_file("/bar", b"bar\n", 0o777),
            # also, change content of foo to bar
            fstest.create_file("/foo", b"bar\n", 0o777),
            fstest.remove_all("/a/b"),
        )
        preparing = suite.mkdir("preparing")
        ms = sn.prepare(preparing, "", opt)
        assert len(ms) >= 1, "expected mounts to have entries"
        mount_all(ms, preparing)
        initial(preparing)
        unmount_all(preparing)  # unmount before commit

        committed = os.path.join(suite.work, "committed")
        sn.commit(committed, preparing, opt)
        si = sn.stat(committed)
        assert si.parent == ""
        assert si.kind == KIND_COMMITTED
        assert grpc_error(lambda: sn.stat(preparing)) is not None, (
            f"{preparing} should no longer be available after Commit"
        )

        next_ = suite.mkdir("nextlayer")
        mount_all(sn.prepare(next_, committed, opt), next_)
        suite.check_directory_equal_with_applier(next_, initial)
        diff(next_)
        unmount_all(next_)  # unmount before commit

        ni = sn.stat(next_)
        assert ni.parent == committed
        assert ni.kind == KIND_ACTIVE

        next_committed = os.path.join(suite.work, "committed-next")
        sn.commit(next_committed, next_, opt)
        si2 = sn.stat(next_committed)
        assert si2.parent == committed
        assert si2.kind == KIND_COMMITTED
        assert grpc_error(lambda: sn.stat(next_)) is not None, (
            f"{next_} should no longer be available after Commit"
        )

        expected = {si.name: si, si2.name: si2}
        walked = {info.name: info for info in sn.walk()}  # walk is not ordered
        for name, info in expected.items():
            assert name in walked, f"Missing stat for {name}"
            assert walked[name] == info

        nextnext = suite.mkdir("nextnextlayer")
        mount_all(sn.view(nextnext, next_committed, opt), nextnext)
        try:
            suite.check_directory_equal_with_applier(nextnext, fstest.apply(initial, diff))
        finally:
            unmount_all(nextnext)
        sn.remove(nextnext)
        error = grpc_error(lambda: sn.remove(committed))
        assert error is not None and "remove" in str(error.details()), error  # type: ignore[attr-defined]
        sn.remove(next_committed)
        sn.remove(committed)

    def test_stat_active(self, suite: Suite) -> None:
        """StatActive: a prepared snapshot is Active, without parent, under its key."""
        sn = suite.sn
        preparing = suite.prepare_mount("preparing", "")  # inlined in Go
        try:
            fstest.create_file("foo", b"foo\n", 0o777)(preparing)
            si = sn.stat(preparing)
            assert si.name == preparing
            assert si.kind == KIND_ACTIVE
            assert si.parent == ""
        finally:
            unmount_all(preparing)

    def test_stat_comitted(self, suite: Suite) -> None:
        """StatComitted: a committed snapshot is Committed, without parent, under its name."""
        sn, opt = suite.sn, suite.opt
        preparing = suite.prepare_mount("preparing", "")  # inlined in Go
        try:
            fstest.create_file("foo", b"foo\n", 0o777)(preparing)
            committed = os.path.join(suite.work, "committed")
            sn.commit(committed, preparing, opt)
            si = sn.stat(committed)
            assert si.name == committed
            assert si.kind == KIND_COMMITTED
            assert si.parent == ""
        finally:
            unmount_all(preparing)

    def test_transitivity(self, suite: Suite) -> None:
        """TransitivityTest: A <- B; B's parent is A, and A has none."""
        sn, opt = suite.sn, suite.opt
        preparing = suite.prepare_mount("preparing", "")
        try:
            fstest.create_file("foo", b"foo\n", 0o777)(preparing)
            snap_a = os.path.join(suite.work, "snapA")
            sn.commit(snap_a, preparing, opt)
            next_ = suite.prepare_mount("next", snap_a)
            try:
                fstest.create_file("foo", b"foo bar\n", 0o777)(next_)
                snap_b = os.path.join(suite.work, "snapB")
                sn.commit(snap_b, next_, opt)
                si_a = sn.stat(snap_a)
                si_b = sn.stat(snap_b)
                si_parent_b = sn.stat(si_b.parent)
                assert si_a.parent == ""
                assert si_b.parent == snap_a
                assert si_parent_b.parent == ""
            finally:
                unmount_all(next_)
        finally:
            unmount_all(preparing)

    def test_prepare_view_failing(self, suite: Suite) -> None:
        """PreareViewFailingtest: Prepare/View with a key in use fails."""
        sn, opt = suite.sn, suite.opt
        preparing = suite.prepare_mount("preparing", "")
        try:
            snap_a = os.path.join(suite.work, "snapA")
            sn.commit(snap_a, preparing, opt)
            # Prepare & View with same key
            new_layer = os.path.join(suite.work, "newlayer")
            sn.prepare(new_layer, snap_a, opt)
            assert grpc_error(lambda: sn.view(new_layer, snap_a, opt)) is not None
            # Two Prepare with same key
            prep_layer = os.path.join(suite.work, "prepLayer")
            sn.prepare(prep_layer, snap_a, opt)
            assert grpc_error(lambda: sn.prepare(prep_layer, snap_a, opt)) is not None
            # Two View with same key
            view_layer = os.path.join(suite.work, "viewLayer")
            sn.view(view_layer, snap_a, opt)
            assert grpc_error(lambda: sn.view(view_layer, snap_a, opt)) is not None
        finally:
            unmount_all(preparing)

    def _base_test_snapshots(self, suite: Suite) -> None:
        """baseTestSnapshots: c1, c2 (on c1), a1 (on c2), a2, v1 (on c2), v2."""
        sn, opt = suite.sn, suite.opt
        sn.prepare("c1-a", "", opt)
        sn.commit("c1", "c1-a", opt)
        sn.prepare("c2-a", "c1", opt)
        sn.commit("c2", "c2-a", opt)
        sn.prepare("a1", "c2", opt)
        sn.prepare("a2", "", opt)
        sn.view("v1", "c2", opt)
        sn.view("v2", "", opt)

    def test_update(self, suite: Suite) -> None:
        """Update: times, kinds and parents are kept; labels replaced, by
        field path, or whole; an immutable field path is InvalidArgument."""
        sn = suite.sn
        t1 = time.time_ns()
        self._base_test_snapshots(suite)
        t2 = time.time_ns()
        cases = [
            ("c1", KIND_COMMITTED, ""), ("c2", KIND_COMMITTED, "c1"),
            ("a1", KIND_ACTIVE, "c2"), ("a2", KIND_ACTIVE, ""),
            ("v1", KIND_VIEW, "c2"), ("v2", KIND_VIEW, ""),
        ]
        for name, kind, parent in cases:
            st = sn.stat(name)
            assert t1 <= st.created <= t2, (
                f"({name}) wrong created time {st.created}: expected between {t1} and {t2}"
            )
            assert st.created == st.updated, f"({name}) unexpected updated time {st.updated}"
            assert st.kind == kind, f"({name}) unexpected kind {st.kind}, expected {kind}"
            assert st.parent == parent, f"({name}) unexpected parent {st.parent!r}"
            assert st.name == name

            created_at = st.created
            root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            expected = {"l1": "v1", "l2": "v2", "l3": "v3",
                        # Keep root label
                        "containerd.io/gc.root": root_time}
            st = Info(st.name, "doesnotexist", st.kind, st.created, st.updated, expected)
            u1 = time.time_ns()
            st = sn.update(st)
            u2 = time.time_ns()
            assert st.created == created_at, f"({name}) wrong created time {st.created}"
            assert u1 <= st.updated <= u2, (
                f"({name}) wrong updated time {st.updated}: expected between {u1} and {u2}"
            )
            assert st.kind == kind, f"({name}) unexpected kind {st.kind}, expected {kind}"
            assert st.parent == parent, f"({name}) unexpected parent {st.parent!r}"
            assert st.name == name
            assert_labels(st.labels, expected)

            expected = {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}
            st = Info(st.name, st.parent, st.kind, st.created, st.updated,
                      {"l1": "updated", "l4": "v4"})
            st = sn.update(st, "labels.l1", "labels.l2")
            assert_labels(st.labels, expected)

            expected = {"l4": "v4", "containerd.io/gc.root": root_time}
            st = Info(st.name, st.parent, st.kind, st.created, st.updated, expected)
            st = sn.update(st, "labels")
            assert_labels(st.labels, expected)

            # Test failure received when providing immutable field path
            bad = Info(st.name, "doesnotexist", st.kind, st.created, st.updated, st.labels)
            code = grpc_code(functools.partial(sn.update, bad, "parent"))
            assert code is not None, "Expected error updating with immutable field path"
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (
                f"Unexpected error updating {name}: {code}"
            )

    def test_remove(self, suite: Suite) -> None:
        """Remove: keys are reusable once removed, across kinds, and a
        committed name once its snapshot is removed."""
        sn, opt = suite.sn, suite.opt
        sn.prepare("committed-a", "", opt)
        sn.commit("committed-1", "committed-a", opt)
        sn.prepare("reuse-1", "committed-1", opt)
        sn.remove("reuse-1")
        sn.view("reuse-1", "committed-1", opt)
        sn.remove("reuse-1")
        sn.prepare("reuse-1", "", opt)
        sn.remove("committed-1")
        sn.commit("committed-1", "reuse-1", opt)

    def test_walk(self, suite: Suite) -> None:
        """Walk: containerd's filters (kind, name, parent, labels; any of
        several; a comma is and) select exactly the expected snapshots."""
        sn = suite.sn
        opt = {"containerd.io/gc.root": "check-walk"}

        def with_l(value: str) -> dict[str, str]:
            return {"l": value, "containerd.io/gc.root": "check-walk"}

        sn.prepare("a-np", "", opt)  # No parent active
        sn.prepare("p-tmp", "", opt)  # Base parent
        sn.commit("p", "p-tmp", opt)
        sn.prepare("a", "p", opt)  # Active
        sn.view("v", "p", opt)  # View
        sn.prepare("p-wl-tmp", "", opt)  # Base parent with label=1
        sn.commit("p-wl", "p-wl-tmp", with_l("1"))
        sn.prepare("a-wl", "p-wl", with_l("2"))  # active with label=2
        sn.view("v-wl", "p-wl", with_l("3"))  # view with label=3
        sn.prepare("a-np-wl", "", with_l("2"))  # no parent active with label=2

        cases = [
            (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
             ['labels."containerd.io/gc.root"==check-walk']),
            (["a-np", "a", "a-wl", "a-np-wl"],
             ['kind==active,labels."containerd.io/gc.root"==check-walk']),
            (["v", "v-wl"], ['kind==view,labels."containerd.io/gc.root"==check-walk']),
            (["p", "p-wl"], ['kind==committed,labels."containerd.io/gc.root"==check-walk']),
            (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
            (["a-wl"], ["name==a-wl,labels.l"]),
            (["a", "v"], ["parent==p"]),
            (["a", "v", "a-wl", "v-wl"],
             ['parent!="",labels."containerd.io/gc.root"==check-walk']),
            (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
            (["a-wl", "a-np-wl"], ["labels.l==2"]),
        ]
        failures = []
        for i, (matches, filters) in enumerate(cases):
            actual = sorted(info.name for info in sn.walk(*filters))
            if actual != sorted(matches):
                failures.append(f"[{i}] {filters}: got {actual}, expected {sorted(matches)}")
        assert not failures, "\n".join(failures)

    def test_stat_in_walk(self, suite: Suite) -> None:
        """StatInWalk: Stat during a Walk gives the walked infos."""
        sn, opt = suite.sn, suite.opt
        prefix = "stats-in-walk-"
        c1, c2 = f"{prefix}c1", f"{prefix}c2"
        ms = sn.prepare(c1 + "-a", "", opt)
        suite.apply_to_mounts(ms, fstest.base())
        sn.commit(c1, c1 + "-a", opt)
        sn.prepare(c2 + "-a", c1, opt)
        sn.commit(c2, c2 + "-a", opt)
        sn.prepare(f"{prefix}a1", c2, opt)
        sn.view(f"{prefix}v1", c2, opt)

        replies = sn.stub.List(
            snapshots_pb2.ListSnapshotsRequest(snapshotter=suite.target.snapshotter),
            metadata=sn.metadata, timeout=120.0,
        )
        for reply in replies:  # Stat while the List stream is open
            for proto in reply.info:
                si = Info.from_proto(proto)
                if not si.name.startswith(prefix):
                    continue  # Only stat snapshots from this test
                check_info(si, sn.stat(si.name))

    def test_close_twice(self, suite: Suite) -> None:
        """CloseTwice: closing the client twice is no error, and the
        snapshotter still serves a new client (it saw the removal)."""
        sn, opt = suite.sn, suite.opt
        n = f"closeTwice-{random.getrandbits(63)}"
        prepare = f"{n}-prepare"
        # do some dummy ops to modify the snapshotter internal state
        sn.prepare(prepare, "", opt)
        sn.commit(n, prepare, opt)
        sn.remove(n)
        sn.close()
        sn.close()
        again = Snapshotter(suite.target)
        try:
            assert grpc_code(lambda: again.stat(n)) == grpc.StatusCode.NOT_FOUND
        finally:
            again.close()
