"""
C{twistd txgraph}: command-line options and the service tree.

Start-up, in order: take the state directory's lock (one txgraph per state
directory), open and upgrade the database, configure and check the backend
(command-line options, overridden by the storage options dockerd sent at
Init and txgraph persisted), start the backend thread pool and the database
thread, listen on the plugin socket, then restore every layer and recover
what a crash left in flight.  Requests that arrive before that finishes
wait for it; dockerd itself waits for the socket.  Anything wrong up to
listening stops the start with an error naming it.

With C{--listen systemd:domain=UNIX:index=0}, the plugin socket is the one
a systemd socket unit made and passed (L{txgraph.systemd.activation}):
txgraph checks its mode and owner instead of setting them, and leaves it
in place when it stops, so systemd keeps it open across restarts.

With C{--containerd-listen unix:PATH}, containerd's snapshotter protocol
is served on that socket too (L{txgraph.api.containerd.server}), on the
same layers; C{--listen none} turns the graph driver socket off, for a
node served only to containerd.  After the layers' recovery, the
containerd snapshots are checked against them (L{Snapshotter.start}).

With C{--metrics-listen ENDPOINT}, metrics are counted (L{txgraph.metrics})
and served at C{/metrics} on that endpoint (L{txgraph.api.metrics}) and on
the admin socket, for C{txgraph-admin top}; without it, nothing is counted.
"""

from __future__ import annotations

import grp
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from txgraph import __version__, faults, metrics
from txgraph.admin.service import AdminAPI
from txgraph.api.containerd import socket_path
from txgraph.api.graphdriver import GraphDriverAPI
from txgraph.api.site import PluginSite, UnixSocketRequest
from txgraph.backends import parse_options
from txgraph.backends.catalog import BACKEND_NAMES, backend_class
from txgraph.driver import Driver, watch_reactor_lag
from txgraph.errors import ConfigurationError, TxgraphError
from txgraph.snapshotter import Snapshotter
from txgraph.statedir import StateDirLock, open_driver, open_snapshotter
from txgraph.store import DatabaseThread
from txgraph.systemd.activation import (
    SOCKET_MODE,
    InheritedSocket,
    InheritedUnixEndpoint,
    inherited_socket,
)

if TYPE_CHECKING:
    from txgraph.api.containerd.server import ContainerdServer

log = Logger()

DEFAULT_LISTEN = "unix:/run/docker/plugins/txgraph.sock:mode=660:lockfile=1"
DEFAULT_STATE_DIR = "/var/lib/txgraph"


def _endpoint_fields(description: str) -> list[str]:
    """
    A Twisted endpoint description split on its unescaped colons, with the
    backslash escapes removed.
    """
    fields: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def plugin_endpoint(
    description: str, socket_group: str | None = None
) -> tuple[str, int, InheritedSocket | None]:
    """
    Check C{--listen} and return the description to listen with, the
    socket's mode, and the socket systemd passed for a C{systemd:} one.
    The plugin socket lets its users mount and write layers as root, so it
    must be a UNIX socket that only root and C{--socket-group} can open:
    C{mode=} may be at most 0660, and is 0660 when not given (Twisted's own
    default is 0666); a socket systemd made must already be so
    (L{inherited_socket}).  Anything else is a L{ValueError} saying what is
    wrong.
    """
    fields = _endpoint_fields(description)
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if fields[0] == "systemd":
        inherited = inherited_socket(global_reactor, description, options, socket_group)
        return description, inherited.mode, inherited
    if fields[0].lower() != "unix":
        raise ValueError(
            f"the plugin socket must be a UNIX socket (unix:PATH... or "
            f"systemd:domain=UNIX:index=N), not {fields[0]!r}: "
            "anyone who reaches it can mount and write layers as root"
        )
    mode = SOCKET_MODE
    if "mode" in options:
        try:
            mode = int(options["mode"], 8)
        except ValueError:
            raise ValueError(f"mode={options['mode']} is not an octal file mode") from None
        if mode & ~SOCKET_MODE:
            raise ValueError(
                f"mode={options['mode']} would let users other than root and --socket-group "
                "open the plugin socket, which mounts and writes layers as root; give "
                "mode=660 or stricter"
            )
    else:
        description += f":mode={SOCKET_MODE:o}"
    try:
        serverFromString(global_reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(str(e)) from None
    return description, mode, None


def _backend_flags() -> list[list[Any]]:
    flags = []
    for name in BACKEND_NAMES:
        try:
            cls = backend_class(name)
        except ConfigurationError:
            continue
        for option in cls.options:
            flags.append(
                [
                    f"{name}-{option.key.replace('_', '-')}",
                    None,
                    None,
                    f"{option.help} (storage-opt txgraph.{name}.{option.key}; "
                    f"default: {option.default!r})",
                ]
            )
    return flags


class Options(usage.Options):
    """
    C{twistd txgraph} options.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve the txgraph Docker graph driver plugin. Start dockerd with "
        "--experimental -s txgraph once it is listening."
    )
    optParameters = [
        [
            "listen",
            None,
            DEFAULT_LISTEN,
            "Twisted server endpoint to serve the plugin protocol on; dockerd "
            "finds the plugin NAME at /run/docker/plugins/NAME.sock; 'none': no graph "
            "driver socket (containerd only)",
        ],
        [
            "containerd-listen",
            None,
            None,
            "serve containerd's snapshotter protocol (a proxy plugin) on this UNIX "
            "socket, e.g. unix:/run/txgraph/snapshotter.sock (default: off)",
        ],
        [
            "state-dir",
            None,
            DEFAULT_STATE_DIR,
            "directory for the state database and the backend's local state",
        ],
        ["backend", None, "overlay", f"storage backend: {', '.join(BACKEND_NAMES)}"],
        [
            "socket-group",
            None,
            None,
            "group that may use the plugin socket (default: root only)",
        ],
        ["threads", None, 16, "size of the backend thread pool", int],
        [
            "metrics-listen",
            None,
            None,
            "serve Prometheus metrics at /metrics on this Twisted server endpoint, e.g. "
            "tcp:9495:interface=127.0.0.1 (default: off, and nothing is counted)",
        ],
    ] + _backend_flags()

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"txgraph {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["threads"] < 1:
            raise usage.UsageError("--threads must be at least 1")
        if self["containerd-listen"] is not None:
            try:
                socket_path(self["containerd-listen"])
            except ConfigurationError as e:
                raise usage.UsageError(e.message) from None
        elif self["listen"] == "none":
            raise usage.UsageError(
                "--listen none leaves nothing to serve: give --containerd-listen too"
            )
        if self["metrics-listen"] is not None:
            try:
                serverFromString(global_reactor, self["metrics-listen"])
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(
                    f"invalid --metrics-listen {self['metrics-listen']!r}: {e}"
                ) from None
        self["inherited-socket"] = None
        if self["listen"] != "none":
            try:
                self["listen"], self["socket-mode"], self["inherited-socket"] = plugin_endpoint(
                    self["listen"], self["socket-group"]
                )
            except ValueError as e:
                raise usage.UsageError(f"invalid --listen {self['listen']!r}: {e}") from None
        try:
            cls = backend_class(self["backend"])
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None
        prefix = f"{cls.name}-"
        values = {
            key[len(prefix) :].replace("-", "_"): value
            for key, value in self.items()
            if key.startswith(prefix) and value is not None
        }
        for other in BACKEND_NAMES:
            if other == cls.name:
                continue
            for key, value in self.items():
                if key.startswith(f"{other}-") and value is not None:
                    raise usage.UsageError(
                        f"--{key} is an option of the {other} backend, not of "
                        f"--backend {cls.name}"
                    )
        try:
            parse_options(cls, values)
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None
        self["backend-options"] = values


class TxgraphService(Service):
    """
    The whole daemon: database, backend, driver, and the plugin socket.
    """

    def __init__(self, options: Options, reactor: Any = None) -> None:
        self.options = options
        self.reactor: Any = reactor if reactor is not None else global_reactor
        self.state_dir = os.path.abspath(options["state-dir"])
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self.driver: Driver | None = None
        self.snapshotter: Snapshotter | None = None
        self.containerd: ContainerdServer | None = None
        self._lock = StateDirLock(self.state_dir)
        self._pool = ThreadPool(
            minthreads=0, maxthreads=options["threads"], name="txgraph-backend"
        )
        self._dbthread = DatabaseThread(self.reactor)  # type: ignore[arg-type]
        self._stop_lag_watch: Any = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        """
        Start synchronously up to listening; restore state asynchronously.
        """
        super().startService()
        try:
            armed = faults.arm_from_environment()
            if armed:
                log.warn(
                    "TEST ONLY: txgraph will kill itself at crash point(s) {points}",
                    points=", ".join(sorted(armed)),
                )
            self._start()
        except ValueError as e:
            log.critical("txgraph cannot start: {error}", error=e)
            raise SystemExit(f"txgraph: {e}") from None
        except TxgraphError as e:
            log.critical("txgraph cannot start: {error}", error=e.message)
            raise SystemExit(f"txgraph: {e.message}") from None

    def _start(self) -> None:
        listen = self.options["listen"]
        if self.options.get("metrics-listen") is not None:
            # Before any front end starts: they record only while it is on.
            metrics.enable()
        self._endpoint: Any = None
        inherited = self.options.get("inherited-socket")
        if inherited is not None:
            self._endpoint = InheritedUnixEndpoint(self.reactor, inherited)
        elif listen != "none":
            try:
                self._endpoint = serverFromString(self.reactor, listen)
            except (ValueError, KeyError) as e:
                raise ConfigurationError(f"invalid --listen {listen!r}: {e}") from None
        self.driver = open_driver(
            self.reactor,
            self.state_dir,
            self.options["backend"],
            dict(self.options["backend-options"]),
            self._lock,
            self._pool,
            self._dbthread,
        )
        self.reactor.addSystemEventTrigger("after", "shutdown", self._pool.stop)
        self.snapshotter = open_snapshotter(self.driver)
        try:
            if self._endpoint is not None:
                self._listen()
            containerd = self.options["containerd-listen"]
            if containerd is not None:
                # grpcio only when serving containerd (see txgraph.api.containerd).
                from txgraph.api.containerd.server import ContainerdServer

                self.containerd = ContainerdServer(
                    self.snapshotter, self.reactor, socket_path(containerd),
                    self.options["socket-group"],
                )
                self.containerd.start()
            self._listen_admin()
            if self.options.get("metrics-listen") is not None:
                self._listen_metrics()
        except BaseException:
            # Threads would keep a failed start's process alive.
            self._pool.stop()
            self._dbthread.stop()
            raise
        self._stop_lag_watch = watch_reactor_lag(self.driver, self.reactor)
        d = ensureDeferred(self._restore())
        d.addCallbacks(self.ready.callback, self._recoveryFailed)

    async def _restore(self) -> None:
        assert self.driver is not None and self.snapshotter is not None
        await self.driver.start()
        await self.snapshotter.start()

    def _listen_admin(self) -> None:
        assert self.driver is not None
        path = os.path.join(self.state_dir, "admin.sock")
        endpoint = serverFromString(self.reactor, f"unix:{path}:mode=600:lockfile=1")
        self.admin_api = AdminAPI(self.driver, self.snapshotter)
        site = Site(self.admin_api.app.resource())
        site.requestFactory = UnixSocketRequest
        d = endpoint.listen(site)

        def listening(port: IListeningPort) -> None:
            self.admin_port = port
            # Root's only, whatever the umask or an earlier owner made it.
            os.chown(path, 0, 0)
            os.chmod(path, 0o600)

        def failed(failure: Any) -> None:
            log.critical(
                "txgraph cannot listen on its admin socket {path}: {error}",
                path=path,
                error=failure.getErrorMessage(),
            )
            self._fatal()

        d.addCallbacks(listening, failed)

    def _listen_metrics(self) -> None:
        from txgraph.api.metrics import StateCollector, metrics_site, render

        assert self.driver is not None
        recorder = metrics.enable()
        backend = self.driver.backend
        collector = StateCollector(
            self.driver,
            self.snapshotter,
            # Remote storage only: the rbd backend's mappings count reads.
            backend.sync.cluster_reads if backend.shares_layers else None,
        )
        recorder.registry.register(collector)  # type: ignore[arg-type]
        description = self.options["metrics-listen"]
        pool = self.reactor.getThreadPool()

        def run_in_thread(f: Callable[[], bytes]) -> Deferred[bytes]:
            return deferToThreadPool(self.reactor, pool, f)

        # The admin socket serves the same text, for txgraph-admin top.
        self.admin_api.render_metrics = lambda: render(recorder, collector, run_in_thread)
        site = metrics_site(recorder, collector, run_in_thread)
        d = serverFromString(self.reactor, description).listen(site)

        def listening(port: IListeningPort) -> None:
            self.metrics_port = port
            host: Any = port.getHost()
            address = (
                f"http://{host.host}:{host.port}" if isinstance(host, IPv4Address) else str(host)
            )
            log.info("txgraph serving metrics at {address}/metrics", address=address)

        def failed(failure: Any) -> None:
            log.critical(
                "txgraph cannot listen on --metrics-listen {listen}: {error}",
                listen=description,
                error=failure.getErrorMessage(),
            )
            self._fatal()

        d.addCallbacks(listening, failed)

    def _listen(self) -> None:
        listen = self.options["listen"]
        if listen.startswith("unix:"):
            address = listen[5:].split(":")[0]
            if address.startswith("address="):
                address = address[len("address=") :]
            os.makedirs(os.path.dirname(address) or ".", mode=0o755, exist_ok=True)
        assert self.driver is not None
        api = GraphDriverAPI(self.driver, self.reactor)
        site = PluginSite(api)
        d = self._endpoint.listen(site)
        d.addCallbacks(self._listening, self._listenFailed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        group = self.options["socket-group"]
        address = getattr(port.getHost(), "name", None)
        if address and self.options.get("inherited-socket") is None:
            gid = 0
            if group:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    log.critical("--socket-group {group}: no such group", group=group)
                    self._fatal()
                    return
            # Root and --socket-group only (Twisted made it the endpoint's
            # mode, at most 0660, before it listened).
            os.chown(address, 0, gid)
            os.chmod(address, self.options.get("socket-mode", SOCKET_MODE))
        if isinstance(address, bytes):
            address = address.decode(errors="replace")
        log.info("txgraph {version} listening on {address}", version=__version__,
                 address=address or self.options["listen"])

    def _listenFailed(self, failure: Any) -> None:
        log.critical(
            "txgraph cannot listen on {listen}: {error}",
            listen=self.options["listen"],
            error=failure.getErrorMessage(),
        )
        self._fatal()

    def _recoveryFailed(self, failure: Any) -> None:
        log.failure("txgraph could not restore its state", failure)
        self._fatal()

    def _fatal(self) -> None:
        # twistd exits 0 when the reactor stops; a failed start must not.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None] | None:
        """
        Stop listening, unmap the devices kept after a last Put, let the
        database thread finish, release the lock.
        """
        super().stopService()
        if self._stop_lag_watch is not None:
            self._stop_lag_watch()
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())

        def finish(result: object) -> object:
            self._dbthread.stop()
            if self.driver is not None:
                self.driver.backend.stop_now()
            self._lock.release()
            return result

        d.addBoth(finish)
        return d

    async def _stop(self) -> None:
        if self.containerd is not None:
            self.containerd.stop()
        for port in (self.port, self.admin_port, self.metrics_port):
            if port is not None:
                stopped = port.stopListening()
                if stopped is not None:
                    await stopped
        if self.driver is not None and self.driver.ready.called:
            # Devices kept after a last Put are unmapped now rather than by
            # the next start's recovery.
            await self.driver.registry.release_all()


def makeService(options: Options) -> MultiService:
    """
    Build the daemon's service tree.
    """
    top = MultiService()
    TxgraphService(options).setServiceParent(top)
    return top
