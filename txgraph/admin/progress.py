"""
L{Progress}: a one-line progress display for the command line's long
commands (gc, make-thin).
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """
    A one-line progress display on a terminal (nothing otherwise).
    """

    def __init__(self, stream: Any = sys.stderr, label: str = "gc") -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.label = label

    def show(self, done: int, total: int, what: str) -> None:
        """
        Redraw the line.
        """
        if not self.tty or not total:
            return
        width = 30
        filled = width * done // total
        self.stream.write(
            f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what[:40]:<40}"
        )
        if done == total:
            self.stream.write("\n")
        self.stream.flush()
