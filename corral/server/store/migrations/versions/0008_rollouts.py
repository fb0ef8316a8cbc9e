"""rollouts, their devices, and the attempt of a device's deployment

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt', sa.Integer(), server_default='1', nullable=False))
    op.create_table('rollouts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('deployment_id', sa.String(length=32), nullable=False),
    sa.Column('selector', sa.Text(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('current_wave', sa.Integer(), nullable=False),
    sa.Column('sizes', sa.JSON(), nullable=False),
    sa.Column('acknowledged', sa.JSON(), nullable=False),
    sa.Column('baseline', sa.Double(), nullable=True),
    sa.Column('prepared', sa.Boolean(), nullable=False),
    sa.Column('settled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], name=op.f('fk_rollouts_deployment_id_deployments'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rollouts'))
    )
    with op.batch_alter_table('rollouts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollouts_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_rollouts_deployment_id'), ['deployment_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_rollouts_settled'), ['settled'], unique=False)
        batch_op.create_index(batch_op.f('ix_rollouts_status'), ['status'], unique=False)
    op.create_table('rollout_devices',
    sa.Column('rollout_id', sa.String(length=32), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('wave', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('not_before', sa.Double(), nullable=True),
    sa.Column('started_at', sa.Double(), nullable=True),
    sa.Column('finished_at', sa.Double(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('previous_version', sa.String(length=64), nullable=False),
    sa.Column('revert_deployment_id', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_rollout_devices_device_id_devices'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['rollout_id'], ['rollouts.id'], name=op.f('fk_rollout_devices_rollout_id_rollouts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('rollout_id', 'device_id', name=op.f('pk_rollout_devices'))
    )
    with op.batch_alter_table('rollout_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollout_devices_device_id'), ['device_id'], unique=False)
        batch_op.create_index('ix_rollout_devices_rollout_position', ['rollout_id', 'position'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rollout_devices', schema=None) as batch_op:
        batch_op.drop_index('ix_rollout_devices_rollout_position')
        batch_op.drop_index(batch_op.f('ix_rollout_devices_device_id'))
    op.drop_table('rollout_devices')
    with op.batch_alter_table('rollouts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rollouts_status'))
        batch_op.drop_index(batch_op.f('ix_rollouts_settled'))
        batch_op.drop_index(batch_op.f('ix_rollouts_deployment_id'))
        batch_op.drop_index(batch_op.f('ix_rollouts_created_at'))
    op.drop_table('rollouts')
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.drop_column('attempt')
