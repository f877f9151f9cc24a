"""Each instance's max_loaded_models (OLLAMA_MAX_LOADED_MODELS), for the placement plan.

Revision ID: 0004_max_loaded_models
Revises: 0003_rate_policy
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_max_loaded_models"
down_revision = "0003_rate_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(
            sa.Column("max_loaded_models", sa.Integer(), nullable=False, server_default="3")
        )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("max_loaded_models")
