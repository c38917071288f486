"""
The twistd drop-in: makes C{twistd txgraph} serve the graph driver plugin.

The real work is imported lazily from L{txgraph.tap} so that C{twistd --help}
stays cheap.
"""

from twisted.application.service import ServiceMaker

txgraph = ServiceMaker(
    "txgraph",
    "txgraph.tap",
    "Docker graph driver plugin: layers on overlayfs or Ceph RBD",
    "txgraph",
)
