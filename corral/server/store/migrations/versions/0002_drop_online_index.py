"""drop the index on devices.online

A low-selectivity boolean index misleads SQLite's planner: `... and online ORDER BY id LIMIT 50`
scanned every online device through the index and sorted them (70 ms at 100k devices) instead of
walking the id order and stopping at 50 matches (3 ms).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("ix_devices_online")


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("ix_devices_online", ["online"], unique=False)
