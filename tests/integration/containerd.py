"""Run a real, isolated containerd (and a local registry) for the integration tests.

:class:`Containerd` starts Debian's containerd 1.6 (the one docker.io brings)
with a ``config.toml`` (version 2) it writes itself: its own root, state,
gRPC and ttrpc sockets, no debug or metrics listener, the CRI plugin
disabled unless asked for, and optional ``[proxy_plugins.NAME]`` sections
for external snapshotters such as txgraph.

With ``cri_snapshotter=NAME`` the CRI plugin runs, unpacking what
Kubernetes' ``PullImage`` pulls with snapshotter ``NAME`` (in containerd
namespace ``k8s.io``).  That is the pull path on which containerd's
unpacker labels layer snapshots ``containerd.io/snapshot.ref`` (``ctr
images pull/import`` do not), and Debian 12 has no nerdctl or crictl to
take it: :meth:`Containerd.cri_pull` calls ``PullImage`` itself, over
containerd's socket, with :mod:`txgraph.testing.cri_proto`.  The CRI plugin
gets its own (empty) CNI directories, so it never reads the host's
``/etc/cni``, and a ``hosts.toml`` per plain-HTTP registry
(``plain_http_registries``) in its own ``config_path``.  It never touches the host's /run/containerd
socket or /var/lib/containerd; the one shared place is containerd 1.6's
shim socket directory ``/run/containerd/s``, where every shim socket's name
is a hash of our own socket path (so nothing collides), and the sockets a
killed shim leaves there are removed.

Processes are handled by PID, pinned to their start time (``dockerd``'s
:class:`~dockerd.ProcessHandle`): containerd itself and its shims, which
detach from it and are found by our socket path on their command line.

:class:`Registry` runs Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1 with its own config and storage directory, for push and pull
tests (``ctr images push/pull --plain-http``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from dockerd import (
    DAEMON_PATH,
    SHIM_SOCKET_DIR,
    DockerCommandError,
    ProcessHandle,
    _all_pids,
    _cmdline,
    _descendants,
    _wait_gone,
    mounts_under,
    unmount_under,
)

from txgraph.testing.cri_proto import api_pb2, api_pb2_grpc

CONTAINERD: Final = "/usr/bin/containerd"
CTR: Final = "/usr/bin/ctr"
REGISTRY: Final = "/usr/bin/docker-registry"

#: The plugin ``disabled_plugins`` turns off: Kubernetes' CRI service.
CRI_PLUGIN: Final = "io.containerd.grpc.v1.cri"
#: The containerd namespace the CRI plugin keeps its images, snapshots and containers in.
CRI_NAMESPACE: Final = "k8s.io"


class ContainerdError(RuntimeError):
    """containerd (or the registry) failed to start or stop; the message carries its log tail."""


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 for c in escaped):
        raise ValueError(f"control character in TOML string {value!r}")
    return f'"{escaped}"'


def _log_tail(path: Path, offset: int, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(offset, end - size))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _spawn(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], ProcessHandle, int]:
    """Start a daemon in its own session, logging to ``log_path``; (process,
    handle, the log offset its output starts at)."""
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, close_fds=True,
        )
    return process, ProcessHandle.of(process.pid) or ProcessHandle(process.pid, -1), offset


def _terminate(
    handle: ProcessHandle | None, process: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """SIGTERM the daemon (SIGKILL after ``timeout`` s) and reap it."""
    if handle is not None and handle.alive():
        handle.signal(signal.SIGTERM)
        if _wait_gone([handle], timeout):
            handle.signal(signal.SIGKILL)
            _wait_gone([handle], 10)
    if process is not None and process.poll() is None:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class Containerd:
    """One isolated containerd for a test session, driven by PID.

    ``base_dir`` holds containerd's root (``base_dir/root``), its
    ``config.toml`` and its log (``base_dir/containerd.log``, kept after
    :meth:`cleanup`).  The state directory and the sockets live in a private
    directory under ``/run`` (short: the shim and ttrpc socket paths must fit
    in a unix socket address).

    ``proxy_plugins`` maps a name to the unix socket of an external
    snapshotter; each becomes ``[proxy_plugins.NAME] type = "snapshot"``, so
    ``ctr --snapshotter NAME`` and the Snapshots service with
    ``snapshotter = NAME`` reach it.

    ``cri_snapshotter`` enables the CRI plugin with that snapshotter (its
    ``[plugins."io.containerd.grpc.v1.cri".containerd] snapshotter``);
    ``plain_http_registries`` (``HOST:PORT``) are then reached over plain
    HTTP, through ``hosts.toml`` files under ``base_dir/certs.d`` (the CRI
    registry ``config_path``).  CNI's ``bin_dir`` and ``conf_dir`` are empty
    directories under ``base_dir/cni``: image pulls need no network, and
    the host's CNI configuration is never read.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        proxy_plugins: Mapping[str, Path | str] | None = None,
        namespace: str = "txgraph-test",
        debug: bool = False,
        run_parent: Path | str = "/run",
        cri_snapshotter: str | None = None,
        plain_http_registries: Sequence[str] = (),
    ) -> None:
        if plain_http_registries and cri_snapshotter is None:
            raise ValueError("plain_http_registries configure the CRI plugin: give cri_snapshotter")
        for host in plain_http_registries:
            if not host or "/" in host or host.startswith("."):
                raise ValueError(f"plain_http_registries: {host!r} is not a HOST:PORT")
        self.base_dir = Path(base_dir).resolve()
        self.root = self.base_dir / "root"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.proxy_plugins = {name: Path(path) for name, path in (proxy_plugins or {}).items()}
        self.cri_snapshotter = cri_snapshotter
        self.plain_http_registries = tuple(plain_http_registries)
        self.cni_dir = self.base_dir / "cni"
        self.registry_config_path = self.base_dir / "certs.d"
        self.namespace = namespace
        self.debug = debug
        self._run_parent = Path(run_parent)
        self.run_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._handle: ProcessHandle | None = None
        self._log_offset = 0

    # -- paths ---------------------------------------------------------------

    def _require_run_dir(self) -> Path:
        if self.run_dir is None:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir = Path(tempfile.mkdtemp(prefix="txgc-", dir=self._run_parent))
        return self.run_dir

    @property
    def state(self) -> Path:
        """containerd's ``state`` directory (tasks' bundles, fifos)."""
        return self._require_run_dir() / "state"

    @property
    def address(self) -> Path:
        """The gRPC socket (``ctr --address``, the Snapshots service)."""
        return self._require_run_dir() / "containerd.sock"

    @property
    def ttrpc_address(self) -> Path:
        """The ttrpc socket (shims call back on it)."""
        return self._require_run_dir() / "containerd.sock.ttrpc"

    @property
    def pid(self) -> int | None:
        """containerd's PID while it runs, else None."""
        return self._handle.pid if self._handle and self._handle.alive() else None

    def running(self) -> bool:
        """True while the containerd started by :meth:`start` is alive."""
        return self.pid is not None

    def config_toml(self) -> str:
        """The ``config.toml`` :meth:`start` writes (version 2)."""
        lines = [
            "# written by txgraph's test harness (tests/integration/containerd.py)",
            "version = 2",
            f"root = {_toml_string(str(self.root))}",
            f"state = {_toml_string(str(self.state))}",
            (
                "disabled_plugins = []"
                if self.cri_snapshotter is not None
                else f"disabled_plugins = [{_toml_string(CRI_PLUGIN)}]"
            ),
            "",
            "[grpc]",
            f"  address = {_toml_string(str(self.address))}",
            "",
            "[ttrpc]",
            f"  address = {_toml_string(str(self.ttrpc_address))}",
            "",
            "[debug]",
            '  address = ""',
            f"  level = {_toml_string('debug' if self.debug else 'info')}",
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_string(str(self.root / 'opt'))}",
        ]
        if self.cri_snapshotter is not None:
            cri = f"[plugins.{_toml_string(CRI_PLUGIN)}"
            lines += [
                "",
                f"{cri}]",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                "  enable_selinux = false",
                "  netns_mounts_under_state_dir = true",
                "",
                f"{cri}.containerd]",
                f"  snapshotter = {_toml_string(self.cri_snapshotter)}",
                "",
                f"{cri}.cni]",
                f"  bin_dir = {_toml_string(str(self.cni_dir / 'bin'))}",
                f"  conf_dir = {_toml_string(str(self.cni_dir / 'net.d'))}",
                "",
                f"{cri}.registry]",
                f"  config_path = {_toml_string(str(self.registry_config_path))}",
            ]
        for name, path in sorted(self.proxy_plugins.items()):
            lines += [
                "",
                f"[proxy_plugins.{_toml_string(name)}]",
                '  type = "snapshot"',
                f"  address = {_toml_string(str(path))}",
            ]
        return "\n".join(lines) + "\n"

    def hosts_toml(self, host: str) -> str:
        """The ``hosts.toml`` that sends pulls of ``host``'s images to it over plain HTTP."""
        server = _toml_string(f"http://{host}")
        return (
            "# written by txgraph's test harness (tests/integration/containerd.py)\n"
            f"server = {server}\n\n"
            f"[host.{server}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )

    def _write_cri_files(self) -> None:
        for directory in (self.cni_dir / "bin", self.cni_dir / "net.d", self.registry_config_path):
            directory.mkdir(parents=True, exist_ok=True)
        for host in self.plain_http_registries:
            (self.registry_config_path / host).mkdir(exist_ok=True)
            (self.registry_config_path / host / "hosts.toml").write_text(self.hosts_toml(host))

    # -- processes -------------------------------------------------------------

    def shims(self) -> list[ProcessHandle]:
        """Live shims of this containerd (found by our socket path in their argv)."""
        address = str(self.address)
        found = []
        for pid in _all_pids():
            argv = _cmdline(pid)
            if argv and "containerd-shim" in os.path.basename(argv[0]) and address in argv:
                handle = ProcessHandle.of(pid)
                if handle is not None:
                    found.append(handle)
        return found

    def processes(self) -> list[ProcessHandle]:
        """containerd and its shims, while alive (for assertions)."""
        handles = ([self._handle] if self._handle else []) + self.shims()
        return [h for h in handles if h.alive()]

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start containerd and wait until ``ctr version`` answers.

        On failure containerd is stopped and :class:`ContainerdError` raised
        with the log's tail.
        """
        if self.running():
            raise ContainerdError(f"containerd already running as PID {self.pid}")
        self._require_run_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.cri_snapshotter is not None:
            self._write_cri_files()
        self.config_path.write_text(self.config_toml())
        self._process, self._handle, self._log_offset = _spawn(
            [CONTAINERD, "--config", str(self.config_path)], self.log_path,
            {**os.environ, "PATH": DAEMON_PATH},
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._process.poll() is not None:
                    raise ContainerdError(
                        f"containerd exited with {self._process.returncode} during start"
                    )
                if self.address.exists():
                    result = self.ctr("version", check=False, timeout=10)
                    if result.returncode == 0 and (
                        self.cri_snapshotter is None or self._cri_ready()
                    ):
                        return
                if time.monotonic() > deadline:
                    raise ContainerdError(f"containerd did not answer within {timeout:.0f} s")
                time.sleep(0.1)
        except BaseException as error:
            self.stop(timeout=10)
            if isinstance(error, ContainerdError):
                raise ContainerdError(
                    f"{error}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
                ) from None
            raise

    def log_tail(self, size: int = 6000) -> str:
        """The end of the log written since the last :meth:`start`."""
        return _log_tail(self.log_path, self._log_offset, size)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM containerd (SIGKILL after ``timeout`` s); then kill any shim left.

        containerd 1.6 leaves running tasks' shims alive when it stops (they
        are meant to outlive it); the harness SIGKILLs them and their
        containers, and removes their sockets from ``/run/containerd/s``.
        Does not unmount or remove anything: see :meth:`cleanup`.
        """
        shims = self.shims()
        _terminate(self._handle, self._process, timeout)
        self._handle = None
        self._kill_shims([*dict.fromkeys([*shims, *self.shims()])])

    def _kill_shims(self, shims: Sequence[ProcessHandle]) -> None:
        sockets = [self._shim_socket(h) for h in shims]
        tree = list(shims)
        for pid in _descendants(h.pid for h in shims if h.alive()):
            handle = ProcessHandle.of(pid)
            if handle is not None:
                tree.append(handle)
        for handle in tree:
            handle.signal(signal.SIGKILL)
        survivors = _wait_gone(tree, 10)
        for path in sockets:
            if path is not None:
                path.unlink(missing_ok=True)
        if survivors:
            raise ContainerdError(f"processes survived SIGKILL: {[h.pid for h in survivors]}")

    def _shim_socket(self, shim: ProcessHandle) -> Path | None:
        """The socket a runc v2 shim serves: containerd 1.6 names it
        ``/run/containerd/s/<sha256(<containerd socket>/<namespace>/<id>)>``."""
        argv = _cmdline(shim.pid)
        try:
            namespace = argv[argv.index("-namespace") + 1]
            container = argv[argv.index("-id") + 1]
        except (ValueError, IndexError):
            return None
        digest = hashlib.sha256(f"{self.address}/{namespace}/{container}".encode()).hexdigest()
        return SHIM_SOCKET_DIR / digest

    def cleanup(self, *, keep_log: bool = True) -> None:
        """Stop containerd, unmount what it left (deepest first), remove its directories.

        The log and config in ``base_dir`` are kept unless ``keep_log`` is false.
        """
        self.stop()
        roots = [self.root] + ([self.run_dir] if self.run_dir else [])
        unmount_under(*roots)
        for root in roots:
            if mounts_under(root):
                raise ContainerdError(f"refusing to remove {root}: still mounted")
            if root.exists():
                shutil.rmtree(root)
        self.run_dir = None
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

    # -- the ctr CLI ---------------------------------------------------------

    def ctr(
        self,
        *args: str | os.PathLike[str],
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <ours> --namespace <ns> ARGS`` and capture its output.

        With ``check`` a non-zero exit raises :class:`~dockerd.DockerCommandError`
        (its message shows stdout and stderr).
        """
        argv = [
            CTR, "--address", str(self.address),
            "--namespace", namespace or self.namespace,
            *(os.fspath(arg) for arg in args),
        ]
        result = subprocess.run(
            argv, input=input, stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PATH": DAEMON_PATH},
        )
        if check and result.returncode != 0:
            raise DockerCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def import_image(
        self,
        tarball: Path,
        *,
        snapshotter: str = "overlayfs",
        namespace: str | None = None,
        timeout: float = 300.0,
    ) -> list[str]:
        """``ctr images import`` a ``docker save`` tarball (tests/integration/images.py)
        and unpack it for ``snapshotter``; returns the image names it created."""
        before = set(self.image_names(namespace=namespace))
        self.ctr(
            "images", "import", "--snapshotter", snapshotter, str(tarball),
            namespace=namespace, timeout=timeout,
        )
        return sorted(set(self.image_names(namespace=namespace)) - before) or sorted(before)

    # -- Kubernetes' CRI --------------------------------------------------------

    def _cri_call(self, method: str, request: object, timeout: float) -> object:
        """Call the CRI ImageService's ``method`` on containerd's socket."""
        if self.cri_snapshotter is None:
            raise ContainerdError("the CRI plugin is disabled: give Containerd(cri_snapshotter=...)")
        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            stub = api_pb2_grpc.ImageServiceStub(channel)
            result: object = getattr(stub, method)(request, timeout=timeout)
            return result

    def _cri_ready(self) -> bool:
        """Whether the CRI plugin answers (it serves "server is not initialized
        yet" until its start-up is done)."""
        try:
            self._cri_call("ListImages", api_pb2.ListImagesRequest(), 5)
        except grpc.RpcError:
            return False
        return True

    def cri_pull(self, image: str, *, timeout: float = 120.0) -> str:
        """Pull ``image`` as the kubelet does (CRI ``PullImage`` on containerd's
        socket): fetched and unpacked by containerd's pull-time unpacker with
        the ``cri_snapshotter``, in namespace ``k8s.io``.  Returns the image
        reference CRI answers (the image ID, ``sha256:<config digest>``)."""
        reply = self._cri_call(
            "PullImage", api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout
        )
        assert isinstance(reply, api_pb2.PullImageResponse)
        return reply.image_ref

    def cri_image_status(self, image: str) -> api_pb2.Image | None:
        """CRI ``ImageStatus`` of ``image``: its Image, or None if containerd has none."""
        reply = self._cri_call(
            "ImageStatus", api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), 30
        )
        assert isinstance(reply, api_pb2.ImageStatusResponse)
        return reply.image if reply.HasField("image") else None

    def cri_remove_image(self, image: str) -> None:
        """CRI ``RemoveImage`` (idempotent: an absent image is no error)."""
        self._cri_call(
            "RemoveImage", api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)), 60
        )

    def image_names(self, *, namespace: str | None = None) -> list[str]:
        """The image names in ``namespace`` (``ctr images ls -q``)."""
        return self.ctr("images", "ls", "-q", namespace=namespace).stdout.split()

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


@dataclass(frozen=True)
class PushedImage:
    """An image in the local registry: its reference and its layers' chain IDs."""

    reference: str
    chain_ids: list[str]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs of the layers (image-spec identity.ChainIDs)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def registry_json(registry: Registry, path: str, accept: str) -> Any:
    """A JSON document of the registry's API (``/v2/<path>``)."""
    request = urllib.request.Request(
        f"http://{registry.host}/v2/{path}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


def push_image(
    containerd: Containerd, registry: Registry, tarball: Path, repository: str
) -> PushedImage:
    """A ``docker save`` tarball imported into ``containerd`` (a namespace of
    its own) and pushed over plain HTTP to ``registry`` as
    ``<repository>:<pid>``; its chain IDs read back from the registry."""
    tag = str(os.getpid())
    namespace = f"push-{repository.replace('/', '-')}-{tag}"
    [local] = containerd.import_image(tarball, namespace=namespace)
    reference = f"{registry.host}/{repository}:{tag}"
    containerd.ctr("images", "tag", "--force", local, reference, namespace=namespace)
    containerd.ctr("images", "push", "--plain-http", reference, namespace=namespace, timeout=600)
    manifest = registry_json(
        registry, f"{repository}/manifests/{tag}",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    config = registry_json(registry, f"{repository}/blobs/{manifest['config']['digest']}", "*/*")
    return PushedImage(reference, chain_ids(config["rootfs"]["diff_ids"]))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1, with its own config and storage.

    ``host`` (``127.0.0.1:PORT``) prefixes image references pushed to it;
    clients need plain HTTP (``ctr ... --plain-http``).
    """

    def __init__(self, base_dir: Path | str, *, port: int | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.storage = self.base_dir / "storage"
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._handle: ProcessHandle | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, once started."""
        if self.port is None:
            raise ContainerdError("the registry has no port before start()")
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        """Whether Debian's docker-registry is installed."""
        return os.access(REGISTRY, os.X_OK)

    def config_yml(self) -> str:
        """The registry's configuration (JSON is valid YAML: no quoting surprises)."""
        config = {
            "version": 0.1,
            "log": {"level": "info", "fields": {"service": "txgraph-test-registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host},
        }
        return json.dumps(config, indent=2) + "\n"

    def _ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 20.0) -> None:
        """Start the registry and wait until ``GET /v2/`` answers 200."""
        if self._handle is not None and self._handle.alive():
            raise ContainerdError(f"registry already running as PID {self._handle.pid}")
        if self.port is None:
            self.port = free_port()
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_yml())
        self._process, self._handle, self._log_offset = _spawn(
            [REGISTRY, "serve", str(self.config_path)], self.log_path
        )
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ContainerdError(
                    f"docker-registry did not answer on {self.host}\n"
                    f"--- {self.log_path} (tail) ---\n{_log_tail(self.log_path, self._log_offset, 4000)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the registry (SIGKILL after ``timeout`` s) and reap it."""
        _terminate(self._handle, self._process, timeout)
        self._handle = None

    def cleanup(self) -> None:
        """Stop the registry and remove its storage (the log is kept)."""
        self.stop()
        if self.storage.exists():
            shutil.rmtree(self.storage)
