"""Operations: resets, replays and prunes on record; indexes for time and audit queries.

* ``herald_operations``: one row per operator action that changes what a
  consumer reads or what the log holds (a reset, a replay, a prune), with who
  ran it, when, and what it did.
* ``herald_consumers.epoch`` (bumped by every reset, so the daemon running the
  consumer notices) and ``records_floor`` (the newest delivery record at the
  last reset: records at or below it are history, not work in progress).
* Indexes: events by ``recorded_at`` (``--since`` and ``--until``), delivery
  records by consumer and start time (``herald audit consumer --since``).
* PostgreSQL: the append-only trigger lets a DELETE through only in a
  transaction that set ``herald.prune`` (``herald prune`` does, nothing else);
  UPDATE and TRUNCATE are still refused from everyone.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True)

_REFUSE_CHANGE = r"""
CREATE OR REPLACE FUNCTION herald_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('herald.prune', true) = 'on' THEN
        RETURN NULL;  -- `herald prune`, the one path that deletes from the log
    END IF;
    RAISE EXCEPTION 'herald: % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'HE001',
              HINT = 'history is never rewritten; `herald prune` deletes what no consumer needs';
END;
$$;
"""

_REFUSE_CHANGE_0001 = r"""
CREATE OR REPLACE FUNCTION herald_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'herald: % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'HE001',
              HINT = 'history is never rewritten; retention has its own command';
END;
$$;
"""


def upgrade() -> None:
    op.create_table(
        "herald_operations",
        sa.Column("id", _BigId, nullable=False, autoincrement=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("consumer", sa.String(200), nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("db_user", sa.String(200), nullable=True),
        sa.Column("at", _Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("detail", _Json, nullable=False),
        sa.CheckConstraint(
            "action IN ('reset', 'replay', 'prune')", name="ck_herald_operations_action"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_herald_operations"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_herald_operations_consumer_id", "herald_operations", ["consumer", "id"])
    op.create_index("ix_herald_operations_action_id", "herald_operations", ["action", "id"])
    with op.batch_alter_table("herald_consumers") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("records_floor", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_index("ix_herald_events_recorded_at", "herald_events", ["recorded_at"])
    op.create_index(
        "ix_herald_deliveries_consumer_started_at",
        "herald_deliveries",
        ["consumer", "started_at"],
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_REFUSE_CHANGE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_REFUSE_CHANGE_0001)
    op.drop_index("ix_herald_deliveries_consumer_started_at", table_name="herald_deliveries")
    op.drop_index("ix_herald_events_recorded_at", table_name="herald_events")
    with op.batch_alter_table("herald_consumers") as batch:
        batch.drop_column("records_floor")
        batch.drop_column("epoch")
    op.drop_index("ix_herald_operations_action_id", table_name="herald_operations")
    op.drop_index("ix_herald_operations_consumer_id", table_name="herald_operations")
    op.drop_table("herald_operations")
