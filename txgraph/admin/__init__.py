"""
C{txgraph-admin}: the administrator's view of a txgraph state directory,
and garbage collection after an incident.

While txgraph runs, the commands ask it through its admin socket
(C{<state-dir>/admin.sock}, mode 0600, root only), so the database keeps
one writer.  When it is stopped, C{txgraph-admin} takes the state
directory's lock, opens the database and the backend itself, recovers
what was in flight exactly as the daemon would at start, and works on
that.

The package, by job:

 - L{txgraph.admin.tasks}: what the commands do on a driver (status, the
   layer list, gc, publishing layers for make-thin), the same whether the
   daemon runs them or the command line on a stopped daemon's state;
 - L{txgraph.admin.service}: L{AdminAPI}, the Klein resource the daemon
   serves on its admin socket (the daemon imports nothing else of this
   package);
 - L{txgraph.admin.client}: how the command line reaches a state
   directory, through the daemon's socket or by opening it itself;
 - L{txgraph.admin.cli}: the command line (C{status}, C{ls}, C{gc}), with
   L{txgraph.admin.make_thin} for C{make-thin}.

Exit codes: 0 clean, 1 orphans found (C{gc}), 2 error.
"""
