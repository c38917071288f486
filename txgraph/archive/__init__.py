"""
Layer tars in and out: the one place where txgraph applies a Docker layer
tar to a directory and produces one from a directory.

Every backend shares this code, so that a layer has the same content, the
same Changes and the same sizes whether it lives in an overlay upper
directory or as a full tree on an RBD block device.  The semantics are
moby's (C{pkg/archive}: C{Untar} with the overlay whiteout converter,
C{UnpackLayer}, C{TarWithOptions}, C{ExportChanges}, C{ChangesDirs},
C{ChangesSize}, and C{pkg/directory.Size}), because dockerd computes layer
digests, C{docker diff} output and sizes from what we return.  Tar headers
are written byte for byte as Go's C{archive/tar} writes moby's (owner
names from the host's user and group databases included), so that the same
content gets the same layer digest as on moby's own overlay2.

Everything here is blocking and runs in worker threads, never in the
reactor.

The modules, bottom up, each with one job:

  - L{tarformat}: the tar and whiteout vocabulary both directions share;
  - L{fs}: C{openat2(2)} confined to a root, directory descriptors,
    removal (the safety rules are in its docstring);
  - L{reader}: the streaming tar parser;
  - L{changes}: moby's Changes and sizes (the size rules are there);
  - L{apply}: L{apply_layer} (the error rules are there);
  - L{writer}: tar headers and the stream writer;
  - L{export}: L{export_overlay} and L{export_changes}.

The names below are the package's API; the backends use them as
C{archive.apply_layer} and so on.

Deliberate differences from moby, all for safety or robustness: symlinks are
created whatever their target (moby refuses targets that lexically leave the
root; C{RESOLVE_IN_ROOT} makes them harmless); C{trusted.overlay.*}
attributes, overlayfs's private namespace, are never taken from a tar nor
put into one; export carries every extended attribute except those and
C{security.selinux} (moby carries only C{security.capability}, so a file
with C{user.*} attributes gives a different digest than moby's); sparse
files are extracted sparse (moby writes every zero); a whiteout
naming C{""}, C{"."} or C{".."} is an error (moby would delete the
directory itself); a name with C{".."} climbing above the root is an error
even when it starts with C{"/"}; a hard link entry re-applies owner and
mode to the shared inode only when they differ (a C{chown} drops its file
capabilities); overlay whiteouts get the time of their C{.wh.} entry, so
that exporting a layer again gives the same tar.
"""

from __future__ import annotations

from txgraph.archive.apply import ApplyMode, ApplyStats, apply_layer
from txgraph.archive.changes import changes_dirs, changes_size, directory_size
from txgraph.archive.export import export_changes, export_overlay

__all__ = [
    "ApplyMode",
    "ApplyStats",
    "apply_layer",
    "changes_dirs",
    "changes_size",
    "directory_size",
    "export_changes",
    "export_overlay",
]
