"""
Initial schema: layers (state machine state, refcount, mapping) and config
(Init's arguments and the effective options).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = (
    "creating",
    "created",
    "applying",
    "committing",
    "mapping",
    "mapped",
    "mounting",
    "mounted",
    "unmounting",
    "unmapping",
    "removing",
    "faulty",
)


def upgrade() -> None:
    """
    Create the layers and config tables.
    """
    op.create_table(
        "layers",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("parent", sa.String(80), nullable=True),
        sa.Column("kind", sa.String(2), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("refcount", sa.Integer, nullable=False, server_default="0"),
        sa.Column("committed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("mountpoint", sa.Text, nullable=True),
        sa.Column("mapping", sa.Text, nullable=True),
        sa.Column("storage_opt", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.CheckConstraint("kind IN ('ro', 'rw')", name="ck_layers_kind"),
        sa.CheckConstraint(
            "state IN (" + ", ".join(f"'{s}'" for s in STATES) + ")",
            name="ck_layers_state",
        ),
        sa.CheckConstraint("refcount >= 0", name="ck_layers_refcount"),
    )
    op.create_index("ix_layers_parent", "layers", ["parent"])
    op.create_table(
        "config",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    """
    Drop everything.
    """
    op.drop_table("config")
    op.drop_index("ix_layers_parent", "layers")
    op.drop_table("layers")
