"""
The value types every layer of txgraph shares: user namespace maps
(L{IDMap}, from Docker's C{UIDMaps}/C{GIDMaps}) and the entries of
C{docker diff} (L{Change}, L{ChangeKind}).

The API decodes them, the driver and the layer machines pass them on, the
backends hand them to the archive code, which applies them.  They live
here, below all of those, so that no layer has to import the archive code
(or anything else above L{txgraph.errors}) to name them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from txgraph.errors import ArchiveError, BadRequest

__all__ = ["Change", "ChangeKind", "IDMap", "IDRange"]


# -- user namespace maps ------------------------------------------------------


@dataclass(frozen=True)
class IDRange:
    """
    One line of a user namespace map: C{size} ids from C{container_id} in
    the container are C{host_id} onwards on the host.
    """

    container_id: int
    host_id: int
    size: int


def _parse_ranges(what: str, maps: list[dict[str, Any]] | None) -> tuple[IDRange, ...]:
    if not maps:
        return ()
    if not isinstance(maps, list):
        raise BadRequest(f"{what} must be a list of id maps")
    ranges = []
    for i, item in enumerate(maps):
        values = []
        for key in ("container_id", "host_id", "size"):
            value = item.get(key) if isinstance(item, dict) else None
            if type(value) is not int or value < 0:
                raise BadRequest(
                    f"{what}[{i}].{key} must be a non-negative integer, not {value!r}"
                )
            values.append(value)
        if values[2] == 0:
            raise BadRequest(f"{what}[{i}].size must be positive")
        ranges.append(IDRange(*values))
    return tuple(ranges)


def _map_id(kind: str, value: int, ranges: tuple[IDRange, ...], to_host: bool) -> int:
    if not ranges:
        return value
    for r in ranges:
        start, target = (r.container_id, r.host_id) if to_host else (r.host_id, r.container_id)
        if start <= value < start + r.size:
            return target + value - start
    if to_host:
        raise ArchiveError(f"container {kind} {value} cannot be mapped to a host {kind}")
    raise ArchiveError(f"host {kind} {value} cannot be mapped to a container {kind}")


@dataclass(frozen=True)
class IDMap:
    """
    Docker's UIDMaps/GIDMaps (C{userns-remap}): how container ids map to
    host ids.  Files on disk carry host ids, layer tars carry container ids.
    An empty list of ranges is the identity for that kind of id.
    """

    uids: tuple[IDRange, ...] = ()
    gids: tuple[IDRange, ...] = ()

    @classmethod
    def from_docker(
        cls,
        uid_maps: list[dict[str, Any]] | None,
        gid_maps: list[dict[str, Any]] | None,
    ) -> IDMap:
        """
        Build the map from Init's C{UIDMaps}/C{GIDMaps}: lists of
        C{{"container_id", "host_id", "size"}} dicts, or None/[] for the
        identity.  Malformed maps raise L{BadRequest}.
        """
        return cls(_parse_ranges("UIDMaps", uid_maps), _parse_ranges("GIDMaps", gid_maps))

    @property
    def identity(self) -> bool:
        """
        Whether ids are the same inside and outside (no remapping).
        """
        return not self.uids and not self.gids

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        """
        The host ids of container ids; L{ArchiveError} if either is outside
        the map.
        """
        return (_map_id("uid", uid, self.uids, True), _map_id("gid", gid, self.gids, True))

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        """
        The container ids of host ids; L{ArchiveError} if either is outside
        the map.
        """
        return (_map_id("uid", uid, self.uids, False), _map_id("gid", gid, self.gids, False))


# -- changes ------------------------------------------------------------------


class ChangeKind(enum.IntEnum):
    """
    What happened to a path, with moby's numbering (the C{Kind} dockerd
    expects in C{Changes}).
    """

    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class Change:
    """
    One entry of C{docker diff}: an absolute path (leading C{/}, never the
    root itself) and what happened to it.  Slotted: a Changes answer can
    hold tens of thousands.
    """

    path: str
    kind: ChangeKind
