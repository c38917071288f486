"""
Integration fixtures: cached test images, real txgraph daemons, and
isolated dockerd daemons (Debian's docker.io 20.10) using them.

Each real component is started once per module where the tests allow it;
every one is stopped and cleaned up by PID, whatever happens.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import images
import pytest
from containerd import Containerd, Registry
from dockerd import Dockerd
from txgraphd import Txgraphd, rbd_flags, rbd_namespace

from txgraph.testing.ceph import DevCluster

DockerdFactory = Callable[..., Dockerd]
_names = itertools.count()


def plugin_name() -> str:
    """
    A plugin name no other test run on this machine uses.
    """
    return f"txgraph-test-{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def image_cache() -> Path:
    """
    The image cache directory ($TXGRAPH_TEST_CACHE or /var/cache/txgraph-tests).
    """
    return images.default_cache_dir()


@pytest.fixture(scope="session")
def busybox_rootfs(image_cache: Path) -> Path:
    """
    The deterministic busybox rootfs tar (busybox:local's only layer).
    """
    return images.busybox_rootfs(image_cache)


@pytest.fixture(scope="session")
def busybox_image(image_cache: Path) -> Path:
    """
    A `docker save` tarball of busybox:local, for `docker load -i`.
    """
    return images.busybox_image(image_cache)


@pytest.fixture(scope="session")
def debian_rootfs(image_cache: Path) -> Path:
    """
    A Debian bookworm minbase rootfs tar (debootstrap, or the shared copy).
    """
    return images.debian_rootfs(image_cache)


@pytest.fixture(scope="session")
def debian_image(image_cache: Path) -> Path:
    """
    A `docker save` tarball of debian:local, for `docker load -i`.
    """
    return images.debian_image(image_cache)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """
    Remember each phase's report on the item, so fixtures can see a failure.
    """
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


class Components:
    """
    Every real process a test (or module) started, cleaned up in reverse.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[Txgraphd | Dockerd] = []

    def txgraph(
        self, *extra: str, start: bool = True, name: str | None = None, containerd: bool = False
    ) -> Txgraphd:
        """
        A txgraph daemon on its own socket and state directory; with
        C{containerd}, serving containerd's snapshotter protocol too.
        """
        workdir = self.base / f"txgraph-{len(self.made)}"
        workdir.mkdir(parents=True, exist_ok=True)
        daemon = Txgraphd(workdir, name or plugin_name(), *extra)
        if containerd:
            daemon.serve_containerd()
        self.made.append(daemon)
        if start:
            daemon.start()
        return daemon

    def dockerd(
        self,
        driver: str = "overlay2",
        *,
        extra_args: Sequence[str] = (),
        debug: bool = True,
        start: bool = True,
        timeout: float = 60.0,
    ) -> Dockerd:
        """
        An isolated dockerd (data-root, exec-root, socket of its own).
        """
        daemon = Dockerd(
            self.base / f"dockerd-{len(self.made)}", driver, extra_args=extra_args, debug=debug
        )
        self.made.append(daemon)
        if start:
            daemon.start(timeout)
        return daemon

    def logs(self) -> list[tuple[str, str]]:
        """
        The tails of every component's log.
        """
        result = []
        for c in self.made:
            if isinstance(c, Dockerd):
                result.append((f"dockerd log {c.log_path}", c.log_tail(20000)))
            else:
                result.append((f"txgraph log {c.log_path}", c.log_tail(200)))
        return result

    def cleanup(self) -> None:
        """
        Stop dockerds before the txgraphs they use; clean up everything.
        """
        errors: list[BaseException] = []
        ordered = [c for c in reversed(self.made) if isinstance(c, Dockerd)] + [
            c for c in reversed(self.made) if isinstance(c, Txgraphd)
        ]
        for component in ordered:
            try:
                component.cleanup()
            except BaseException as error:  # clean the others up before failing
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def components(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Components]:
    """
    Start real components for one test; all are cleaned up afterwards, and
    their logs attached to a failed test's report.
    """
    made = Components(tmp_path)
    yield made
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for title, text in made.logs():
            request.node.add_report_section("teardown", title, text)
    made.cleanup()


@pytest.fixture(scope="module")
def module_components(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Components]:
    """
    Real components shared by the tests of one module.
    """
    made = Components(tmp_path_factory.mktemp("stack"))
    try:
        yield made
    finally:
        made.cleanup()


class Stack:
    """
    A txgraph daemon and a dockerd using it as its storage driver.
    """

    def __init__(self, txgraph: Txgraphd, dockerd: Dockerd) -> None:
        self.txgraph = txgraph
        self.dockerd = dockerd
        self.backend = "overlay"
        #: rbd with containers' layers on local storage (container_layers=local).
        self.local = False

    def layers(self) -> list[dict[str, Any]]:
        """
        txgraph's layer rows (id, state, ...), through its admin socket.
        """
        from txgraph.admin.client import Daemon

        return Daemon(str(self.txgraph.state_dir)).call("/ls")  # type: ignore[no-any-return]

    def layer_ids(self) -> set[str]:
        """
        The IDs of txgraph's layers.
        """
        return {row["id"] for row in self.layers()}

    def docker(self, *args: str, **kwargs: Any) -> Any:
        """
        Run the docker CLI against this stack's dockerd.
        """
        return self.dockerd.docker(*args, **kwargs)

    def status(self) -> dict[str, str]:
        """
        txgraph's Status pairs.
        """
        code, reply = self.txgraph.call("GraphDriver.Status", {})
        assert code == 200, reply
        return {k: v for k, v in reply["Status"]}


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """
    One real single-node Ceph cluster (memstore) for the whole session;
    tests that share it isolate themselves with RBD namespaces.  Tests that
    need it are skipped when Ceph is not installed.
    """
    if not DevCluster.available():
        pytest.skip("Ceph is not installed (ceph-mon, ceph-osd)")
    cluster = DevCluster(tmp_path_factory.mktemp("ceph"))
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


BACKENDS = ["overlay", "rbd"]


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, module_components: Components) -> Stack:
    """
    txgraph on each backend in turn, with a dockerd using it.
    """
    return make_stack(request, module_components, request.param)


def make_stack(request: pytest.FixtureRequest, components: Components, backend: str) -> Stack:
    """
    txgraph on C{backend} (C{overlay}, C{rbd}, or C{rbd-local}: rbd with
    C{container_layers=local}), with a dockerd using it.
    """
    flags: list[str] = []
    if backend in ("rbd", "rbd-local"):
        cluster = request.getfixturevalue("ceph_cluster")
        flags = rbd_flags(cluster, rbd_namespace(cluster))
    if backend == "rbd-local":
        flags += ["--rbd-container-layers", "local"]
    txgraph = components.txgraph(*flags)
    dockerd = components.dockerd(txgraph.name)
    stack = Stack(txgraph, dockerd)
    stack.backend = "rbd" if backend == "rbd-local" else backend
    stack.local = backend == "rbd-local"
    return stack


@pytest.fixture(scope="module")
def two_nodes(
    module_components: Components, ceph_cluster: DevCluster
) -> tuple[Stack, Stack, str]:
    """
    Two Docker hosts sharing one pool and namespace: nodes A and B, each a
    txgraph (node ids node-a, node-b) under its own dockerd; B counts
    metrics (its thin layers' lazy reads).
    """
    namespace = rbd_namespace(ceph_cluster)
    stacks = []
    for node in ("node-a", "node-b"):
        metrics = ("--metrics-listen", "tcp:0:interface=127.0.0.1") if node == "node-b" else ()
        txgraph = module_components.txgraph(*rbd_flags(ceph_cluster, namespace, node=node), *metrics)
        dockerd = module_components.dockerd(txgraph.name)
        stack = Stack(txgraph, dockerd)
        stack.backend = "rbd"
        stacks.append(stack)
    return stacks[0], stacks[1], namespace


def rbd_cli(cluster: DevCluster, *args: str) -> str:
    """
    The rbd command line as the cluster's admin; its output (it must succeed).
    """
    import subprocess

    result = subprocess.run(
        ["rbd", "-c", cluster.conf, "--keyring", cluster.keyring, *args],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"rbd {' '.join(args)}: {result.stderr}"
    return result.stdout


def pool_images(cluster: DevCluster, namespace: str) -> list[str]:
    """
    C{rbd ls} of a namespace, sorted.
    """
    import json

    return sorted(json.loads(rbd_cli(cluster, "ls", "--format", "json", f"{cluster.pool}/{namespace}")))


def node_gc(stack: Stack, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """
    txgraph-admin gc --json of a stack against its dockerd's layer store,
    with no grace period: the exit code (0 or 1) and the findings.
    """
    import json

    from txgraphd import admin

    result = admin(
        stack.txgraph.state_dir, "gc", "--json", "--docker-root", str(stack.dockerd.data_root),
        "--driver", stack.txgraph.name, "--min-age", "0", *args,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)["findings"]


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """
    One isolated containerd 1.6 for the whole session (its own config.toml,
    root, state and sockets; no CRI).  Tests isolate themselves with
    containerd namespaces.
    """
    if not os.access("/usr/bin/containerd", os.X_OK):
        pytest.skip("containerd is not installed")
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """
    One local registry (Debian's docker-registry) on 127.0.0.1 for the session.
    """
    if not Registry.available():
        pytest.skip("docker-registry is not installed")
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
