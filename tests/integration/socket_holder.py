"""
systemd's part in the socket activation tests, as far as txgraph sees it.

Run under C{systemd-socket-activate}, which made the listening socket and
passed it as descriptor 3 on the first connection, this keeps the socket
open and runs txgraph as its child with the socket passed on exactly as
systemd passes it (C{LISTEN_FDS}, C{LISTEN_PID} set to the child's own
PID, C{LISTEN_FDNAMES}).  When txgraph is killed by a signal it is started
again on the same socket (a unit's C{Restart=}); when it exits by itself
the holder exits with its status; SIGTERM is passed on to txgraph and
ends the holder (C{systemctl stop}).  The child's PID is written to
PIDFILE each time, for the test to kill it by PID.

Usage: socket_holder.py PIDFILE COMMAND...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    """
    Hold the socket and run COMMAND on it until it exits or we are stopped.
    """
    pidfile, command = argv[1], argv[2:]
    count = int(os.environ.pop("LISTEN_FDS"))
    del os.environ["LISTEN_PID"]
    names = os.environ.pop("LISTEN_FDNAMES", ":".join(["unknown"] * count))
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    while True:
        child = subprocess.Popen(
            ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *command],
            pass_fds=range(3, 3 + count),
            env={**os.environ, "LISTEN_FDS": str(count), "LISTEN_FDNAMES": names},
        )
        if stopping:
            child.send_signal(signal.SIGTERM)
        with open(f"{pidfile}.new", "w") as f:
            f.write(f"{child.pid}\n")
        os.rename(f"{pidfile}.new", pidfile)
        code = child.wait()
        if stopping:
            return 0
        if code >= 0:
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
