"""class metrics name their model (job-level figures are aggregated per model)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 01:25:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('class_metrics') as batch:
        batch.add_column(sa.Column('model', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('class_metrics') as batch:
        batch.drop_column('model')
