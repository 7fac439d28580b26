"""The log: events, their order, the sequencer's state, the topic catalogue.

On PostgreSQL also: the append-only triggers and ``herald_append``, the SQL
function that non-Python writers (Hydra's queue runner, its evaluator) call
inside their own transactions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from herald.schema.tables import XID8, current_xact_id

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True)

# The log refuses UPDATE, DELETE and TRUNCATE from anyone, the tables' owner
# included: history is never rewritten. SQLSTATE HE001 is herald's own, so
# that Python translates it into AppendOnlyViolation. Retention (issue #5)
# gets its own explicit path.
_APPEND_ONLY = r"""
CREATE FUNCTION herald_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'herald: % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'HE001',
              HINT = 'history is never rewritten; retention has its own command';
END;
$$;
"""

# herald_append(topic, payload, ...) -> position. Validates exactly like
# herald.domain.catalogue.validate_event, against the catalogue copied into
# herald_topics by `herald db upgrade`. Errors use SQLSTATE 22023
# (invalid_parameter_value) and a message that starts with "herald:".
_APPEND_FUNCTION = r"""
CREATE FUNCTION herald_append(
    p_topic text,
    p_payload jsonb,
    p_dedupe_key text DEFAULT NULL,
    p_trace_id text DEFAULT NULL,
    p_delivery text DEFAULT NULL,
    p_occurred_at timestamptz DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    spec record;
    field record;
    ok boolean;
    rule text;
    size integer;
    pos bigint;
BEGIN
    IF p_topic IS NULL OR length(p_topic) > 100
       OR p_topic !~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$' THEN
        RAISE EXCEPTION 'herald: topic %: must be snake_case words, optionally dotted',
            quote_nullable(left(p_topic, 40)) USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'herald: payload of %: must be a JSON object', p_topic
            USING ERRCODE = '22023';
    END IF;
    size := octet_length(p_payload::text);
    IF size > 1048576 THEN
        RAISE EXCEPTION 'herald: payload of %: % bytes of JSON, more than the limit of 1048576',
            p_topic, size USING ERRCODE = '22023';
    END IF;
    IF strpos(p_topic, '.') = 0 THEN
        SELECT * INTO spec FROM herald_topics WHERE topic = p_topic;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'herald: topic %: not in the event catalogue; custom topics need a namespace', p_topic
                USING ERRCODE = '22023';
        END IF;
        FOR field IN SELECT key, value #>> '{}' AS kind FROM jsonb_each(spec.fields) LOOP
            IF NOT p_payload ? field.key THEN
                RAISE EXCEPTION 'herald: payload of %: missing field % (%)', p_topic, field.key, field.kind
                    USING ERRCODE = '22023';
            END IF;
            ok := CASE rtrim(field.kind, '?')
                WHEN 'integer' THEN jsonb_typeof(p_payload -> field.key) = 'number'
                                    AND (p_payload ->> field.key) ~ '^-?[0-9]+$'
                WHEN 'string' THEN jsonb_typeof(p_payload -> field.key) = 'string'
                WHEN 'integer[]' THEN jsonb_typeof(p_payload -> field.key) = 'array'
                    AND NOT EXISTS (
                        SELECT 1 FROM jsonb_array_elements(p_payload -> field.key) AS e(v)
                        WHERE jsonb_typeof(e.v) <> 'number' OR e.v::text !~ '^-?[0-9]+$')
                ELSE false
            END;
            IF NOT ok AND NOT (right(field.kind, 1) = '?'
                               AND jsonb_typeof(p_payload -> field.key) = 'null') THEN
                RAISE EXCEPTION 'herald: payload of %: field % must be %', p_topic, field.key, field.kind
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
        IF p_delivery IS NOT NULL AND p_delivery <> spec.delivery THEN
            RAISE EXCEPTION 'herald: payload of %: delivery is fixed by the catalogue as %',
                p_topic, spec.delivery USING ERRCODE = '22023';
        END IF;
        rule := spec.delivery;
        IF rule = 'once_per_eval' AND p_dedupe_key IS NULL THEN
            p_dedupe_key := p_topic || ':' || (p_payload ->> 'eval_id') || ':'
                            || (p_payload ->> 'build_id');
        END IF;
    ELSE
        rule := coalesce(p_delivery, 'at_least_once');
        IF rule NOT IN ('at_least_once', 'ephemeral', 'once_per_eval') THEN
            RAISE EXCEPTION 'herald: payload of %: unknown delivery %', p_topic, rule
                USING ERRCODE = '22023';
        END IF;
    END IF;

    INSERT INTO herald_events (topic, payload, delivery, dedupe_key, trace_id, occurred_at)
    VALUES (p_topic, p_payload, rule, p_dedupe_key, p_trace_id, coalesce(p_occurred_at, now()))
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING position INTO pos;
    IF pos IS NULL THEN
        -- A duplicate dedupe key: appending it again is a no-op.
        SELECT e.position INTO pos FROM herald_events e WHERE e.dedupe_key = p_dedupe_key;
    END IF;
    RETURN pos;
END;
$$;
"""


def upgrade() -> None:
    op.create_table(
        "herald_events",
        sa.Column("position", _BigId, primary_key=True, autoincrement=True),
        sa.Column("tx", XID8(), server_default=current_xact_id(), nullable=True),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("payload", _Json, nullable=False),
        sa.Column("delivery", sa.String(16), nullable=False),
        sa.Column("dedupe_key", sa.String(200), nullable=True),
        sa.Column("aggregate_id", sa.String(100), nullable=True),
        sa.Column("aggregate_version", sa.Integer(), nullable=True),
        sa.Column("trace_id", sa.String(100), nullable=True),
        sa.Column("occurred_at", _Timestamp, nullable=False),
        sa.Column("recorded_at", _Timestamp, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "delivery IN ('at_least_once', 'ephemeral', 'once_per_eval')",
            name=op.f("ck_herald_events_delivery"),
        ),
        sa.CheckConstraint(
            "(aggregate_id IS NULL) = (aggregate_version IS NULL)",
            name=op.f("ck_herald_events_aggregate_version"),
        ),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_herald_events")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_herald_events_tx", "herald_events", ["tx"])
    op.create_index("ix_herald_events_topic", "herald_events", ["topic", "position"])
    op.create_index(
        "uq_herald_events_dedupe_key",
        "herald_events",
        ["dedupe_key"],
        unique=True,
        postgresql_where=sa.text("dedupe_key IS NOT NULL"),
        sqlite_where=sa.text("dedupe_key IS NOT NULL"),
    )
    op.create_index(
        "uq_herald_events_aggregate_id_aggregate_version",
        "herald_events",
        ["aggregate_id", "aggregate_version"],
        unique=True,
        postgresql_where=sa.text("aggregate_id IS NOT NULL"),
        sqlite_where=sa.text("aggregate_id IS NOT NULL"),
    )
    op.create_table(
        "herald_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["position"],
            ["herald_events.position"],
            name=op.f("fk_herald_log_position_herald_events"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_herald_log")),
        sa.UniqueConstraint("position", name=op.f("uq_herald_log_position")),
    )
    op.create_table(
        "herald_sequencer",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("snapshot", sa.Text(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", _Timestamp, nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_herald_sequencer_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_herald_sequencer")),
    )
    op.create_table(
        "herald_topics",
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("delivery", sa.String(16), nullable=False),
        sa.Column("fields", _Json, nullable=False),
        sa.PrimaryKeyConstraint("topic", name=op.f("pk_herald_topics")),
    )

    if op.get_bind().dialect.name == "postgresql":
        # Every event appended after this commit has a tx that is either in
        # progress now (in the snapshot's xip) or newer than its xmax, so the
        # first sequencer cycle starts from here and misses nothing.
        op.execute(
            "INSERT INTO herald_sequencer (id, snapshot, last_seq) "
            "VALUES (1, pg_current_snapshot()::text, 0)"
        )
        op.execute(_APPEND_ONLY)
        for table in ("herald_events", "herald_log"):
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION herald_refuse_change()"
            )
        op.execute(_APPEND_FUNCTION)
    else:
        op.execute("INSERT INTO herald_sequencer (id, snapshot, last_seq) VALUES (1, NULL, 0)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION herald_append(text, jsonb, text, text, text, timestamptz)")
        for table in ("herald_events", "herald_log"):
            op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
        op.execute("DROP FUNCTION herald_refuse_change()")
    op.drop_table("herald_topics")
    op.drop_table("herald_sequencer")
    op.drop_table("herald_log")
    op.drop_index("uq_herald_events_aggregate_id_aggregate_version", table_name="herald_events")
    op.drop_index("uq_herald_events_dedupe_key", table_name="herald_events")
    op.drop_index("ix_herald_events_topic", table_name="herald_events")
    op.drop_index("ix_herald_events_tx", table_name="herald_events")
    op.drop_table("herald_events")
