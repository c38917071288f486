"""
txgraph under systemd: the plugin socket a socket unit made and passed to
the daemon (L{txgraph.systemd.activation}, C{--listen
systemd:domain=UNIX:index=0}), and the unit files shipped in C{units/}
with the command that installs them (L{txgraph.systemd.install},
C{txgraph-admin install-units}).
"""
