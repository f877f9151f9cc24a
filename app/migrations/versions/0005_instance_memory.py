"""Each instance's memory_gb (the memory its server gives models), for the placement plan.

Revision ID: 0005_instance_memory
Revises: 0004_max_loaded_models
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_instance_memory"
down_revision = "0004_max_loaded_models"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: the rows there count models only, as before.
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("memory_gb", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("memory_gb")
