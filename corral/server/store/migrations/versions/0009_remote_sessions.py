"""remote-access sessions and the remote-access permission

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('remote_access', sa.Boolean(), server_default='0', nullable=False))
    op.create_table('remote_sessions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('device_token_hash', sa.String(length=64), nullable=True),
    sa.Column('expires_at', sa.Double(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('replica', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('opened_at', sa.Double(), nullable=True),
    sa.Column('closed_at', sa.Double(), nullable=True),
    sa.Column('bytes_to_device', sa.BigInteger(), nullable=False),
    sa.Column('bytes_from_device', sa.BigInteger(), nullable=False),
    sa.Column('recording', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_remote_sessions'))
    )
    with op.batch_alter_table('remote_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_remote_sessions_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_remote_sessions_device_id'), ['device_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_remote_sessions_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('remote_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_remote_sessions_status'))
        batch_op.drop_index(batch_op.f('ix_remote_sessions_device_id'))
        batch_op.drop_index(batch_op.f('ix_remote_sessions_created_at'))
    op.drop_table('remote_sessions')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('remote_access')
