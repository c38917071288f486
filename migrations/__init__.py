"""
Alembic migrations of txgraph's state database.

This directory sits at the top of the source tree and is installed as
C{txgraph.migrations}, so an installed txgraph can upgrade its own database.
The schema is only ever created or changed by these scripts.
"""
