"""Consumers: offsets, delivery records and parked events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "herald_consumers",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("offset_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("lease_until", _Timestamp, nullable=True),
        sa.Column("control", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", _Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", _Timestamp, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("offset_seq >= 0", name="ck_herald_consumers_offset_seq"),
        sa.PrimaryKeyConstraint("name", name="pk_herald_consumers"),
    )
    op.create_table(
        "herald_deliveries",
        sa.Column("id", _BigId, nullable=False, autoincrement=True),
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, server_default="live"),
        sa.Column("started_at", _Timestamp, nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("detail", _Json, nullable=True),
        sa.CheckConstraint(
            "outcome IN ('delivered', 'failed', 'parked', 'expired', 'discarded')",
            name="ck_herald_deliveries_outcome",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_herald_deliveries"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_herald_deliveries_consumer_seq", "herald_deliveries", ["consumer", "seq"])
    op.create_index("ix_herald_deliveries_seq", "herald_deliveries", ["seq"])
    op.create_table(
        "herald_parked",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("key", sa.String(200), nullable=True),
        sa.Column("held_by", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parked_at", _Timestamp, nullable=False),
        sa.Column("redeliver", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("consumer", "seq", name="pk_herald_parked"),
    )


def downgrade() -> None:
    op.drop_table("herald_parked")
    op.drop_index("ix_herald_deliveries_seq", table_name="herald_deliveries")
    op.drop_index("ix_herald_deliveries_consumer_seq", table_name="herald_deliveries")
    op.drop_table("herald_deliveries")
    op.drop_table("herald_consumers")
