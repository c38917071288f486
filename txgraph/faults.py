"""
Fault injection for crash tests: make txgraph die by SIGKILL at a named
crash point, as a power cut or an OOM kill would.

Every write-ahead step of the layer machine has two points: C{<trying
state>.before} (the trying state is committed, the backend has not been
called) and C{<trying state>.after} (the backend call returned, its outcome
is not committed yet).  Get and Put have one more each, C{get.committed}
and C{put.committed}: the new reference count is committed, and dockerd
has no answer yet.  Backends may declare points of their own inside
multi-step operations with L{declare} and L{point}.

Crash points are armed only by the environment variable
C{TXGRAPH_CRASH_AT} (a comma-separated list of point names), read once at
start; txgraph logs loudly when any is armed.  Unknown names are refused,
so a test cannot silently arm a point that does not exist.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "TXGRAPH_CRASH_AT"

#: The trying states of the layer machine, each bracketing a side effect.
TRYING_STATES = (
    "creating",
    "applying",
    "committing",
    "mapping",
    "mounting",
    "unmounting",
    "unmapping",
    "removing",
)

#: Get and Put once their new reference count is committed, before dockerd
#: has its answer: the one window that is neither a trying state's before
#: nor its after (a Get of a mounted layer calls no backend at all); and
#: Create once its layer is durably created, unanswered.
ANSWER_POINTS = ("get.committed", "put.committed", "create.committed")

_known: set[str] = {
    f"{state}.{when}" for state in TRYING_STATES for when in ("before", "after")
} | set(ANSWER_POINTS)
_armed: frozenset[str] = frozenset()


def declare(*names: str) -> None:
    """
    Make more crash points known (backends' internal steps).
    """
    _known.update(names)


def known() -> frozenset[str]:
    """
    Every crash point that can be armed.
    """
    return frozenset(_known)


def arm(names: str) -> frozenset[str]:
    """
    Arm the comma-separated crash points C{names}; raise ValueError naming
    any unknown one.
    """
    global _armed
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - _known
    if unknown:
        raise ValueError(
            f"unknown crash point(s) in {ENVIRONMENT_VARIABLE}: {', '.join(sorted(unknown))}"
        )
    _armed = frozenset(wanted)
    return _armed


def arm_from_environment() -> frozenset[str]:
    """
    Arm what C{TXGRAPH_CRASH_AT} names (nothing when it is unset).
    """
    return arm(os.environ.get(ENVIRONMENT_VARIABLE, ""))


def point(name: str) -> None:
    """
    Die here, by SIGKILL, if this crash point is armed.
    """
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
