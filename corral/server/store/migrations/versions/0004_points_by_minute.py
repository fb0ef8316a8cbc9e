"""points: clustered by (minute, series_id, ts) instead of (series_id, ts)

A table clustered by series takes one page write per point once each series' history spans a
page, so ingestion slowed down as the table grew (ADR 0006). The rows are copied, in the same
transaction as the swap.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:10:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _swap(columns: list[sa.Column[Any]], pk: tuple[str, ...], copy: str) -> None:
    op.create_table('points_new', *columns, sa.PrimaryKeyConstraint(*pk, name='pk_points_new'),
                    sqlite_with_rowid=False)
    op.execute(copy)
    op.drop_table('points')
    op.rename_table('points_new', 'points')
    if op.get_bind().dialect.name == 'postgresql':  # SQLite has no constraint names to fix
        op.execute('ALTER INDEX pk_points_new RENAME TO pk_points')


def upgrade() -> None:
    _swap([sa.Column('minute', sa.Integer(), autoincrement=False, nullable=False),
           sa.Column('series_id', sa.Integer(), autoincrement=False, nullable=False),
           sa.Column('ts', sa.BigInteger(), autoincrement=False, nullable=False),
           sa.Column('value', sa.Double(), nullable=False)],
          ('minute', 'series_id', 'ts'),
          'INSERT INTO points_new (minute, series_id, ts, value)'
          ' SELECT ts / 60000, series_id, ts, value FROM points ORDER BY ts / 60000, series_id, ts')


def downgrade() -> None:
    _swap([sa.Column('series_id', sa.Integer(), autoincrement=False, nullable=False),
           sa.Column('ts', sa.BigInteger(), autoincrement=False, nullable=False),
           sa.Column('value', sa.Double(), nullable=False)],
          ('series_id', 'ts'),
          'INSERT INTO points_new (series_id, ts, value) SELECT series_id, ts, value FROM points ORDER BY series_id, ts')
