"""The audit queries: a build's timeline, a consumer's backlog and history, topic counts.

Each function takes a connection, only reads, and returns a plain dataclass
whose ``to_json()`` is what ``herald audit ... --json`` prints (times in ISO
8601, UTC). Every query starts from an index, so its cost follows what it
reports (a build's events, a consumer's records, a time window), not the size
of the log:

* :func:`build_timeline`: the build aggregate's events through the unique
  index on ``(aggregate_id, aggregate_version)``, their seqs through the
  unique index on ``herald_log.position``, their delivery records through
  ``ix_herald_deliveries_seq``; messages and the projection by primary key.
* :func:`pending`: the consumer's row and parked events by primary key; the
  seqs after its offset as a range of ``herald_log``'s primary key, at most
  ``scan_limit`` of them (the answer says whether it reached the head), each
  seq's event looked up by primary key.
* :func:`consumer_report`: the consumer's delivery records through
  ``ix_herald_deliveries_consumer_started_at`` (a range of it with a
  ``since``), its operations through ``ix_herald_operations_consumer_id``.
* :func:`topic_counts`: with a ``since``, the events recorded since then
  through ``ix_herald_events_recorded_at``, and their records through the
  unique index on ``herald_log.position`` and ``ix_herald_deliveries_seq``;
  without one, the whole log (it is a count of everything).

A build's timeline is the events of the build's aggregate (what herald's
domain wrote). Events that name the build only in their payload, written
outside the domain (``herald_append`` from Hydra's own code,
``builds_added``, ``cached_build_*``), are not part of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.sql import visitors

from herald.consumers.model import OUTCOMES, validate_name
from herald.domain.build import STATUS_NAMES, Build
from herald.errors import UnknownAggregate, UnknownConsumer, UsageError
from herald.operations import Operation, history
from herald.outbox import TopicFilter, head
from herald.schema import (
    build_messages,
    builds,
    consumers,
    deliveries,
    events,
    log_order,
    parked,
)
from herald.schema.dberrors import translated

__all__ = [
    "PENDING_SCAN_LIMIT",
    "REPORT_ROWS",
    "BuildMessage",
    "BuildProjection",
    "BuildTimeline",
    "ConsumerReport",
    "DeliveryRecord",
    "ParkedEvent",
    "Pending",
    "PendingEvent",
    "TimelineEvent",
    "TopicCount",
    "TopicCounts",
    "build_timeline",
    "consumer_report",
    "pending",
    "topic_counts",
]

#: How many seqs after a consumer's offset :func:`pending` examines at most.
PENDING_SCAN_LIMIT: Final = 100_000

#: How many slowest deliveries and recent errors :func:`consumer_report` lists.
REPORT_ROWS: Final = 10

#: Rows per ``IN (...)`` list.
_CHUNK: Final = 1000


def _utc(value: datetime) -> datetime:
    """SQLite gives naive UTC times back, PostgreSQL its session's zone: both as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _utc(value).isoformat()


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _chunks(values: Sequence[int]) -> Iterable[list[int]]:
    for start in range(0, len(values), _CHUNK):
        yield list(values[start : start + _CHUNK])


def _status_name(status: int | None) -> str | None:
    return None if status is None else STATUS_NAMES.get(status, "unknown")


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One row of ``herald_deliveries``: one attempt (or decision) about one event."""

    id: int
    consumer: str
    seq: int
    attempt: int
    outcome: str
    kind: str
    started_at: datetime
    duration_ms: float
    error: str | None
    http_status: int | None
    detail: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Any) -> DeliveryRecord:
        return cls(
            id=row.id,
            consumer=row.consumer,
            seq=row.seq,
            attempt=row.attempt,
            outcome=row.outcome,
            kind=row.kind,
            started_at=_utc(row.started_at),
            duration_ms=float(row.duration_ms),
            error=row.error,
            http_status=row.http_status,
            detail=row.detail,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "consumer": self.consumer,
            "seq": self.seq,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "kind": self.kind,
            "started_at": _iso(self.started_at),
            "duration_ms": self.duration_ms,
            "error": self.error,
            "http_status": self.http_status,
            "detail": self.detail,
        }


# -- a build's timeline -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One event of a build's aggregate, with every delivery record of its seq."""

    #: None while the event has no place in the log yet (committed, not yet ordered)
    seq: int | None
    position: int
    topic: str
    aggregate_version: int
    delivery: str
    recorded_at: datetime
    occurred_at: datetime
    #: the build's generation the event is about (the payload's ``generation``), if it says
    generation: int | None
    payload: dict[str, Any]
    #: by consumer, then in the order written
    deliveries: list[DeliveryRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "position": self.position,
            "topic": self.topic,
            "aggregate_version": self.aggregate_version,
            "delivery": self.delivery,
            "recorded_at": _iso(self.recorded_at),
            "occurred_at": _iso(self.occurred_at),
            "generation": self.generation,
            "payload": self.payload,
            "deliveries": [d.to_json() for d in self.deliveries],
        }


@dataclass(frozen=True, slots=True)
class BuildMessage:
    """A Harbormaster message the build received (a ``herald_build_messages`` row)."""

    message_id: str
    type: str
    generation: int
    state: str
    reason: str | None
    received_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.type,
            "generation": self.generation,
            "state": self.state,
            "reason": self.reason,
            "received_at": _iso(self.received_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class BuildProjection:
    """The build's current state, as ``herald_builds`` has it."""

    state: str
    status: int | None
    generation: int

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "status": self.status,
            "status_name": _status_name(self.status),
            "generation": self.generation,
        }


@dataclass(frozen=True, slots=True)
class BuildTimeline:
    """What the log, the consumers and the projections say about one build."""

    build_id: int
    aggregate_id: str
    #: None when the projections have no row for the build
    build: BuildProjection | None
    #: in seq order; events without a seq yet come last, in version order
    events: list[TimelineEvent]
    #: in the order received
    messages: list[BuildMessage]

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": self.build_id,
            "aggregate_id": self.aggregate_id,
            "build": None if self.build is None else self.build.to_json(),
            "events": [e.to_json() for e in self.events],
            "messages": [m.to_json() for m in self.messages],
        }


def build_timeline(conn: sa.Connection, build_id: int) -> BuildTimeline:
    """Build ``build_id``'s timeline: its aggregate's events with their delivery records,
    its messages and its projection row.

    Raises :class:`~herald.errors.UnknownAggregate` when the log has no event of
    the build and the projections no row.
    """
    aggregate_id = str(Build.id_for(build_id))
    event_rows = (
        sa.select(
            log_order.c.seq,
            events.c.position,
            events.c.topic,
            events.c.aggregate_version,
            events.c.delivery,
            events.c.recorded_at,
            events.c.occurred_at,
            events.c.payload,
        )
        .select_from(events.outerjoin(log_order, log_order.c.position == events.c.position))
        .where(events.c.aggregate_id == aggregate_id)
        .order_by(log_order.c.seq.asc().nulls_last(), events.c.aggregate_version)
    )
    with translated():
        rows = conn.execute(event_rows).all()
        projection = conn.execute(
            sa.select(builds.c.state, builds.c.status, builds.c.generation).where(
                builds.c.build_id == build_id
            )
        ).one_or_none()
        if not rows and projection is None:
            raise UnknownAggregate("build", build_id)
        seqs = [row.seq for row in rows if row.seq is not None]
        records: dict[int, list[DeliveryRecord]] = {}
        for chunk in _chunks(seqs):
            for record in conn.execute(
                sa.select(deliveries)
                .where(deliveries.c.seq.in_(chunk))
                .order_by(deliveries.c.consumer, deliveries.c.id)
            ):
                records.setdefault(record.seq, []).append(DeliveryRecord.from_row(record))
        messages = conn.execute(
            sa.select(build_messages)
            .where(build_messages.c.build_id == build_id)
            .order_by(build_messages.c.received_at, build_messages.c.message_id)
        ).all()
    return BuildTimeline(
        build_id=build_id,
        aggregate_id=aggregate_id,
        build=None
        if projection is None
        else BuildProjection(projection.state, projection.status, projection.generation),
        events=[
            TimelineEvent(
                seq=row.seq,
                position=row.position,
                topic=row.topic,
                aggregate_version=row.aggregate_version,
                delivery=row.delivery,
                recorded_at=_utc(row.recorded_at),
                occurred_at=_utc(row.occurred_at),
                generation=_int_or_none(row.payload.get("generation")),
                payload=row.payload,
                deliveries=records.get(row.seq, []) if row.seq is not None else [],
            )
            for row in rows
        ],
        messages=[
            BuildMessage(
                message_id=m.message_id,
                type=m.type,
                generation=m.generation,
                state=m.state,
                reason=m.reason,
                received_at=_utc(m.received_at),
                updated_at=_utc(m.updated_at),
            )
            for m in messages
        ],
    )


# -- what a consumer has not finished ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event parked for the consumer (waiting for redelivery or a discard)."""

    seq: int
    #: None if the event is no longer in the log (pruned)
    topic: str | None
    recorded_at: datetime | None
    #: what orders the consumer's deliveries (``build:42``), if anything
    key: str | None
    attempts: int
    error: str | None
    parked_at: datetime
    #: the earlier parked seq of the same build this one waits behind (None: it failed itself)
    held_by: int | None
    redeliver_requested: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "topic": self.topic,
            "recorded_at": _iso(self.recorded_at),
            "key": self.key,
            "attempts": self.attempts,
            "error": self.error,
            "parked_at": _iso(self.parked_at),
            "held_by": self.held_by,
            "redeliver_requested": self.redeliver_requested,
        }


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event after the consumer's offset, of its topics."""

    seq: int
    topic: str
    recorded_at: datetime
    delivery: str
    #: the payload's ``build_id``, if it has an integer one
    build_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "topic": self.topic,
            "recorded_at": _iso(self.recorded_at),
            "delivery": self.delivery,
            "build_id": self.build_id,
        }


@dataclass(frozen=True, slots=True)
class Pending:
    """What a consumer has not finished: its parked events and the events after its offset."""

    consumer: str
    #: the consumer's topic filter; None: every topic (the consumer is not configured)
    topics: list[str] | None
    #: whether the consumer has a row (it has run at least once)
    has_run: bool
    offset: int
    head: int
    parked: list[ParkedEvent]
    #: events of its topics with ``offset < seq <= scanned_to``
    count: int
    #: how many of them are ``build_finished``
    build_finished: int
    #: the oldest one's ``recorded_at`` (None: nothing pending)
    since: datetime | None
    #: the oldest pending ``build_finished``'s ``recorded_at``
    build_finished_since: datetime | None
    #: the last seq examined: the head, unless more than the scan limit lie between
    scanned_to: int
    #: the first ``limit`` pending events, in seq order
    events: list[PendingEvent]

    @property
    def lag(self) -> int:
        """Seqs after the offset, of every topic."""
        return max(0, self.head - self.offset)

    @property
    def complete(self) -> bool:
        """Whether every seq up to the head was examined (the counts are exact)."""
        return self.scanned_to >= self.head

    def to_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "topics": self.topics,
            "has_run": self.has_run,
            "offset": self.offset,
            "head": self.head,
            "lag": self.lag,
            "parked": [p.to_json() for p in self.parked],
            "pending": {
                "count": self.count,
                "since": _iso(self.since),
                "build_finished": self.build_finished,
                "build_finished_since": _iso(self.build_finished_since),
                "scanned_to": self.scanned_to,
                "complete": self.complete,
                "events": [e.to_json() for e in self.events],
            },
        }


def _consumer_offset(conn: sa.Connection, name: str) -> int | None:
    value = conn.execute(
        sa.select(consumers.c.offset_seq).where(consumers.c.name == name)
    ).scalar_one_or_none()
    return None if value is None else int(value)


def _known_names(conn: sa.Connection) -> list[str]:
    return list(conn.execute(sa.select(consumers.c.name).order_by(consumers.c.name)).scalars())


def _topic_window(after: int, bound: int) -> sa.Subquery:
    """``seq`` and ``topic`` of the seqs in ``(after, bound]``.

    The topic is a scalar subquery per seq (by primary key), and ``OFFSET 0``
    keeps PostgreSQL from merging the window into the query around it: the
    plan reads the window's order rows and one event each, and cannot trade
    them for a scan of every event of the consumer's topics in the log.
    """
    topic = (
        sa.select(events.c.topic)
        .where(events.c.position == log_order.c.position)
        .scalar_subquery()
        .label("topic")
    )
    return (
        sa.select(log_order.c.seq, topic)
        .where(log_order.c.seq > after, log_order.c.seq <= bound)
        .order_by(log_order.c.seq)
        .offset(0)
        .subquery(name="pending_window")
    )


def _window_filter(window: sa.Subquery, topics: TopicFilter | None) -> list[sa.ColumnElement[bool]]:
    """The topic filter's condition on the window's ``topic`` (none: every topic)."""
    if not topics:
        return []
    column = window.c.topic

    def swap(element: Any, **_kw: Any) -> Any:
        return column if element is events.c.topic else None

    adapted = visitors.replacement_traverse(topics.clause(), {}, swap)
    return [adapted]


def _pending_events(conn: sa.Connection, seqs: Iterable[int]) -> dict[int, PendingEvent]:
    wanted = sorted(set(seqs))
    found: dict[int, PendingEvent] = {}
    for chunk in _chunks(wanted):
        rows = conn.execute(
            sa.select(
                log_order.c.seq,
                events.c.topic,
                events.c.recorded_at,
                events.c.delivery,
                events.c.payload,
            )
            .join_from(log_order, events, log_order.c.position == events.c.position)
            .where(log_order.c.seq.in_(chunk))
        )
        for row in rows:
            found[row.seq] = PendingEvent(
                seq=row.seq,
                topic=row.topic,
                recorded_at=_utc(row.recorded_at),
                delivery=row.delivery,
                build_id=_int_or_none(row.payload.get("build_id")),
            )
    return found


def pending(
    conn: sa.Connection,
    consumer: str,
    topics: TopicFilter | None,
    limit: int = 20,
    *,
    scan_limit: int = PENDING_SCAN_LIMIT,
) -> Pending:
    """What ``consumer`` has not finished (Hydra's ``notificationPendingSince``, per consumer).

    ``topics`` is the consumer's configured filter; ``None`` means the consumer
    is not configured here, and then every topic counts and the consumer must
    have a row (have run), or :class:`~herald.errors.UnknownConsumer` is
    raised. A configured consumer that has never run has offset 0. At most
    ``scan_limit`` seqs after the offset are examined (``scanned_to``).
    """
    validate_name(consumer)
    if limit < 0:
        raise UsageError(f"limit must be 0 or more, not {limit}")
    if scan_limit < 1:
        raise UsageError(f"scan_limit must be at least 1, not {scan_limit}")
    with translated():
        offset = _consumer_offset(conn, consumer)
        if offset is None and topics is None:
            raise UnknownConsumer(consumer, _known_names(conn))
        start = offset or 0
        top = head(conn)
        bound = min(top, start + scan_limit)
        parked_rows = conn.execute(
            sa.select(
                parked.c.seq,
                parked.c.key,
                parked.c.held_by,
                parked.c.attempts,
                parked.c.error,
                parked.c.parked_at,
                parked.c.redeliver,
                events.c.topic,
                events.c.recorded_at,
            )
            .select_from(
                parked.outerjoin(log_order, log_order.c.seq == parked.c.seq).outerjoin(
                    events, events.c.position == log_order.c.position
                )
            )
            .where(parked.c.consumer == consumer)
            .order_by(parked.c.seq)
        ).all()

        # The seqs after the offset, each with its event's topic looked up by primary
        # key (a subquery per row, never joined as a whole: the cost follows the
        # window, however many events of the same topics the log holds).
        window = _topic_window(start, bound)
        matching = _window_filter(window, topics)
        finished = window.c.topic == "build_finished"
        count, finished_count, oldest, oldest_finished = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.count().filter(finished),
                sa.func.min(window.c.seq),
                sa.func.min(window.c.seq).filter(finished),
            ).where(*matching)
        ).one()
        first: list[int] = []
        if limit:
            first = [
                int(seq)
                for seq in conn.execute(
                    sa.select(window.c.seq).where(*matching).order_by(window.c.seq).limit(limit)
                ).scalars()
            ]
        found = _pending_events(
            conn, [seq for seq in (*first, oldest, oldest_finished) if seq is not None]
        )
    return Pending(
        consumer=consumer,
        topics=None if topics is None else [*topics.exact, *topics.patterns],
        has_run=offset is not None,
        offset=start,
        head=top,
        parked=[
            ParkedEvent(
                seq=r.seq,
                topic=r.topic,
                recorded_at=None if r.recorded_at is None else _utc(r.recorded_at),
                key=r.key,
                attempts=r.attempts,
                error=r.error,
                parked_at=_utc(r.parked_at),
                held_by=r.held_by,
                redeliver_requested=bool(r.redeliver),
            )
            for r in parked_rows
        ],
        count=int(count),
        build_finished=int(finished_count),
        since=None if oldest is None else found[int(oldest)].recorded_at,
        build_finished_since=None
        if oldest_finished is None
        else found[int(oldest_finished)].recorded_at,
        scanned_to=max(start, bound),
        events=[found[seq] for seq in first],
    )


# -- a consumer's delivery history -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsumerReport:
    """A consumer's delivery records (since a time, or all), its state and its operations."""

    consumer: str
    since: datetime | None
    #: None when the consumer has no row (configured, never run)
    offset: int | None
    head: int
    parked: int
    #: delivery records in the window
    records: int
    #: handler calls: delivered, failed and parked records with attempt ≥ 1 (a parked
    #: record with attempt 0 held an event behind an earlier parked one, without a call)
    attempts: int
    #: failed and parked handler calls
    failed_attempts: int
    #: records per outcome (every outcome, 0 included) and per kind (those present)
    outcomes: dict[str, int]
    kinds: dict[str, int]
    #: parked records with attempt 0
    held: int
    #: the longest records, longest first (each with its event's topic)
    slowest: list[tuple[DeliveryRecord, str | None]]
    #: the newest failed or parked records with an error, newest first
    errors: list[tuple[DeliveryRecord, str | None]]
    #: the consumer's resets and replays (since the time), newest first
    operations: list[Operation]

    @property
    def failure_rate(self) -> float | None:
        """Failed and parked handler calls per handler call (None: no call)."""
        return self.failed_attempts / self.attempts if self.attempts else None

    def to_json(self) -> dict[str, Any]:
        def listed(items: list[tuple[DeliveryRecord, str | None]]) -> list[dict[str, Any]]:
            return [{**record.to_json(), "topic": topic} for record, topic in items]

        return {
            "consumer": self.consumer,
            "since": _iso(self.since),
            "offset": self.offset,
            "head": self.head,
            "lag": None if self.offset is None else max(0, self.head - self.offset),
            "parked": self.parked,
            "records": self.records,
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "failure_rate": self.failure_rate,
            "outcomes": self.outcomes,
            "kinds": self.kinds,
            "held": self.held,
            "slowest": listed(self.slowest),
            "errors": listed(self.errors),
            "operations": [op.to_json() for op in self.operations],
        }


def _topics_at(conn: sa.Connection, seqs: Iterable[int]) -> dict[int, str]:
    wanted = sorted(set(seqs))
    found: dict[int, str] = {}
    for chunk in _chunks(wanted):
        rows = conn.execute(
            sa.select(log_order.c.seq, events.c.topic)
            .join_from(log_order, events, log_order.c.position == events.c.position)
            .where(log_order.c.seq.in_(chunk))
        )
        found.update((row.seq, row.topic) for row in rows)
    return found


def consumer_report(
    conn: sa.Connection,
    consumer: str,
    since: datetime | None = None,
    *,
    configured: bool = False,
) -> ConsumerReport:
    """``consumer``'s delivery history (records started at or after ``since``, or all).

    A consumer without a row is unknown (:class:`~herald.errors.UnknownConsumer`)
    unless ``configured`` says it is configured (its report is then empty).
    """
    validate_name(consumer)
    window: list[sa.ColumnElement[bool]] = [deliveries.c.consumer == consumer]
    if since is not None:
        window.append(deliveries.c.started_at >= since)
    called = (deliveries.c.attempt >= 1).label("called")
    with translated():
        offset = _consumer_offset(conn, consumer)
        if offset is None and not configured:
            raise UnknownConsumer(consumer, _known_names(conn))
        top = head(conn)
        parked_count = conn.execute(
            sa.select(sa.func.count()).select_from(parked).where(parked.c.consumer == consumer)
        ).scalar_one()
        groups = conn.execute(
            sa.select(deliveries.c.outcome, deliveries.c.kind, called, sa.func.count())
            .where(*window)
            .group_by(deliveries.c.outcome, deliveries.c.kind, called)
        ).all()
        slowest = [
            DeliveryRecord.from_row(r)
            for r in conn.execute(
                sa.select(deliveries)
                .where(*window)
                .order_by(deliveries.c.duration_ms.desc(), deliveries.c.id)
                .limit(REPORT_ROWS)
            )
        ]
        errors = [
            DeliveryRecord.from_row(r)
            for r in conn.execute(
                sa.select(deliveries)
                .where(
                    *window,
                    deliveries.c.outcome.in_(("failed", "parked")),
                    deliveries.c.error.is_not(None),
                )
                .order_by(deliveries.c.started_at.desc(), deliveries.c.id.desc())
                .limit(REPORT_ROWS)
            )
        ]
        topics = _topics_at(conn, [r.seq for r in slowest + errors])
    operations = history(conn, consumer=consumer, since=since)
    outcomes = dict.fromkeys(OUTCOMES, 0)
    kinds: dict[str, int] = {}
    attempts = failed_attempts = held = 0
    for outcome, kind, was_called, count in groups:
        outcomes[outcome] = outcomes.get(outcome, 0) + count
        kinds[kind] = kinds.get(kind, 0) + count
        if outcome in ("delivered", "failed", "parked") and was_called:
            attempts += count
            if outcome != "delivered":
                failed_attempts += count
        if outcome == "parked" and not was_called:
            held += count
    return ConsumerReport(
        consumer=consumer,
        since=None if since is None else _utc(since),
        offset=offset,
        head=top,
        parked=int(parked_count),
        records=sum(outcomes.values()),
        attempts=attempts,
        failed_attempts=failed_attempts,
        outcomes=outcomes,
        kinds=dict(sorted(kinds.items())),
        held=held,
        slowest=[(r, topics.get(r.seq)) for r in slowest],
        errors=[(r, topics.get(r.seq)) for r in errors],
        operations=[op for op in operations if op.action in ("reset", "replay")],
    )


# -- per topic ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicCount:
    """One topic: its events, and the outcomes of the delivery records of those events."""

    topic: str
    events: int
    #: records per outcome (every outcome, 0 included)
    deliveries: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "events": self.events, "deliveries": self.deliveries}


@dataclass(frozen=True, slots=True)
class TopicCounts:
    """Every topic with events recorded since a time (or at all), by topic."""

    since: datetime | None
    topics: list[TopicCount]

    def to_json(self) -> dict[str, Any]:
        return {
            "since": _iso(self.since),
            "events": sum(t.events for t in self.topics),
            "topics": [t.to_json() for t in self.topics],
        }


def topic_counts(conn: sa.Connection, since: datetime | None = None) -> TopicCounts:
    """Per topic: events recorded at or after ``since`` (or all), and the outcomes of
    every consumer's delivery records of those events."""
    recent = [] if since is None else [events.c.recorded_at >= since]
    with translated():
        counted = conn.execute(
            sa.select(events.c.topic, sa.func.count())
            .where(*recent)
            .group_by(events.c.topic)
            .order_by(events.c.topic)
        ).all()
        outcomes = conn.execute(
            sa.select(events.c.topic, deliveries.c.outcome, sa.func.count())
            .select_from(
                events.join(log_order, log_order.c.position == events.c.position).join(
                    deliveries, deliveries.c.seq == log_order.c.seq
                )
            )
            .where(*recent)
            .group_by(events.c.topic, deliveries.c.outcome)
        ).all()
    by_topic: dict[str, dict[str, int]] = {}
    for topic, outcome, count in outcomes:
        by_topic.setdefault(topic, dict.fromkeys(OUTCOMES, 0))[outcome] = int(count)
    return TopicCounts(
        since=None if since is None else _utc(since),
        topics=[
            TopicCount(topic, int(count), by_topic.get(topic, dict.fromkeys(OUTCOMES, 0)))
            for topic, count in counted
        ],
    )
