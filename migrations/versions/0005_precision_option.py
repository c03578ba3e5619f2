"""job.precision and audit.precision: "fp32" or "bf16" (autocast of the encoder passes on a GPU).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("job", "audit"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("precision", sa.String(8), nullable=False, server_default="fp32"))


def downgrade() -> None:
    for table in ("audit", "job"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("precision")
