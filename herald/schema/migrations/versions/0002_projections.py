"""Projections: the farm's current state (evaluations, builds, steps, messages).

Written by the unit of work in the same transaction as the log rows, and
rebuilt from the log alone by `herald projections rebuild`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "herald_evaluations",
        sa.Column("aggregate_id", sa.String(36), nullable=False),
        sa.Column("trace_id", sa.String(100), nullable=False),
        sa.Column("jobset_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("eval_id", sa.BigInteger(), nullable=True),
        sa.Column("new_builds", sa.Integer(), nullable=True),
        sa.Column("cached_builds", sa.Integer(), nullable=True),
        sa.Column("previous_eval_id", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("started_at", _Timestamp, nullable=False),
        sa.Column("updated_at", _Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("aggregate_id", name=op.f("pk_herald_evaluations")),
        sa.UniqueConstraint("trace_id", name=op.f("uq_herald_evaluations_trace_id")),
    )
    op.create_table(
        "herald_builds",
        sa.Column("build_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("aggregate_id", sa.String(36), nullable=False),
        sa.Column("jobset_id", sa.BigInteger(), nullable=False),
        sa.Column("job", sa.String(255), nullable=False),
        sa.Column("drv_path", sa.Text(), nullable=False),
        sa.Column("system", sa.String(64), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("dependencies", _Json, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("substituted", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("queued_at", _Timestamp, nullable=False),
        sa.Column("started_at", _Timestamp, nullable=True),
        sa.Column("finished_at", _Timestamp, nullable=True),
        sa.Column("updated_at", _Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("build_id", name=op.f("pk_herald_builds")),
        sa.UniqueConstraint("aggregate_id", name=op.f("uq_herald_builds_aggregate_id")),
    )
    op.create_index("ix_herald_builds_state", "herald_builds", ["state", "build_id"])
    op.create_index("ix_herald_builds_jobset_id", "herald_builds", ["jobset_id"])
    op.create_table(
        "herald_build_dependencies",
        sa.Column("build_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("depends_on", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint(
            "build_id", "depends_on", name=op.f("pk_herald_build_dependencies")
        ),
    )
    op.create_index(
        "ix_herald_build_dependencies_depends_on", "herald_build_dependencies", ["depends_on"]
    )
    op.create_table(
        "herald_build_steps",
        sa.Column("build_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("step_nr", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("machine", sa.String(255), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("started_at", _Timestamp, nullable=False),
        sa.Column("finished_at", _Timestamp, nullable=True),
        sa.PrimaryKeyConstraint(
            "build_id", "generation", "step_nr", name=op.f("pk_herald_build_steps")
        ),
    )
    op.create_table(
        "herald_build_messages",
        sa.Column("build_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("message_id", sa.String(200), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("received_at", _Timestamp, nullable=False),
        sa.Column("updated_at", _Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("build_id", "message_id", name=op.f("pk_herald_build_messages")),
    )


def downgrade() -> None:
    op.drop_table("herald_build_messages")
    op.drop_table("herald_build_steps")
    op.drop_index("ix_herald_build_dependencies_depends_on", table_name="herald_build_dependencies")
    op.drop_table("herald_build_dependencies")
    op.drop_index("ix_herald_builds_jobset_id", table_name="herald_builds")
    op.drop_index("ix_herald_builds_state", table_name="herald_builds")
    op.drop_table("herald_builds")
    op.drop_table("herald_evaluations")
