"""The log's tables, as SQLAlchemy 2 Core tables.

``herald_events`` holds one row per event; ``herald_log`` gives each event
its place in the log (``seq``), in the order the events became visible.
``seq`` is the offset that consumers, replay and audit speak of; ``position``
is only an identity (on PostgreSQL a bigserial that concurrent writers commit
out of order, which is why the order table exists at all).
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import UserDefinedType

__all__ = [
    "CONSUMER_LOCK_CLASS",
    "CONSUMER_TABLES",
    "NOTIFY_CHANNEL",
    "PROJECTIONS",
    "SEQUENCER_LOCK_KEY",
    "XID8",
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

#: The channel the sequencer NOTIFYs after each cycle that added rows. The
#: payload (the newest seq) is a hint only: readers always re-read the table.
NOTIFY_CHANNEL: Final = "herald_log"

#: The session advisory lock that elects the one active sequencer
#: (``pg_try_advisory_lock``). ``0x6865726c64`` spells "herld".
SEQUENCER_LOCK_KEY: Final = 0x6865726C64

#: The first key of the two-key session advisory locks that say which process
#: runs a consumer: ``pg_try_advisory_lock(CONSUMER_LOCK_CLASS, hashtext(name))``.
#: Two names with the same hash share a lock: that only means one process runs
#: both, never that two run one. 0x68726c63 spells "hrlc".
CONSUMER_LOCK_CLASS: Final = 0x68726C63

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class XID8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id; an (always null) BIGINT on SQLite."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "XID8"


@compiles(XID8, "sqlite")
def _xid8_sqlite(element: XID8, compiler: Any, **kw: Any) -> str:
    return "BIGINT"


# Reflection (Alembic's comparison, `herald db check`) must know the type too.
postgresql.base.ischema_names["xid8"] = XID8


class current_xact_id(FunctionElement[int]):  # noqa: N801 - named like the SQL function
    """``pg_current_xact_id()``: the writing transaction's id; NULL on SQLite."""

    type = XID8()
    inherit_cache = True


@compiles(current_xact_id, "postgresql")
def _current_xact_id_pg(element: current_xact_id, compiler: Any, **kw: Any) -> str:
    return "pg_current_xact_id()"


@compiles(current_xact_id)
def _current_xact_id_other(element: current_xact_id, compiler: Any, **kw: Any) -> str:
    return "NULL"


# A bigserial on PostgreSQL; INTEGER PRIMARY KEY (the rowid) on SQLite.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_Timestamp = sa.DateTime(timezone=True)

events = sa.Table(
    "herald_events",
    metadata,
    sa.Column("position", _BigId, primary_key=True, autoincrement=True),
    # Which transaction wrote the row: the sequencer orders events by the
    # visibility of this id. Filled by the database itself, so writers in any
    # language (and the SQL function) cannot get it wrong.
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
        "delivery IN ('at_least_once', 'ephemeral', 'once_per_eval')", name="delivery"
    ),
    sa.CheckConstraint(
        "(aggregate_id IS NULL) = (aggregate_version IS NULL)", name="aggregate_version"
    ),
    sqlite_autoincrement=True,
)
sa.Index("ix_herald_events_tx", events.c.tx)
# `--since` / `--until` and prune's age test find their first event through it.
sa.Index("ix_herald_events_recorded_at", events.c.recorded_at)
sa.Index("ix_herald_events_topic", events.c.topic, events.c.position)
sa.Index(
    "uq_herald_events_dedupe_key",
    events.c.dedupe_key,
    unique=True,
    postgresql_where=events.c.dedupe_key.is_not(None),
    sqlite_where=events.c.dedupe_key.is_not(None),
)
sa.Index(
    "uq_herald_events_aggregate_id_aggregate_version",
    events.c.aggregate_id,
    events.c.aggregate_version,
    unique=True,
    postgresql_where=events.c.aggregate_id.is_not(None),
    sqlite_where=events.c.aggregate_id.is_not(None),
)

log_order = sa.Table(
    "herald_log",
    metadata,
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    # An event's position, with no foreign key to herald_events (migration 0006):
    # checking one took a row lock on the event for every ordered event, a write
    # to the event's heap page (8.5 kB of WAL per ordered event after a
    # checkpoint, against 215 B without). Nothing needs it: the sequencer orders
    # positions it has just read from herald_events, and events are deleted only
    # by `herald prune`, together with their order rows (retention.py).
    sa.Column("position", sa.BigInteger(), nullable=False, unique=True),
)

#: The sequencer's state: one row. ``snapshot`` is the PostgreSQL snapshot
#: (``pg_snapshot`` as text) up to which events have been ordered, ``last_seq``
#: the newest seq given out. Both change in the same transaction as the order
#: rows they describe, so a takeover continues exactly where the last cycle
#: committed.
sequencer_state = sa.Table(
    "herald_sequencer",
    metadata,
    sa.Column("id", sa.SmallInteger(), primary_key=True, autoincrement=False),
    sa.Column("snapshot", sa.Text(), nullable=True),
    sa.Column("last_seq", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("updated_at", _Timestamp, nullable=True),
    sa.CheckConstraint("id = 1", name="one_row"),
)

#: The event catalogue, copied from Python (``herald.domain.catalogue``) by
#: ``herald db upgrade`` so that ``herald_append`` validates like Python does.
topics = sa.Table(
    "herald_topics",
    metadata,
    sa.Column("topic", sa.String(100), primary_key=True),
    sa.Column("delivery", sa.String(16), nullable=False),
    # {"field": "integer" | "string" | "integer[]" | "string?" | "integer?"}
    sa.Column("fields", _Json, nullable=False),
)

# -- projections: the farm's current state, rebuilt from the log alone -------------
#
# What a web page or a queue runner reads. The unit of work writes them in the
# same transaction as the log rows of the events that changed them; `herald
# projections rebuild` writes them again from the log. Prefixed herald_ because
# herald may share a database with Hydra, whose own tables are `builds`,
# `buildsteps` and `jobsetevals`.

evaluations = sa.Table(
    "herald_evaluations",
    metadata,
    sa.Column("aggregate_id", sa.String(36), primary_key=True),
    sa.Column("trace_id", sa.String(100), nullable=False, unique=True),
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
)

builds = sa.Table(
    "herald_builds",
    metadata,
    sa.Column("build_id", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("aggregate_id", sa.String(36), nullable=False, unique=True),
    sa.Column("jobset_id", sa.BigInteger(), nullable=False),
    sa.Column("job", sa.String(255), nullable=False),
    sa.Column("drv_path", sa.Text(), nullable=False),
    sa.Column("system", sa.String(64), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("dependencies", _Json, nullable=False),
    # queued | running | waiting | finished | cancelled
    sa.Column("state", sa.String(16), nullable=False),
    # Hydra's build status code once finished (0 succeeded, 1 failed, 2 dependency failed, …)
    sa.Column("status", sa.SmallInteger(), nullable=True),
    sa.Column("generation", sa.Integer(), nullable=False),
    sa.Column("substituted", sa.Boolean(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("queued_at", _Timestamp, nullable=False),
    sa.Column("started_at", _Timestamp, nullable=True),
    sa.Column("finished_at", _Timestamp, nullable=True),
    sa.Column("updated_at", _Timestamp, nullable=False),
)
sa.Index("ix_herald_builds_state", builds.c.state, builds.c.build_id)
sa.Index("ix_herald_builds_jobset_id", builds.c.jobset_id)

#: Which build depends on which: the edges of the dependency graph, indexed by
#: the build depended on, so that a failure finds its dependents at once.
build_dependencies = sa.Table(
    "herald_build_dependencies",
    metadata,
    sa.Column("build_id", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("depends_on", sa.BigInteger(), primary_key=True, autoincrement=False),
)
sa.Index("ix_herald_build_dependencies_depends_on", build_dependencies.c.depends_on)

build_steps = sa.Table(
    "herald_build_steps",
    metadata,
    sa.Column("build_id", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("generation", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("step_nr", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("machine", sa.String(255), nullable=False),
    sa.Column("status", sa.SmallInteger(), nullable=True),
    sa.Column("log_path", sa.Text(), nullable=True),
    sa.Column("started_at", _Timestamp, nullable=False),
    sa.Column("finished_at", _Timestamp, nullable=True),
)

build_messages = sa.Table(
    "herald_build_messages",
    metadata,
    sa.Column("build_id", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("message_id", sa.String(200), primary_key=True),
    # pass | fail | work
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("generation", sa.Integer(), nullable=False),
    # pending | applied | ignored | stale
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("received_at", _Timestamp, nullable=False),
    sa.Column("updated_at", _Timestamp, nullable=False),
)

#: The projection tables, in the order `herald projections rebuild` empties them.
PROJECTIONS: Final = (build_messages, build_steps, build_dependencies, builds, evaluations)

# -- consumers: offsets, delivery records, parked events ---------------------------
#
# Written by the consumer daemon (`herald run`) and by `herald parked`; read by
# `herald consumers` and the audit queries.

#: One row per consumer that has ever run. ``offset_seq`` is the consumer's
#: offset: the last seq it has *finished* (delivered, parked, expired, failed
#: for good, or skipped as outside its topics); it reads after it. ``owner``
#: names the process running it (``host:pid:claim``): the daemon advances the
#: offset only ``WHERE owner = <its claim>``, so a process that lost its claim
#: can never move an offset another process now owns. ``lease_until`` is how
#: long the claim holds without renewal (SQLite; on PostgreSQL the claim is a
#: session advisory lock and the lease is informative). ``control`` changes
#: whenever an operator redelivers or discards a parked event, telling the
#: daemon to re-read its parked events.
consumers = sa.Table(
    "herald_consumers",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("offset_seq", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("lease_until", _Timestamp, nullable=True),
    sa.Column("control", sa.BigInteger(), nullable=False, server_default="0"),
    # Bumped by every `herald consumers reset`: the daemon running the consumer
    # re-reads its offset at the next batch, and its commits of the batch in
    # flight keep their records but no longer move the offset.
    sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
    # The newest delivery record id at the last reset: live records at or below
    # it are history, never "already finished" work of the current run.
    sa.Column("records_floor", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("created_at", _Timestamp, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", _Timestamp, nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("offset_seq >= 0", name="offset_seq"),
)

#: Every delivery attempt of every event to every consumer (events outside a
#: consumer's topics get none). Written in the same transaction as the offset
#: advance that covers the event. ``outcome``: delivered, failed (this attempt
#: failed; for an ephemeral event, that was its one attempt), parked (the
#: at_least_once budget ran out, or an earlier event of the same build is
#: parked), expired (an ephemeral event older than the consumer's staleness
#: limit, not delivered) or discarded (an operator gave up a parked event;
#: ``error`` holds the reason). ``kind`` is live (the daemon reading after
#: its offset) or redelivery (a parked event sent again by request).
deliveries = sa.Table(
    "herald_deliveries",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("consumer", sa.String(200), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="live"),
    sa.Column("started_at", _Timestamp, nullable=False),
    sa.Column("duration_ms", sa.Float(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("http_status", sa.Integer(), nullable=True),
    # What else the handler reported: a command's exit code and signal, ...
    sa.Column("detail", _Json, nullable=True),
    sa.CheckConstraint(
        "outcome IN ('delivered', 'failed', 'parked', 'expired', 'discarded')", name="outcome"
    ),
    sqlite_autoincrement=True,
)
sa.Index("ix_herald_deliveries_consumer_seq", deliveries.c.consumer, deliveries.c.seq)
sa.Index("ix_herald_deliveries_seq", deliveries.c.seq)
sa.Index("ix_herald_deliveries_consumer_started_at", deliveries.c.consumer, deliveries.c.started_at)

#: The events a consumer has parked and not yet had redelivered or discarded.
#: ``held_by`` is the seq of an earlier parked event of the same build (``key``)
#: that this one waits behind, so that a build's events reach a consumer in
#: order even across parking; null for the event that failed itself.
#: ``redeliver`` is set by `herald parked redeliver` and cleared by the daemon.
parked = sa.Table(
    "herald_parked",
    metadata,
    sa.Column("consumer", sa.String(200), primary_key=True),
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("held_by", sa.BigInteger(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("parked_at", _Timestamp, nullable=False),
    sa.Column("redeliver", sa.Boolean(), nullable=False, server_default=sa.false()),
)

#: The consumer tables, for tests and tools that need to know them.
CONSUMER_TABLES: Final = (consumers, deliveries, parked)

# -- operations: what operators did to consumers and to the log ----------------------

#: One row per operator action that changes what a consumer reads or what the
#: log holds: ``reset`` (a consumer's offset moved: detail has from, to, how,
#: forced), ``replay`` (a range delivered again without moving the offset:
#: from, to, counts) and ``prune`` (events deleted: the seq range, counts, the
#: age limit). ``actor`` is the operating-system user and host that ran the
#: command, ``db_user`` the database role it connected as (PostgreSQL).
operations = sa.Table(
    "herald_operations",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("consumer", sa.String(200), nullable=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("db_user", sa.String(200), nullable=True),
    sa.Column("at", _Timestamp, nullable=False, server_default=sa.func.now()),
    sa.Column("detail", _Json, nullable=False),
    sa.CheckConstraint("action IN ('reset', 'replay', 'prune')", name="action"),
    sqlite_autoincrement=True,
)
sa.Index("ix_herald_operations_consumer_id", operations.c.consumer, operations.c.id)
sa.Index("ix_herald_operations_action_id", operations.c.action, operations.c.id)
