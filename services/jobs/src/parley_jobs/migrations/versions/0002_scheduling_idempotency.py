"""batch idempotency keys, item queueing for fair scheduling

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from parley_kit.db import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_batches_owner"), ["owner", "idempotency_key"]
        )
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queued_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_batch_items_batch_queued", ["batch_id", "status", "queued_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_items_batch_queued")
        batch_op.drop_column("queued_at")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_batches_owner"), type_="unique")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("idempotency_key")
