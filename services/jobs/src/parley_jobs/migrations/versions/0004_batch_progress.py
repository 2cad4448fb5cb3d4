"""per-batch item counters; the scheduler's index in line order

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 13:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batch_progress",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("finished", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_progress_batch_id_batches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_batch_progress")),
    )
    # Existing batches start from their items as they stand (workers and the API must run this version from now on:
    # an older one would move items without moving the counters).
    op.execute(
        "INSERT INTO batch_progress (batch_id, total, finished, completed, failed)"
        " SELECT b.id, b.total,"
        " (SELECT count(*) FROM batch_items i WHERE i.batch_id = b.id AND i.status <> 'pending'),"
        " (SELECT count(*) FROM batch_items i WHERE i.batch_id = b.id AND i.status = 'succeeded'),"
        " (SELECT count(*) FROM batch_items i WHERE i.batch_id = b.id AND i.status = 'failed')"
        " FROM batches b"
    )
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_items_batch_queued")
        batch_op.create_index("ix_batch_items_batch_queued", ["batch_id", "status", "queued_at", "line"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_items_batch_queued")
        batch_op.create_index("ix_batch_items_batch_queued", ["batch_id", "status", "queued_at"], unique=False)
    op.drop_table("batch_progress")
