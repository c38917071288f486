"""
The layer state machine, and the registry that owns one machine per layer.

Every layer is an Automat L{TypeMachineBuilder} machine.  Its rest states
are C{created} (storage exists, nothing attached), C{mapped} (a block device
is attached), C{mounted} (mounted, with a persisted reference count) and the
terminal C{released} (storage and row gone); C{faulty} holds a layer whose
backend failed in a way that left reality unknown.  Every external side
effect happens in a "trying" state (creating, applying, committing, mapping,
mounting, unmounting, unmapping, removing) that is committed to the store
I{before} the backend is called, and the outcome is committed after it:
write-ahead transitions, so that recovery at start knows exactly what was
in flight and can finish or roll it back.

A backend that maps may keep a layer's device for a while after its last
Put (C{unmap_delay}): the layer rests in C{mapped}, and the registry feeds
C{release} once the delay has passed with no Get, or at once when the
layer is committed, gets an ApplyDiff, or the daemon stops.  dockerd gets
and puts a container's layer when it creates the container and gets it
again when it starts it: the second Get then only mounts.

Behaviours never raise.  They persist, start backend work in the thread
pool, and feed the outcome back as the private inputs C{_succeeded} or
C{_failed}; a failure thus becomes an explicit transition to an explicit
state.  Public inputs (C{get}, C{put}, ...) return a Deferred that fires
once the whole operation, every commit included, is done.  An input that
makes no sense in a state (Put on a layer nobody holds) raises Automat's
C{NoTransition}, which L{LayerRegistry} turns into L{InvalidLayerState}.

The registry serialises operations per layer (one in flight; the others
queue on a L{DeferredLock}), so trying states only ever see completions.

The package, by job (each module imports only those before it):

 - L{txgraph.layers.core}: what a machine drives (L{LayerCore}: the row,
   the write-ahead C{step}/C{settle} helpers) and its inputs;
 - L{txgraph.layers.states}: the machine's builder and states;
 - L{txgraph.layers.operations}: the transitions of dockerd's operations
   (create, apply, commit, get, put, release, remove);
 - L{txgraph.layers.recovery}: the transitions of recovery at start;
 - L{txgraph.layers.machine}: the built machine, and its diagram
   (C{python -m txgraph.layers});
 - L{txgraph.layers.registry}: L{LayerRegistry}, which owns the machines.
"""
