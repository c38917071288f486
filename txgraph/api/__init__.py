"""
The front ends: how callers reach txgraph.

 - L{txgraph.api.graphdriver}: Docker's GraphDriver plugin protocol (v1),
   a Klein resource served by L{txgraph.api.site}'s HTTP site on the plugin
   socket;
 - L{txgraph.api.streams}: the bridges between the reactor and the backend
   threads that stream a layer tar in (ApplyDiff) and out (Diff).

Each front end speaks to the driver below it and never to another front
end.
"""
