"""
The shipped systemd units and C{txgraph-admin install-units}: the units
are written with this installation's twistd and state directory, a
differing file is kept unless --force, the plain set-up refuses to sit
beside a socket unit, and systemd itself finds nothing wrong in them.
Also the option checks that need no socket: C{--containerd-listen
systemd:...} is refused by name, C{--listen none} is accepted with
C{--containerd-listen}.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from txgraph.admin.cli import main
from txgraph.systemd.install import default_twistd
from txgraph.tap import Options

TWISTD = default_twistd()


def _install(prefix: Path, *args: str) -> int:
    return main(["--state-dir", "/var/lib/txgraph-test", "install-units", "--prefix", str(prefix), *args])


def test_install_units_fills_twistd_and_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    install-units writes txgraph.socket and txgraph.service (0644) with the
    twistd beside this Python and the --state-dir given, and says what to
    run next; run again, it finds them unchanged.
    """
    assert _install(tmp_path) == 0
    service = (tmp_path / "txgraph.service").read_text()
    assert (
        f"ExecStart={TWISTD} -n --pidfile= txgraph --listen systemd:domain=UNIX:index=0 "
        "--state-dir /var/lib/txgraph-test\n"
    ) in service
    assert "@TWISTD@" not in service and "@STATE_DIR@" not in service
    socket_unit = (tmp_path / "txgraph.socket").read_text()
    for line in ("ListenStream=/run/docker/plugins/txgraph.sock", "SocketMode=0660", "SocketUser=root",
                 "SocketGroup=root", "Before=docker.service containerd.service", "WantedBy=sockets.target"):
        assert line in socket_unit.splitlines()
    assert stat.S_IMODE(os.stat(tmp_path / "txgraph.service").st_mode) == 0o644
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/txgraph.socket" in out
    assert "systemctl daemon-reload && systemctl enable --now txgraph.socket" in out
    assert _install(tmp_path) == 0
    assert f"unchanged {tmp_path}/txgraph.service" in capsys.readouterr().out


def test_install_units_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A unit file with other contents is named and kept (nothing is written),
    and replaced with --force.
    """
    (tmp_path / "txgraph.service").write_text("[Service]\nExecStart=/bin/true\n")
    assert _install(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/txgraph.service already there with other contents" in err
    assert "--force" in err
    assert (tmp_path / "txgraph.service").read_text() == "[Service]\nExecStart=/bin/true\n"
    assert not (tmp_path / "txgraph.socket").exists()
    assert _install(tmp_path, "--force") == 0
    assert "--listen systemd:domain=UNIX:index=0" in (tmp_path / "txgraph.service").read_text()


def test_install_units_plain_and_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    --plain writes only a txgraph.service that makes its own socket, and
    refuses beside a socket-activated install's txgraph.socket; a --twistd
    that is no executable, or that ExecStart= would parse, is refused.
    """
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _install(plain, "--plain", "--twistd", sys.executable) == 0
    assert sorted(os.listdir(plain)) == ["txgraph.service"]
    service = (plain / "txgraph.service").read_text()
    assert f"ExecStart={sys.executable} -n --pidfile= txgraph --state-dir" in service
    assert "txgraph.socket" not in service and "WantedBy=multi-user.target" in service
    assert "enable --now txgraph.service" in capsys.readouterr().out
    activated = tmp_path / "activated"
    activated.mkdir()
    assert _install(activated) == 0
    assert _install(activated, "--plain", "--force") == 2
    assert "txgraph.socket is there (a socket-activated install)" in capsys.readouterr().err
    assert _install(tmp_path, "--twistd", str(tmp_path / "nope")) == 2
    assert "no executable file there" in capsys.readouterr().err
    assert _install(tmp_path, "--twistd", "/opt/my venv/bin/twistd") == 2
    assert "letters, digits and ._+@-/ only" in capsys.readouterr().err


@pytest.mark.parametrize("plain", [False, True])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, plain: bool) -> None:
    """
    systemd-analyze verify (offline: it loads the files, checks every key
    and that ExecStart's program exists) reports nothing on the units as
    installed.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    assert _install(tmp_path, *(["--plain"] if plain else [])) == 0
    units = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_containerd_listen_refuses_systemd() -> None:
    """
    grpcio cannot serve on a socket systemd passed: --containerd-listen
    systemd:... is refused at option parsing, saying so and what to give.
    """
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--containerd-listen", "systemd:domain=UNIX:index=1"])
    assert "grpcio's server binds its own socket and cannot adopt one systemd passed" in str(e.value)
    assert "give unix:/path/to/snapshotter.sock" in str(e.value)


def test_listen_none_with_containerd_is_accepted() -> None:
    """
    --listen none with --containerd-listen (a containerd-only node) passes
    the option checks, with no plugin socket to check.
    """
    options = Options()
    options.parseOptions(["--listen", "none", "--containerd-listen", "unix:/run/txgraph/snapshotter.sock"])
    assert options["listen"] == "none" and options["inherited-socket"] is None
