"""job.defences and audit.defences: whether the worker runs the defences after a job.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("job", "audit"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("defences", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    for table in ("audit", "job"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("defences")
