"""how each device's artifact arrived: delta or full

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('download', sa.String(length=8), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.drop_column('download')
