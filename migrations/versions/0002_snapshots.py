"""
containerd snapshots: containerd's metadata (key, kind, parent, labels,
usage, times) of the layers the containerd front end serves.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """
    Create the snapshots table.
    """
    op.create_table(
        "snapshots",
        sa.Column("layer_id", sa.String(80), primary_key=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("parent", sa.Text, nullable=True),
        sa.Column("labels", sa.Text, nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("inodes", sa.BigInteger, nullable=True),
        sa.Column("created_ns", sa.BigInteger, nullable=False),
        sa.Column("updated_ns", sa.BigInteger, nullable=False),
        sa.CheckConstraint("kind IN ('view', 'active', 'committed')", name="ck_snapshots_kind"),
    )
    op.create_index("ix_snapshots_parent", "snapshots", ["parent"])


def downgrade() -> None:
    """
    Drop the snapshots table.
    """
    op.drop_index("ix_snapshots_parent", "snapshots")
    op.drop_table("snapshots")
