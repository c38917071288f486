"""
The layer machine's builder and its states.  The transitions are added by
L{txgraph.layers.operations} and L{txgraph.layers.recovery}, and the
machine is built by L{txgraph.layers.machine}.
"""

from __future__ import annotations

from automat import TypeMachineBuilder

from txgraph.layers.core import LayerCore, LayerInputs
from txgraph.store import LAYER_STATES

builder = TypeMachineBuilder(LayerInputs, LayerCore)

new = builder.state("new")
creating = builder.state("creating")
created = builder.state("created")
applying = builder.state("applying")
committing = builder.state("committing")
mapping = builder.state("mapping")
mapped = builder.state("mapped")
mounting = builder.state("mounting")
mounted = builder.state("mounted")
unmounting = builder.state("unmounting")
unmapping = builder.state("unmapping")
removing = builder.state("removing")
released = builder.state("released")
faulty = builder.state("faulty")

#: The persisted states, by name, for restoring machines from the store.
STATES = {
    s.name: s
    for s in (
        creating,
        created,
        applying,
        committing,
        mapping,
        mapped,
        mounting,
        mounted,
        unmounting,
        unmapping,
        removing,
        faulty,
    )
}
assert set(STATES) == set(LAYER_STATES)
