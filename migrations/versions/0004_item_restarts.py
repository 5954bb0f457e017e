"""items count restarts after a lost worker (a crash-looping item is failed, not retried forever)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 02:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('items') as batch:
        batch.add_column(sa.Column('restarts', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('items') as batch:
        batch.drop_column('restarts')
