"""
txgraph: a Docker graph driver plugin on Twisted.

dockerd sends every layer operation over a UNIX socket; txgraph keeps the
layers on local overlayfs or in a Ceph RBD pool, with one state machine per
layer persisted in SQLite so that crashes leave nothing leaked or lost.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
