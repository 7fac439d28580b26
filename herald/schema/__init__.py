"""The database schema: the only place that knows table and column names.

* :mod:`herald.schema.tables` — SQLAlchemy 2 table definitions (the models);
* ``migrations/`` — Alembic migrations that build the same schema, plus the
  PostgreSQL-only objects (the append-only triggers, ``herald_append``);
* ``sql/queries.sql`` — the named PostgreSQL queries (the sequencer, the
  wake-up channel), loaded by :mod:`herald.schema.queries`;
* :mod:`herald.schema.migrate` — running the migrations programmatically.

This package imports nothing of herald but :mod:`herald.errors`.
"""

from herald.schema.tables import (
    CONSUMER_LOCK_CLASS,
    CONSUMER_TABLES,
    NOTIFY_CHANNEL,
    PROJECTIONS,
    SEQUENCER_LOCK_KEY,
    build_dependencies,
    build_messages,
    build_steps,
    builds,
    consumers,
    deliveries,
    evaluations,
    events,
    log_order,
    metadata,
    operations,
    parked,
    sequencer_state,
    topics,
)

__all__ = [
    "CONSUMER_LOCK_CLASS",
    "CONSUMER_TABLES",
    "NOTIFY_CHANNEL",
    "PROJECTIONS",
    "SEQUENCER_LOCK_KEY",
    "build_dependencies",
    "build_messages",
    "build_steps",
    "builds",
    "consumers",
    "deliveries",
    "evaluations",
    "events",
    "log_order",
    "metadata",
    "operations",
    "parked",
    "sequencer_state",
    "topics",
]
