"""
Alembic environment: runs migrations on the connection txgraph hands in
(C{config.attributes["connection"]}), or on the database named by
C{sqlalchemy.url} when run from the alembic command line.
"""

from alembic import context
from sqlalchemy import create_engine

from txgraph.store import metadata

config = context.config


def run_migrations() -> None:
    """
    Run the pending migrations in one transaction.
    """
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            context.configure(
                connection=conn, target_metadata=metadata, render_as_batch=True
            )
            context.run_migrations()
        return
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
