"""
How the command line reaches a state directory: through the running
daemon's admin socket (L{Daemon}), or, when no daemon answers, by opening
the stopped daemon's state itself (L{offline}), exactly as the daemon
would at start.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react
from twisted.python.threadpool import ThreadPool

from txgraph.engine import UnixHTTPConnection
from txgraph.errors import TxgraphError
from txgraph.statedir import StateDirLock, open_driver, open_snapshotter
from txgraph.store import DatabaseThread, Store


class Daemon:
    """
    The running daemon, asked through its admin socket.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "admin.sock")

    def available(self) -> bool:
        """
        Whether a daemon answers on the admin socket.
        """
        try:
            conn = UnixHTTPConnection(self.path)
            conn.connect()
            conn.close()
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """
        POST and decode a JSON reply.
        """
        return json.loads(b"".join(self.stream(path, body)))

    def stream(self, path: str, body: dict[str, Any] | None = None) -> Iterator[bytes]:
        """
        POST and yield the reply's lines as they come.
        """
        conn = UnixHTTPConnection(self.path)
        conn.request("POST", path, body=json.dumps(body or {}).encode())
        response = conn.getresponse()
        if response.status != 200:
            raise TxgraphError(
                f"txgraph's admin socket answered {response.status}: "
                f"{response.read().decode(errors='replace')[:500]}"
            )
        while line := response.readline():
            yield line
        conn.close()


def offline(args: argparse.Namespace, work: Callable[[Any, Any], Any]) -> Any:
    """
    Run C{work(driver, snapshotter)} on a stopped daemon's state: take the
    lock, open the database and backend, recover the layers and containerd's
    snapshots, then work, then close everything.
    """
    # Imported when the command runs, not with the module: importing the
    # global reactor installs it.
    from twisted.internet import reactor

    path = os.path.join(args.state_dir, "txgraph.db")
    if not os.path.exists(path):
        raise TxgraphError(f"no txgraph state database at {path} (is --state-dir right?)")
    config = Store(path).get_config_thd()
    backend = config.get("backend") or "overlay"
    options = config.get("backend_options") or {}
    result: dict[str, Any] = {}

    async def main(_reactor: Any) -> None:
        lock = StateDirLock(args.state_dir)
        pool = ThreadPool(minthreads=0, maxthreads=4, name="txgraph-backend")
        dbthread = DatabaseThread(reactor)  # type: ignore[arg-type]
        try:
            driver = open_driver(reactor, args.state_dir, backend, options, lock, pool, dbthread)
        except TxgraphError as e:
            lock.release()
            result["error"] = e.message
            return
        try:
            await driver.start()
            snapshotter = open_snapshotter(driver)
            await snapshotter.start()
            result["value"] = await work(driver, snapshotter)
        except TxgraphError as e:
            result["error"] = e.message
        finally:
            dbthread.stop()
            pool.stop()
            driver.backend.stop_now()
            lock.release()

    try:
        react(lambda r: ensureDeferred(main(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise TxgraphError(result.get("error", "the offline run failed")) from None
    if "error" in result:
        raise TxgraphError(result["error"])
    return result.get("value")
