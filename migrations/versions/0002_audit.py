"""Audits: the audit table, and job.audit_id (nullable) referencing it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('team_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('encoder_id', sa.Uuid(), nullable=True),
    sa.Column('dataset', sa.String(length=200), nullable=False),
    sa.Column('dataset_id', sa.Uuid(), nullable=True),
    sa.Column('attacks', sa.JSON(), nullable=False),
    sa.Column('epsilons', sa.JSON(), nullable=False),
    sa.Column('betas', sa.JSON(), nullable=True),
    sa.Column('seeds', sa.JSON(), nullable=False),
    sa.Column('device', sa.String(length=8), nullable=False),
    sa.Column('head', sa.JSON(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['dataset.id'], name=op.f('fk_audit_dataset_id_dataset'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['encoder_id'], ['encoder.id'], name=op.f('fk_audit_encoder_id_encoder'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_audit_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit'))
    )
    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_team_id'), ['team_id'], unique=False)
        batch_op.create_index('ix_audit_team_id_created_at', ['team_id', 'created_at'], unique=False)

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_id', sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f('ix_job_audit_id'), ['audit_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_job_audit_id_audit'), 'audit', ['audit_id'], ['id'], ondelete='CASCADE')


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_job_audit_id_audit'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_job_audit_id'))
        batch_op.drop_column('audit_id')

    with op.batch_alter_table('audit', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_team_id_created_at')
        batch_op.drop_index(batch_op.f('ix_audit_team_id'))

    op.drop_table('audit')
