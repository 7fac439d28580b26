"""Appending events: inside the caller's transaction, atomic with its writes.

>>> with engine.begin() as conn:
...     conn.execute(update(builds).where(...).values(status=0))
...     herald.append(conn, "build_finished", {"build_id": 42, "dependent_ids": []})

The events are validated first (topic, payload, size: see
:mod:`herald.domain.catalogue`); on any error nothing is written. A rollback
of the caller's transaction leaves no trace of them. Many events go in a
multi-row ``INSERT`` (SQLAlchemy's insertmanyvalues: one statement per 1,000
rows), never one round-trip per event.

Dedupe keys: appending an event whose ``dedupe_key`` is already in the log is
a no-op that returns the existing event's position. ``once_per_eval`` topics
get the key ``topic:eval_id:build_id`` unless one is given.

Aggregate versions: ``(aggregate_id, aggregate_version)`` is unique; a second
writer appending the same version raises :class:`~herald.errors.VersionConflict`
(the caller's transaction must then be rolled back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from herald.domain import CATALOGUE, validate_event
from herald.errors import InvalidPayload, VersionConflict
from herald.schema import events, log_order
from herald.schema.dberrors import translate

__all__ = ["NewEvent", "Writer", "append", "append_many"]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append."""

    topic: str
    payload: dict[str, Any]
    dedupe_key: str | None = None
    trace_id: str | None = None
    #: only for custom topics; catalogue topics have their rule fixed
    delivery: str | None = None
    occurred_at: datetime | None = None
    aggregate_id: str | None = None
    aggregate_version: int | None = None


#: What an append writes through: the caller's SQLAlchemy connection or ORM
#: session, or (PostgreSQL) a plain psycopg 3 connection.
Writer = sa.Connection | Session | psycopg.Connection[Any]


def append(
    conn: Writer,
    topic: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    trace_id: str | None = None,
    delivery: str | None = None,
    occurred_at: datetime | None = None,
    aggregate_id: str | None = None,
    aggregate_version: int | None = None,
) -> int:
    """Append one event in ``conn``'s transaction; returns its position."""
    event = NewEvent(
        topic, payload, dedupe_key, trace_id, delivery, occurred_at, aggregate_id, aggregate_version
    )
    return append_many(conn, [event])[0]


def append_many(conn: Writer, new_events: Iterable[NewEvent]) -> list[int]:
    """Append events in ``conn``'s transaction, in order; returns their positions.

    A duplicate dedupe key (in the log already, or earlier in the same call)
    returns the position of the event that has it.
    """
    rows = [_row(event) for event in new_events]
    if not rows:
        return []
    if isinstance(conn, psycopg.Connection):
        return _append_psycopg(conn, rows)
    connection = conn.connection() if isinstance(conn, Session) else conn
    dialect = connection.dialect.name
    if dialect == "sqlite":
        now = datetime.now(UTC)
        for row in rows:
            row["recorded_at"] = now
    insert = _insert_sqlite if dialect == "sqlite" else _insert_postgresql
    positions: list[int] = []
    first_new: int | None = None
    try:
        for deduped, run in _runs(rows):
            found, new = insert(connection, run, deduped=deduped)
            positions.extend(found)
            if new and first_new is None:
                first_new = min(new)
        if dialect == "sqlite" and first_new is not None:
            _order_on_sqlite(connection, first_new)
    except sa_exc.IntegrityError as exc:
        raise _conflict(exc, rows) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc) from exc
    return positions


def _append_psycopg(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[int]:
    """The same appends on a plain psycopg connection (PostgreSQL).

    For writers that use psycopg directly: no SQLAlchemy on the path, and
    many events go through psycopg's pipelined executemany (one network
    round trip for the lot, not one per event).
    """
    positions: list[int] = []
    try:
        with conn.cursor() as cur:
            for deduped, run in _runs(rows):
                if not deduped:
                    positions += _returned(cur, _PG_INSERT_ONE, [_pg_params(r) for r in run])
                    continue
                unique = _unique_keys(run)
                found = _returned(cur, _PG_INSERT_DEDUPED, [_pg_params(r) for r in unique])
                by_key = dict(zip([r["dedupe_key"] for r in unique], found, strict=True))
                missing = [key for key, pos in by_key.items() if pos is None]
                if missing:
                    cur.execute(_PG_POSITIONS_OF, (missing,))
                    by_key.update(cur.fetchall())
                positions += [by_key[r["dedupe_key"]] for r in run]
    except psycopg.errors.UniqueViolation as exc:
        raise _conflict(exc, rows) from exc
    except psycopg.Error as exc:
        raise translate(exc) from exc
    return positions


def _returned(cur: psycopg.Cursor[Any], sql: str, params: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``sql`` for each parameter tuple; the first column it returned, or None."""
    if len(params) == 1:
        cur.execute(sql, params[0])
        row = cur.fetchone()
        return [row[0] if row else None]
    cur.executemany(sql, params, returning=True)
    found: list[Any] = []
    while True:
        row = cur.fetchone()
        found.append(row[0] if row else None)
        if not cur.nextset():
            return found


_LENGTHS = {
    name: getattr(events.c[name].type, "length", 0)
    for name in ("dedupe_key", "trace_id", "aggregate_id")
}


def _row(event: NewEvent) -> dict[str, Any]:
    topic, delivery, _text = validate_event(event.topic, event.payload, event.delivery)
    dedupe_key = event.dedupe_key
    if dedupe_key is None and delivery == "once_per_eval" and topic in CATALOGUE:
        dedupe_key = f"{topic}:{event.payload['eval_id']}:{event.payload['build_id']}"
    for name, value in (
        ("dedupe_key", dedupe_key),
        ("trace_id", event.trace_id),
        ("aggregate_id", event.aggregate_id),
    ):
        limit = _LENGTHS[name]
        if value is not None and (
            not isinstance(value, str) or not value or len(value) > limit or not _is_unicode(value)
        ):
            raise InvalidPayload(
                topic, f"{name} must be a non-empty string of at most {limit} characters"
            )
    if (event.aggregate_id is None) != (event.aggregate_version is None):
        raise InvalidPayload(topic, "aggregate_id and aggregate_version go together")
    occurred_at = event.occurred_at or datetime.now(UTC)
    if occurred_at.tzinfo is None:
        raise InvalidPayload(topic, "occurred_at must be timezone-aware")
    return {
        "topic": topic,
        "payload": event.payload,
        "delivery": delivery,
        "dedupe_key": dedupe_key,
        "aggregate_id": event.aggregate_id,
        "aggregate_version": event.aggregate_version,
        "trace_id": event.trace_id,
        "occurred_at": occurred_at,
    }


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _runs(rows: list[dict[str, Any]]) -> Iterable[tuple[bool, list[dict[str, Any]]]]:
    """Consecutive rows with and without dedupe keys, so the log keeps the caller's order."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or (rows[i]["dedupe_key"] is None) != (rows[start]["dedupe_key"] is None):
            yield rows[start]["dedupe_key"] is not None, rows[start:i]
            start = i


Inserted = tuple[list[int], list[int]]
"""(the position of every row, in order; the positions of the rows actually inserted)"""


def _unique_keys(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["dedupe_key"], row)
    return list(unique.values())


def _positions_of(conn: sa.Connection, keys: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in (keys[i : i + 1000] for i in range(0, len(keys), 1000)):
        stmt = sa.select(events.c.dedupe_key, events.c.position).where(
            events.c.dedupe_key.in_(chunk)
        )
        found.update((row[0], row[1]) for row in conn.execute(stmt))
    return found


_PG_COLUMNS = (
    "topic",
    "payload",
    "delivery",
    "dedupe_key",
    "aggregate_id",
    "aggregate_version",
    "trace_id",
    "occurred_at",
)
_PG_INSERT_ONE = (
    f"INSERT INTO {events.name} ({', '.join(_PG_COLUMNS)}) "
    "VALUES (%s, CAST(%s AS jsonb), %s, %s, %s, %s, %s, %s) RETURNING position"
)


_PG_INSERT_DEDUPED = _PG_INSERT_ONE.replace(
    " RETURNING position",
    " ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING position",
)
_PG_POSITIONS_OF = f"SELECT dedupe_key, position FROM {events.name} WHERE dedupe_key = ANY(%s)"


def _pg_params(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row as the driver's parameters for _PG_INSERT_ONE (the payload as JSON text)."""
    return tuple(
        json.dumps(row[name], separators=(",", ":"), ensure_ascii=False)
        if name == "payload"
        else row[name]
        for name in _PG_COLUMNS
    )


def _insert_postgresql(
    conn: sa.Connection, rows: list[dict[str, Any]], *, deduped: bool
) -> Inserted:
    """Multi-row INSERT ... RETURNING (insertmanyvalues: 1,000 rows a statement)."""
    if not deduped:
        if len(rows) == 1:
            # The hot path (one event in a writer's transaction): one statement
            # straight to the driver, with the payload as JSON text. Compiling
            # the Core insert costs about as much client CPU as the round trip.
            new = [conn.exec_driver_sql(_PG_INSERT_ONE, _pg_params(rows[0])).scalar_one()]
        else:
            stmt = sa.insert(events).returning(events.c.position, sort_by_parameter_order=True)
            new = list(conn.execute(stmt, rows).scalars())
        return new, new
    unique = _unique_keys(rows)
    stmt = (
        postgresql.insert(events)
        .on_conflict_do_nothing(
            index_elements=[events.c.dedupe_key], index_where=events.c.dedupe_key.is_not(None)
        )
        .returning(events.c.dedupe_key, events.c.position)
    )
    result = conn.execute(stmt, unique[0]) if len(unique) == 1 else conn.execute(stmt, unique)
    by_key: dict[str, int] = {row[0]: row[1] for row in result}
    new = list(by_key.values())
    by_key.update(
        _positions_of(conn, [r["dedupe_key"] for r in unique if r["dedupe_key"] not in by_key])
    )
    return [by_key[row["dedupe_key"]] for row in rows], new


# The next position on SQLite: AUTOINCREMENT never reuses one, even after a prune.
_SQLITE_LAST_POSITION = sa.text(
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'herald_events'), 0),"
    " coalesce((SELECT max(position) FROM herald_events), 0))"
)


def _insert_sqlite(conn: sa.Connection, rows: list[dict[str, Any]], *, deduped: bool) -> Inserted:
    """One executemany with positions given by the writer.

    SQLite has one writer at a time, so the writer may number its own rows:
    this keeps the caller's order without RETURNING (which SQLite would run
    row by row to guarantee that order). Should another connection write in
    between anyway, the primary key refuses the insert: an error, never a
    wrong position.
    """
    batch = _unique_keys(rows) if deduped else rows
    base = int(conn.execute(_SQLITE_LAST_POSITION).scalar_one())
    numbered = [{**row, "position": base + i} for i, row in enumerate(batch, start=1)]
    if not deduped:
        conn.execute(sa.insert(events), numbered)
        new = [row["position"] for row in numbered]
        return new, new
    stmt = sqlite.insert(events).on_conflict_do_nothing(
        index_elements=[events.c.dedupe_key], index_where=events.c.dedupe_key.is_not(None)
    )
    conn.execute(stmt, numbered)
    by_key = _positions_of(conn, [row["dedupe_key"] for row in numbered])
    new = [row["position"] for row in numbered if by_key[row["dedupe_key"]] == row["position"]]
    return [by_key[row["dedupe_key"]] for row in rows], new


def _order_on_sqlite(conn: sa.Connection, first_new: int) -> None:
    # SQLite has one writer at a time (herald's engine begins every
    # transaction with BEGIN IMMEDIATE), so commit order is position order and
    # no sequencer is needed: the writer gives its own events the next seqs,
    # in the same transaction. Every row from first_new on is this call's.
    conn.execute(
        sa.insert(log_order).from_select(
            ["seq", "position"],
            sa.select(
                sa.select(sa.func.coalesce(sa.func.max(log_order.c.seq), 0)).scalar_subquery()
                + sa.func.row_number().over(order_by=events.c.position),
                events.c.position,
            ).where(events.c.position >= first_new),
        )
    )


_KEY_DETAIL = re.compile(r"\(aggregate_id, aggregate_version\)=\((.*?), (\d+)\)")


def _conflict(
    exc: sa_exc.IntegrityError | psycopg.Error, rows: Sequence[dict[str, Any]]
) -> Exception:
    orig = exc.orig if isinstance(exc, sa_exc.IntegrityError) else exc
    diag = getattr(orig, "diag", None)
    text = f"{orig} {getattr(diag, 'message_detail', '') or ''}"
    if "aggregate_version" not in text and "aggregate_id" not in text:
        return translate(exc)
    match = _KEY_DETAIL.search(text)
    if match:
        return VersionConflict(match.group(1), int(match.group(2)))
    first = next(r for r in rows if r["aggregate_id"] is not None)
    return VersionConflict(first["aggregate_id"], first["aggregate_version"])
