"""
C{txgraph-admin install-units}: write the systemd units shipped in
C{txgraph/systemd/units/} (package data) into a unit directory, with the
installed C{twistd}'s path and the state directory filled in.

Two set-ups: socket-activated (C{txgraph.socket} makes the plugin socket,
C{txgraph.service} adopts it with C{--listen systemd:domain=UNIX:index=0})
or plain (C{--plain}: C{txgraph-plain.service} installed as
C{txgraph.service}, txgraph makes its own socket).  A unit file that is
already there with other contents is left alone unless C{force}.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources

from txgraph.errors import TxgraphError

UNIT_DIR = "/etc/systemd/system"

#: Characters a path may have to appear unquoted in C{ExecStart=}: no
#: spaces, quotes, C{%} specifiers, C{$} variables or backslashes.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")


@dataclass(frozen=True)
class Written:
    """
    One unit file: its path, and whether it was written or already there.
    """

    path: str
    changed: bool


def default_twistd() -> str:
    """
    The twistd of the environment txgraph is installed in (beside the
    Python running this command).
    """
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def _plain_path(what: str, path: str) -> str:
    if not _PLAIN_PATH.fullmatch(path):
        raise TxgraphError(
            f"{what} {path!r}: give an absolute path of letters, digits and ._+@-/ only "
            "(systemd would read spaces, quotes, % and $ in ExecStart= as syntax)"
        )
    return os.path.normpath(path)


def render(template: str, twistd: str, state_dir: str) -> str:
    """
    A shipped unit file (C{txgraph.socket}, C{txgraph.service},
    C{txgraph-plain.service}) with C{@TWISTD@} and C{@STATE_DIR@} filled in.
    """
    text = (resources.files("txgraph.systemd") / "units" / template).read_text()
    return text.replace("@TWISTD@", twistd).replace("@STATE_DIR@", state_dir)


def units(plain: bool) -> dict[str, str]:
    """
    The installed name of each unit of a set-up, and its template.
    """
    if plain:
        return {"txgraph.service": "txgraph-plain.service"}
    return {"txgraph.socket": "txgraph.socket", "txgraph.service": "txgraph.service"}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def install_units(
    prefix: str, twistd: str, state_dir: str, *, plain: bool = False, force: bool = False
) -> list[Written]:
    """
    Write the set-up's units into C{prefix}.  Nothing is written if any
    unit there differs and not C{force}, if C{twistd} is not an executable
    file, or (C{plain}) if a socket-activated install's C{txgraph.socket}
    is there: each is a L{TxgraphError} saying what to do.
    """
    twistd = _plain_path("--twistd", twistd)
    state_dir = _plain_path("--state-dir", state_dir)
    if not (os.path.isfile(twistd) and os.access(twistd, os.X_OK)):
        raise TxgraphError(
            f"--twistd {twistd}: no executable file there; give the twistd of the "
            "environment txgraph is installed in"
        )
    if not os.path.isdir(prefix):
        raise TxgraphError(f"--prefix {prefix}: no such directory")
    socket_unit = os.path.join(prefix, "txgraph.socket")
    if plain and os.path.lexists(socket_unit):
        raise TxgraphError(
            f"{socket_unit} is there (a socket-activated install), and would pass its socket "
            "to the plain txgraph.service: run systemctl disable --now txgraph.socket and "
            "remove it first"
        )
    contents = {
        os.path.join(prefix, name): render(template, twistd, state_dir)
        for name, template in units(plain).items()
    }
    existing = {path: _read(path) for path in contents}
    differing = [p for p, text in contents.items() if existing[p] not in (None, text)]
    if differing and not force:
        raise TxgraphError(
            f"{', '.join(differing)} already there with other contents: compare them "
            "(e.g. with diff), then give --force to replace them"
        )
    written = []
    for path, text in contents.items():
        unchanged = existing[path] == text
        if not unchanged:
            fd, staged = tempfile.mkstemp(prefix=".txgraph-unit-", dir=prefix)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.chmod(staged, 0o644)
                os.rename(staged, path)
            except BaseException:
                os.unlink(staged)
                raise
        written.append(Written(path, not unchanged))
    return written
