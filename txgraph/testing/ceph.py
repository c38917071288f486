"""Throwaway single-node Ceph clusters for test suites.

This wraps ``ceph-dev-cluster.sh`` (shipped next to this module): one ceph-mon and one
ceph-osd on 127.0.0.1, no ceph-mgr, with every file in one directory, a pool ``rbd``
ready for RBD images, and a restricted client ``client.txgraph``
(``mon 'profile rbd' osd 'profile rbd pool=rbd'``).  A cluster is usable about 1.2 s
after :meth:`DevCluster.up` starts from nothing (memstore) and gone in about 0.5 s after
:meth:`DevCluster.down`.

Typical use in a pytest fixture::

    if not DevCluster.available():
        pytest.skip("Ceph is not installed")
    with DevCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        r = rados.Rados(conffile=cluster.conf)
        ...

Needs the Debian packages ceph-mon, ceph-osd and ceph-common (plus rbd-fuse for
:meth:`DevCluster.map`) and, for ``map``/``unmap``, root.  The Python bindings
(``rados``, ``rbd``) are not needed here; see ``.ci/link-ceph-bindings.sh``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

__all__ = ["DevCluster", "DevClusterError", "SCRIPT"]

#: The shell script doing the work; it is installed as package data next to this module.
SCRIPT: Path = Path(__file__).resolve().with_name("ceph-dev-cluster.sh")

#: Export lines printed by ``up``; :attr:`DevCluster.env` holds them all.
_REQUIRED = ("CEPH_CONF", "CEPH_KEYRING", "CEPH_POOL", "CEPH_MON_HOST", "CEPH_DEV_DIR", "CEPH_FSID")


class DevClusterError(RuntimeError):
    """A ``ceph-dev-cluster.sh`` command failed; the message is its error line."""

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        super().__init__(f"ceph-dev-cluster {command} failed (exit {returncode}): {last}")


class DevCluster:
    """A single-node Ceph cluster living in one directory.

    :param directory: where everything of the cluster lives.  ``up`` creates it (it may
        already exist if empty, or hold a cluster from an earlier ``up``, which is then
        reused if it is healthy); ``down`` deletes it.
    :param store: ``"memstore"`` (the default: RAM only, fastest) or ``"bluestore"``
        (on a sparse file in the directory).
    :param timeout: hard limit in seconds for each script call.

    After :meth:`up`, :attr:`env` holds the ``CEPH_*`` variables the script exported
    (``CEPH_CONF`` is what librados and the ``ceph``/``rbd``/``rados`` tools read), and
    :attr:`conf`, :attr:`keyring`, :attr:`pool`, :attr:`fsid`, :attr:`mon_host` and
    :attr:`dir` the most useful of them.
    """

    #: client name (without ``client.``) and keyring of the restricted client
    client_id: str = "txgraph"

    def __init__(self, directory: str | os.PathLike[str], store: str | None = None,
                 timeout: float = 120.0) -> None:
        if store not in (None, "memstore", "bluestore"):
            raise ValueError(f"store must be 'memstore' or 'bluestore', not {store!r}")
        self.directory = Path(directory)
        self.store = store
        self.timeout = timeout
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ discovery

    @staticmethod
    def available() -> bool:
        """True if the Ceph daemons needed for a cluster (ceph-mon, ceph-osd) are installed."""
        return all(shutil.which(b) is not None for b in ("ceph-mon", "ceph-osd"))

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> DevCluster:
        """Create the cluster, or reuse the healthy one already in the directory."""
        out = self._run("up", str(self.directory))
        self.env = self.parse_exports(out)
        missing = [k for k in _REQUIRED if k not in self.env]
        if missing:
            raise DevClusterError("up", 0, f"missing exports {missing} in output: {out!r}")
        return self

    def down(self) -> None:
        """Unmap and unmount everything of the cluster, stop it and delete the directory.

        Idempotent: calling it on a directory that is already gone does nothing.
        """
        self._run("down", str(self.directory))
        self.env = {}

    def status(self) -> bool:
        """True if the cluster is running and accepts writes (HEALTH_OK + a probe write)."""
        try:
            self._run("status", str(self.directory))
        except DevClusterError:
            return False
        return True

    def map(self, image: str) -> str:
        """Expose image ``pool/image`` as a block device (rbd-fuse + losetup).

        Returns the loop device (``/dev/loopN``).  Mapping an image twice returns the same
        device.  Needs root.
        """
        return self._run("map", str(self.directory), image).strip()

    def unmap(self, image: str) -> None:
        """Undo :meth:`map`: unmounts filesystems on the loop device, detaches it and
        unmounts the rbd-fuse mount.  Idempotent."""
        self._run("unmap", str(self.directory), image)

    def __enter__(self) -> DevCluster:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # ------------------------------------------------------------------ accessors

    def _get(self, name: str) -> str:
        try:
            return self.env[name]
        except KeyError:
            raise RuntimeError(f"{name} is not known: call up() first") from None

    @property
    def conf(self) -> str:
        """Path of the cluster's ceph.conf (``CEPH_CONF``)."""
        return self._get("CEPH_CONF")

    @property
    def keyring(self) -> str:
        """Path of the client.admin keyring (``CEPH_KEYRING``; mode 0600)."""
        return self._get("CEPH_KEYRING")

    @property
    def pool(self) -> str:
        """The RBD pool (``CEPH_POOL``, always ``rbd``)."""
        return self._get("CEPH_POOL")

    @property
    def fsid(self) -> str:
        """The cluster fsid (``CEPH_FSID``); a new one every time the cluster is created."""
        return self._get("CEPH_FSID")

    @property
    def mon_host(self) -> str:
        """The monitor address list, e.g. ``[v2:127.0.0.1:P,v1:127.0.0.1:P+1]``."""
        return self._get("CEPH_MON_HOST")

    @property
    def dir(self) -> str:
        """The cluster directory, canonical and absolute (``CEPH_DEV_DIR``)."""
        return self._get("CEPH_DEV_DIR")

    @property
    def client_keyring(self) -> str:
        """Keyring of the restricted ``client.txgraph``."""
        return self.env.get("CEPH_TXGRAPH_KEYRING") or os.path.join(
            self.dir, "ceph.client.txgraph.keyring")

    def process_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for subprocesses (``ceph``, ``rbd``, ...) using this cluster."""
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env

    # ------------------------------------------------------------------ internals

    @staticmethod
    def parse_exports(text: str) -> dict[str, str]:
        """Parse the ``export NAME='value'`` lines printed by ``up``; other lines are ignored."""
        env: dict[str, str] = {}
        for line in text.splitlines():
            if not line.startswith("export "):
                continue
            words = shlex.split(line)
            if len(words) != 2 or "=" not in words[1]:
                continue
            name, _, value = words[1].partition("=")
            env[name] = value
        return env

    def _run(self, *args: str) -> str:
        env = dict(os.environ)
        if self.store is not None:
            env["CEPH_DEV_STORE"] = self.store
        try:
            proc = subprocess.run(
                ["bash", str(SCRIPT), *args], env=env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise DevClusterError(args[0], -1, f"timed out after {self.timeout} s") from e
        if proc.returncode != 0:
            raise DevClusterError(args[0], proc.returncode, proc.stderr)
        return proc.stdout

    def __repr__(self) -> str:
        return f"DevCluster({str(self.directory)!r}, fsid={self.env.get('CEPH_FSID')!r})"
