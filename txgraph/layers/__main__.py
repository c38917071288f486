"""
C{python -m txgraph.layers}: print the layer machine as the Mermaid
diagram that docs/architecture.md embeds.
"""

from txgraph.layers.machine import mermaid

print(mermaid(), end="")
