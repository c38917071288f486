"""containerd's snapshotter test suite (v1.6.20 ``snapshots/testsuite``), ported to Python.

Any ``containerd.services.snapshots.v1.Snapshots`` gRPC endpoint subscribes
with one line::

    class ContainerdOverlayfsTests(make_snapshotter_tests(containerd_target("overlayfs"))):
        "containerd's own overlayfs passes containerd's snapshotter suite."

The tests are containerd's checks, one for one, with the same keys, file
contents, modes and assertions (``testsuite.go``, ``issues.go``,
``helpers.go``): Basic, StatActive, StatComitted, TransitivityTest,
PreareViewFailingtest, Update, Remove, Walk, LayerFileupdate,
RemoveDirectoryInLowerLayer, Chown, DirectoryPermissionOnCommit,
RemoveIntermediateSnapshot, DeletedFilesInChildSnapshot,
MoveFileFromLowerLayer, Rename (skipped on Linux, as in Go), ViewReadonly,
StatInWalk, CloseTwice, RootPermission and 128LayersMount.  Snapshotter
calls go over gRPC with the generated stubs of
:mod:`txgraph.api.containerd.proto`; the returned mounts are mounted with
mount(2) exactly as containerd's ``mount.All`` does (option parsing, the
read-only bind remount, the chdir that keeps a long overlay ``lowerdir``
under a page); files are checked with :mod:`txgraph.testing.fstest`, the
port of continuity's fstest.  They need root.

Where Go relies on what gRPC does not have, the intent is ported:

- Go builds a new snapshotter in a new root for each test; here each test
  gets a :class:`Target` from the subscriber's factory (containerd: a fresh
  namespace on a shared containerd), and everything the test left is
  removed afterwards, children first.
- CloseTwice calls ``Snapshotter.Close`` twice; a gRPC client's close is
  its channel's, so the channel is closed twice, and a new one must still
  be served (closing a client must not hurt the snapshotter).
- Go runs the tests in parallel (``t.Parallel``); here they run one by one.
- Go's ``t.Errorf`` goes on after a failed check; here the first failed
  check fails the test.

The modules: :mod:`.client` (the gRPC client, ``Info``, ``Target``),
:mod:`.mount` (the ``mount.All`` port), :mod:`.suite` (``helpers.go``: the
per-test ``Suite``), :mod:`.metadata_tests` and :mod:`.content_tests` (the
tests, by theme) and :mod:`.testsuite` (``make_snapshotter_tests``, which
a subscriber imports).
"""
