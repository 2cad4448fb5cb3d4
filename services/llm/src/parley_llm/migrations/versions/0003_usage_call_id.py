"""usage_records.call_id: one id per call, so a settlement retried after a lost connection is written once

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable call id (rows written before it have none) with a unique index."""
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("call_id", sa.String(32), nullable=True))
    op.create_index("ux_usage_records_call_id", "usage_records", ["call_id"], unique=True)


def downgrade() -> None:
    """Drop the index and the column."""
    op.drop_index("ux_usage_records_call_id", table_name="usage_records")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("call_id")
