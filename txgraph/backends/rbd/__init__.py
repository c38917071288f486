"""
The Ceph RBD backend (docs/ceph.md): every layer an RBD image in a Ceph
pool, cloned from its parent's snapshot, mapped to a local block device and
mounted.  L{RBDBackend} (in L{txgraph.backends.rbd.backend}) is its public
name; the modules beside it hold one part each (see that module's
docstring), and L{txgraph.backends.rbd.mappers} how an image becomes a
local block device.
"""

from txgraph.backends.rbd.backend import RBDBackend

__all__ = ["RBDBackend"]
