"""The rate-limit policy: agent classes and the global rate, per namespace.

Revision ID: 0003_rate_policy
Revises: 0002_fleet_registry
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_rate_policy"
down_revision = "0002_fleet_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_classes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("agents", sa.JSON(), nullable=False),
        sa.Column("rate_per_minute", sa.Float(), nullable=True),
        sa.Column("agent_rate_per_minute", sa.Float(), nullable=True),
        sa.Column("on_limit", sa.String(8), nullable=False),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("seeded", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("namespace", "name", name="uq_agent_classes_namespace_name"),
    )
    op.create_table(
        "global_limits",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("rate_per_minute", sa.Float(), nullable=True),
        sa.Column("seeded", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("namespace", name="uq_global_limits_namespace"),
    )


def downgrade() -> None:
    op.drop_table("global_limits")
    op.drop_table("agent_classes")
