"""
The plugin socket inherited from systemd (C{--listen
systemd:domain=UNIX:index=0}, or C{name=} for a C{FileDescriptorName}).

systemd made this socket, with the unit's C{SocketMode=}, C{SocketUser=}
and C{SocketGroup=}, and keeps it open while txgraph restarts: dockerd's
calls wait in its backlog instead of failing.  So txgraph checks the
socket instead of setting its mode (whoever can open it mounts and
writes layers as root) and leaves the file alone when it stops.

Twisted's own C{systemd:} endpoint does neither: its UNIX port chmods the
inherited socket to 0666 when it starts listening, and when it stops it
calls C{shutdown()} on the socket (which stops the listening socket
systemd shares with it) and unlinks the file (Twisted 26.10, measured
under C{systemd-socket-activate}).  That would open the plugin to every
user and break every later activation.  L{InheritedUnixEndpoint} adopts the
descriptor Twisted's endpoint parser found, without either.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from twisted.internet import fdesc, tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

#: The widest mode the plugin socket may have: root and the socket's group.
SOCKET_MODE = 0o660


@dataclass(frozen=True)
class InheritedSocket:
    """
    A listening UNIX stream socket systemd passed to txgraph, checked.

    @ivar fd: its descriptor (closed once txgraph listens on it).
    @ivar path: its file.
    @ivar mode: the file's permission bits.
    """

    fd: int
    path: str
    mode: int


def _group_gid(group: str | None) -> int:
    if not group:
        return 0
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group {group}: no such group") from None


def inherited_socket(
    reactor: Any, description: str, options: dict[str, str], socket_group: str | None
) -> InheritedSocket:
    """
    Find and check the socket a C{systemd:} C{--listen} names: a UNIX
    stream socket systemd passed (C{LISTEN_FDS}, C{LISTEN_PID} and
    C{LISTEN_FDNAMES}), listening on a file owned by root, in the group
    root or C{--socket-group}, of mode 0660 or stricter.  Anything else is
    a L{ValueError} naming what is wrong and the unit setting to fix.
    """
    unknown = sorted(set(options) - {"domain", "index", "name"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} of a systemd: endpoint")
    domain = options.get("domain")
    if domain != "UNIX":
        raise ValueError(
            f"the plugin socket must be a UNIX socket (systemd:domain=UNIX:...), not "
            f"domain={domain}: anyone who reaches it can mount and write layers as root"
        )
    if ("index" in options) == ("name" in options):
        raise ValueError("give exactly one of index=N and name=NAME")
    which = f"index {options['index']}" if "index" in options else f"name {options['name']!r}"
    try:
        endpoint = serverFromString(reactor, description)
    except (IndexError, KeyError):
        raise ValueError(
            f"systemd passed txgraph no socket of {which} (LISTEN_FDS, LISTEN_PID and "
            "LISTEN_FDNAMES name the sockets passed): start txgraph through txgraph.socket, "
            "or give --listen unix:PATH"
        ) from None
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from None
    assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    fd = endpoint.fileno
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise ValueError(f"the descriptor systemd passed ({which}) is not a socket: {e}") from None
    with probe:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            raise ValueError(
                f"the socket systemd passed ({which}) is a {probe.family.name} "
                f"{probe.type.name} socket, not a UNIX stream socket: use ListenStream=PATH"
            )
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"the socket systemd passed ({which}) is not listening")
        path = probe.getsockname()
    if isinstance(path, bytes):
        path = path.decode(errors="surrogateescape")
    if not path.startswith("/"):
        raise ValueError(
            f"the socket systemd passed ({which}) has no file ({path!r}): an abstract or "
            "unnamed socket has no permissions; use ListenStream=/run/docker/plugins/NAME.sock"
        )
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"the socket systemd passed ({which}): cannot stat {path}: {e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path}, where systemd's socket ({which}) listens, is not a socket")
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~SOCKET_MODE:
        raise ValueError(
            f"the socket {path} systemd passed is mode {mode:04o}, which lets users other than "
            "root and its group open the plugin socket, which mounts and writes layers as "
            "root: set SocketMode=0660 (or stricter) in the socket unit"
        )
    if st.st_uid != 0:
        raise ValueError(
            f"the socket {path} systemd passed is owned by uid {st.st_uid}, not root: set "
            "SocketUser=root in the socket unit"
        )
    gid = _group_gid(socket_group)
    if st.st_gid not in (0, gid):
        raise ValueError(
            f"the socket {path} systemd passed is in group gid {st.st_gid}, neither root nor "
            f"--socket-group ({socket_group or 'not given'}): set SocketGroup= in the socket "
            "unit to root or the --socket-group group"
        )
    return InheritedSocket(fd, path, mode)


class _InheritedPort(unix.Port):  # type: ignore[misc]
    """
    Twisted's UNIX port, on a socket systemd keeps: when txgraph stops
    listening, the socket is closed without C{shutdown()} (which would stop
    systemd's listening socket too, a socket shared by both) and its file
    is not removed.
    """

    _shouldShutdown = False

    def connectionLost(self, reason: Any) -> None:
        # unix.Port.connectionLost would unlink systemd's socket file.
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class InheritedUnixEndpoint:
    """
    Listen on an L{InheritedSocket}: keep its mode (Twisted's port sets its
    C{mode} on the file at start) and systemd's backlog, never unlink it.
    """

    def __init__(self, reactor: Any, inherited: InheritedSocket) -> None:
        self.reactor = reactor
        self.inherited = inherited
        self._used = False

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        """
        Start serving C{factory} on the inherited socket, then close the
        inherited descriptor (the port holds its own).
        """
        if self._used:
            return fail(RuntimeError(f"already listening on {self.inherited.path}"))
        self._used = True
        try:
            fdesc.setNonBlocking(self.inherited.fd)
            port = _InheritedPort._fromListeningDescriptor(
                self.reactor, self.inherited.fd, factory
            )
            port.mode = self.inherited.mode
            port.backlog = socket.SOMAXCONN
            port.startListening()
            os.close(self.inherited.fd)
        except BaseException:
            return fail()
        return succeed(port)
