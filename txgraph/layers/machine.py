"""
The built layer machine, and its transition table as a Mermaid diagram
(C{python -m txgraph.layers}, embedded in docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterator

from txgraph.layers import operations, recovery
from txgraph.layers.states import builder

#: The modules whose transitions the machine has: importing them is what
#: adds their transitions to the builder, so they must come before the build.
TRANSITIONS = (operations, recovery)

LayerMachine = builder.build()


def transitions() -> Iterator[tuple[str, str, str]]:
    """
    Every transition of the layer machine as (from state, input, to state),
    read from the built machine itself (for the docs' diagram).
    """
    automaton = LayerMachine.__automat_automaton__
    for start, inp, end, _outputs in sorted(
        automaton.allTransitions(), key=lambda t: (t[0].name, t[1], t[2].name)
    ):
        yield start.name, inp, end.name


def mermaid() -> str:
    """
    The layer machine as a Mermaid state diagram, drawn from the built
    machine's transition table (C{python -m txgraph.layers}).
    """
    edges: dict[tuple[str, str], list[str]] = {}
    for start, inp, end in transitions():
        edges.setdefault((start, end), []).append(inp)
    lines = ["stateDiagram-v2", "    [*] --> new"]
    for (start, end), inputs in sorted(edges.items()):
        label = ", ".join(sorted(set(inputs)))
        lines.append(f"    {start} --> {end}: {label}")
    lines.append("    released --> [*]")
    return "\n".join(lines) + "\n"
