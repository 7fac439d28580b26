"""Appending events: inside the caller's transaction, atomic with its writes.

>>> with engine.begin() as conn:
...     conn.execute(update(builds).where(...).values(status=0))
...     herald.append(conn, "build_finished", {"build_id": 42, "dependent_ids": []})

The events are validated (topic, payload, size: see
:mod:`herald.domain.catalogue`); on any error nothing is written. A rollback
of the caller's transaction leaves no trace of them. Many events go in a
multi-row ``INSERT`` (SQLAlchemy's insertmanyvalues: one statement per 1,000
rows), never one round-trip per event; on PostgreSQL a run of at least
:data:`COPY_MIN_ROWS` events without dedupe keys goes by binary ``COPY``, and
from :data:`STREAM_MIN_ROWS` on each event is checked as its row is sent
(inside a savepoint, rolled back to if one is refused) instead of all first.

Dedupe keys: appending an event whose ``dedupe_key`` is already in the log is
a no-op that returns the existing event's position. ``once_per_eval`` topics
get the key ``topic:eval_id:build_id`` unless one is given.

Aggregate versions: ``(aggregate_id, aggregate_version)`` is unique; a second
writer appending the same version raises :class:`~herald.errors.VersionConflict`
(the caller's transaction must then be rolled back).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from psycopg.types.string import BytesBinaryDumper
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from herald.domain import CATALOGUE, LogEvent, json_text, validate_event
from herald.errors import InvalidPayload, UsageError, VersionConflict
from herald.schema import events, log_order
from herald.schema.dberrors import translate

__all__ = [
    "COPY_MIN_ROWS",
    "STREAM_MIN_ROWS",
    "NewEvent",
    "Writer",
    "append",
    "append_many",
    "copy_rows",
]


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


def append_many(
    conn: Writer,
    new_events: Iterable[NewEvent | LogEvent],
    *,
    while_writing: Callable[[], object] | None = None,
) -> list[int]:
    """Append events in ``conn``'s transaction, in order; returns their positions.

    A duplicate dedupe key (in the log already, or earlier in the same call)
    returns the position of the event that has it. A domain log event
    (:class:`herald.domain.LogEvent`, what the unit of work saves) is appended
    with its aggregate's id and version, and no dedupe key or trace id.

    ``while_writing``, if given, is called once: on PostgreSQL, for a long
    run of events, when their rows have been sent and the server is still
    writing them (the COPY's end waits for it); otherwise after the rows are
    written. Work that needs no database done there overlaps with the
    server's (the unit of work plans its projection rows there). It is not
    called if the events are refused first.
    """
    listed = list(new_events)
    pending = [while_writing] if while_writing is not None else []
    if not listed:
        positions: list[int] = []
    elif isinstance(conn, psycopg.Connection):
        positions = _append_psycopg(conn, listed, pending)
    else:
        positions = _append_sqlalchemy(conn, listed, pending)
    for callback in pending:
        callback()
    return positions


def _checked(listed: Sequence[NewEvent | LogEvent]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every event as a checked row, with its payload's JSON text (raises on the first
    refused one)."""
    rows: list[dict[str, Any]] = []
    texts: list[str] = []
    for event in listed:
        row, text = _row(event)
        rows.append(row)
        texts.append(text)
    return rows, texts


def _append_sqlalchemy(
    conn: sa.Connection | Session,
    listed: list[NewEvent | LogEvent],
    pending: list[Callable[[], object]],
) -> list[int]:
    connection = conn.connection() if isinstance(conn, Session) else conn
    dialect = connection.dialect.name
    if dialect == "postgresql":
        raw = driver_connection(connection)
        if (runs := _streamed_runs(raw, listed)) is not None:
            return _append_streamed(raw, listed, runs, pending)
    rows, texts = _checked(listed)
    if dialect == "sqlite":
        now = datetime.now(UTC)
        for row in rows:
            row["recorded_at"] = now
    insert = _insert_sqlite if dialect == "sqlite" else _insert_postgresql
    positions: list[int] = []
    first_new: int | None = None
    try:
        for deduped, start, stop in _runs(_keys_of(rows)):
            run = rows[start:stop]
            if dialect == "postgresql" and not deduped and len(run) >= COPY_MIN_ROWS:
                with driver_connection(connection).cursor() as cur:
                    found = new = _copy_postgresql(cur, run, texts[start:stop], pending)
            else:
                found, new = insert(connection, run, texts[start:stop], deduped=deduped)
            positions.extend(found)
            if new and first_new is None:
                first_new = min(new)
        if dialect == "sqlite" and first_new is not None:
            _order_on_sqlite(connection, first_new)
    except (sa_exc.IntegrityError, psycopg.errors.UniqueViolation) as exc:
        raise _conflict(exc, rows) from exc
    except (sa_exc.SQLAlchemyError, psycopg.Error) as exc:
        raise translate(exc) from exc
    return positions


def driver_connection(conn: sa.Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection to PostgreSQL (same transaction)."""
    raw: psycopg.Connection[Any] | None = conn.connection.driver_connection
    if raw is None:
        raise TypeError("the SQLAlchemy connection has no driver connection")
    return raw


def _append_psycopg(
    conn: psycopg.Connection[Any],
    listed: list[NewEvent | LogEvent],
    pending: list[Callable[[], object]],
) -> list[int]:
    """The same appends on a plain psycopg connection (PostgreSQL).

    For writers that use psycopg directly: no SQLAlchemy on the path, and
    many events go through psycopg's pipelined executemany (one network
    round trip for the lot, not one per event), or COPY for a long run.
    """
    if (runs := _streamed_runs(conn, listed)) is not None:
        return _append_streamed(conn, listed, runs, pending)
    rows, texts = _checked(listed)
    positions: list[int] = []
    try:
        with conn.cursor() as cur:
            for deduped, start, stop in _runs(_keys_of(rows)):
                run = rows[start:stop]
                positions += _write_run(cur, run, texts[start:stop], deduped, pending)
    except psycopg.errors.UniqueViolation as exc:
        raise _conflict(exc, rows) from exc
    except psycopg.Error as exc:
        raise translate(exc) from exc
    return positions


def _write_run(
    cur: psycopg.Cursor[Any],
    run: list[dict[str, Any]],
    texts: list[str],
    deduped: bool,
    pending: list[Callable[[], object]],
) -> list[int]:
    """Write checked rows all with (``deduped``) or all without dedupe keys through
    psycopg; their positions."""
    if not deduped and len(run) >= COPY_MIN_ROWS:
        return _copy_postgresql(cur, run, texts, pending)
    params = [_pg_params(r, t) for r, t in zip(run, texts, strict=True)]
    if not deduped:
        found: list[int] = _returned(cur, _PG_INSERT_ONE, params)
        return found
    firsts = _first_of_each_key(run)
    inserted = _returned(cur, _PG_INSERT_DEDUPED, [params[i] for i in firsts])
    by_key = dict(zip([run[i]["dedupe_key"] for i in firsts], inserted, strict=True))
    missing = [key for key, pos in by_key.items() if pos is None]
    if missing:
        cur.execute(_PG_POSITIONS_OF, (missing,))
        by_key.update(cur.fetchall())
    return [by_key[r["dedupe_key"]] for r in run]


# -- checking while sending (PostgreSQL, long appends) -----------------------------

#: From this many events without dedupe keys in a row, inside a transaction,
#: PostgreSQL checks each event as its row is sent: the server writes the rows
#: already sent while the writer checks the next, instead of waiting for all
#: the checks first. The append then runs inside a savepoint (two more round
#: trips, nothing against a thousand rows): an event refused part-way rolls
#: back to it, so the transaction is as if nothing had been sent, as when the
#: checks ran first.
STREAM_MIN_ROWS: Final = 1000

_SAVEPOINT: Final = "SAVEPOINT herald_append"
_ROLLBACK_TO: Final = "ROLLBACK TO SAVEPOINT herald_append"
_RELEASE: Final = "RELEASE SAVEPOINT herald_append"


def _streamed_runs(
    conn: psycopg.Connection[Any], listed: list[NewEvent | LogEvent]
) -> list[tuple[bool, int, int]] | None:
    """The runs of ``listed`` with and without dedupe keys, if it is to be checked while
    it is sent: a long run without, in a transaction (a savepoint needs one)."""
    if conn.autocommit or len(listed) < STREAM_MIN_ROWS:
        return None
    runs = list(_runs([_keyed(event) for event in listed]))
    if any(not keyed and stop - start >= STREAM_MIN_ROWS for keyed, start, stop in runs):
        return runs
    return None


def _keyed(event: NewEvent | LogEvent) -> bool:
    """Whether ``event`` will carry a dedupe key (as :func:`_row` gives it one)."""
    if isinstance(event, NewEvent) and event.dedupe_key is not None:
        return True
    return _derives_key(event.topic)


def _derives_key(topic: object) -> bool:
    """Whether an event of ``topic`` without a dedupe key gets ``topic:eval_id:build_id``."""
    spec = CATALOGUE.get(topic) if isinstance(topic, str) else None
    return spec is not None and spec.delivery == "once_per_eval"


def _append_streamed(
    conn: psycopg.Connection[Any],
    listed: list[NewEvent | LogEvent],
    runs: list[tuple[bool, int, int]],
    pending: list[Callable[[], object]],
) -> list[int]:
    """The appends, each event checked as it is sent, inside a savepoint."""
    positions: list[int] = []
    try:
        with conn.cursor() as cur:
            cur.execute(_SAVEPOINT)
            try:
                for keyed, start, stop in runs:
                    run = listed[start:stop]
                    if not keyed and len(run) >= COPY_MIN_ROWS:
                        positions += _copy_checking(cur, run, pending)
                    else:
                        rows, texts = _checked(run)
                        positions += _write_run(cur, rows, texts, keyed, pending)
            except UsageError:
                # An event refused part-way: undo what was sent, keep the transaction.
                cur.execute(_ROLLBACK_TO)
                cur.execute(_RELEASE)
                raise
            cur.execute(_RELEASE)
    except psycopg.errors.UniqueViolation as exc:
        raise _conflict(exc, [_versions(event) for event in listed]) from exc
    except psycopg.Error as exc:
        raise translate(exc) from exc
    return positions


def _versions(event: NewEvent | LogEvent) -> dict[str, Any]:
    return {"aggregate_id": event.aggregate_id, "aggregate_version": event.aggregate_version}


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


#: The range of ``aggregate_version`` (an INTEGER column).
_INT4: Final = (-(2**31), 2**31 - 1)

_LENGTHS = {
    name: getattr(events.c[name].type, "length", 0)
    for name in ("dedupe_key", "trace_id", "aggregate_id")
}


def _row(event: NewEvent | LogEvent) -> tuple[dict[str, Any], str]:
    """The event as an ``herald_events`` row, checked; and its payload as JSON text."""
    if isinstance(event, NewEvent):
        dedupe_key, trace_id, delivery = event.dedupe_key, event.trace_id, event.delivery
    else:
        dedupe_key = trace_id = delivery = None
    topic, delivery, text = validate_event(event.topic, event.payload, delivery)
    if dedupe_key is None and _derives_key(topic):
        dedupe_key = f"{topic}:{event.payload['eval_id']}:{event.payload['build_id']}"
    for name, value in (
        ("dedupe_key", dedupe_key),
        ("trace_id", trace_id),
        ("aggregate_id", event.aggregate_id),
    ):
        if value is None:
            continue
        limit = _LENGTHS[name]
        if (
            not isinstance(value, str)
            or not value
            or len(value) > limit
            or not (value.isascii() or _is_unicode(value))
        ):
            raise InvalidPayload(
                topic, f"{name} must be a non-empty string of at most {limit} characters"
            )
    if (event.aggregate_id is None) != (event.aggregate_version is None):
        raise InvalidPayload(topic, "aggregate_id and aggregate_version go together")
    version = event.aggregate_version
    if version is not None and (type(version) is not int or not _INT4[0] <= version <= _INT4[1]):
        # Checked here, not left to the column: a binary COPY would take True as 1.
        raise InvalidPayload(topic, "aggregate_version must be an integer (a 32-bit one)")
    occurred_at = event.occurred_at or datetime.now(UTC)
    if not isinstance(occurred_at, datetime) or occurred_at.tzinfo is None:
        raise InvalidPayload(topic, "occurred_at must be a timezone-aware datetime")
    # Stored in UTC: SQLite keeps a datetime's wall-clock text without its offset
    # (12:30+02:00 would read back as 12:30 UTC); PostgreSQL's timestamptz converts.
    occurred_at = occurred_at.astimezone(UTC)
    row = {
        "topic": topic,
        "payload": event.payload,
        "delivery": delivery,
        "dedupe_key": dedupe_key,
        "aggregate_id": event.aggregate_id,
        "aggregate_version": event.aggregate_version,
        "trace_id": trace_id,
        "occurred_at": occurred_at,
    }
    return row, text


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _runs(keyed: list[bool]) -> Iterable[tuple[bool, int, int]]:
    """Consecutive events with and without dedupe keys (keyed, start, stop), so the log
    keeps the caller's order."""
    start = 0
    for i in range(1, len(keyed) + 1):
        if i == len(keyed) or keyed[i] != keyed[start]:
            yield keyed[start], start, i
            start = i


def _keys_of(rows: list[dict[str, Any]]) -> list[bool]:
    return [row["dedupe_key"] is not None for row in rows]


Inserted = tuple[list[int], list[int]]
"""(the position of every row, in order; the positions of the rows actually inserted)"""


def _first_of_each_key(rows: list[dict[str, Any]]) -> list[int]:
    """The index of the first row with each dedupe key."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row["dedupe_key"], i)
    return list(first.values())


def _unique_keys(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rows[i] for i in _first_of_each_key(rows)]


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


def _pg_params(row: dict[str, Any], text: str) -> tuple[Any, ...]:
    """A row as the driver's parameters for _PG_INSERT_ONE (the payload as its JSON text)."""
    return tuple(text if name == "payload" else row[name] for name in _PG_COLUMNS)


# -- COPY (PostgreSQL) ------------------------------------------------------------

#: From this many events in a row without dedupe keys, PostgreSQL appends them
#: by binary ``COPY`` rather than an ``INSERT ... RETURNING``. COPY takes three
#: round trips (the positions, the COPY, its end) but skips the INSERT's
#: per-row statement work: measured on a loopback server, one event took 1.3x
#: (SQLAlchemy) to 1.5x (psycopg) as long by COPY, two already less, and eight
#: 0.44x / 0.66x; 1,000 took 0.1x. A single event (the common write) keeps its
#: one-statement INSERT. Events with dedupe keys always take the INSERT: COPY
#: has no ``ON CONFLICT``.
COPY_MIN_ROWS: Final = 8

# The positions, taken from the bigserial's own sequence before the COPY, so
# that they can be returned (COPY returns nothing) and keep the caller's order.
# The sequence is the one PostgreSQL made for the bigserial column.
_PG_NEXT_POSITIONS: Final = (
    f"SELECT array_agg(nextval('{events.name}_position_seq')) FROM generate_series(1, %s)"
)
# tx and recorded_at are left out: their defaults apply to COPY as to INSERT,
# so the database, not the writer, says which transaction wrote each row.
_PG_COPY_COLUMNS: Final = ("position", *_PG_COLUMNS)
_PG_COPY: Final = f"COPY {events.name} ({', '.join(_PG_COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"


def _jsonb(text: str) -> bytes:
    """JSON text in jsonb's binary form (a version byte, 1, then the text), for COPY.

    A binary COPY carries no type with its fields: the server reads each one
    with its column's own input function (``jsonb_recv``, which parses and
    checks the text). So JSON columns are sent as these bytes, which the
    driver passes on as they are, rather than through its JSON adapter, a
    Python call per value.
    """
    return b"\x01" + text.encode()


def _take_positions(cur: psycopg.Cursor[Any], count: int) -> list[int]:
    """``count`` new positions from the log's sequence, in increasing order."""
    # One array, in binary: a third of the cost of a row per position.
    cur.execute(_PG_NEXT_POSITIONS, (count,), binary=True)
    taken = cur.fetchone()
    # One session's nextval() calls return increasing values; sorted to be sure.
    return sorted(taken[0]) if taken else []


def _copy_row(position: int, row: dict[str, Any], text: str) -> tuple[Any, ...]:
    """An event's row as COPY sends it (the columns of ``_PG_COPY_COLUMNS``)."""
    return (
        position,
        row["topic"],
        # the payload's JSON text, checked and measured by validate_event
        _jsonb(text),
        row["delivery"],
        row["dedupe_key"],
        row["aggregate_id"],
        row["aggregate_version"],
        row["trace_id"],
        row["occurred_at"],
    )


def _copy_postgresql(
    cur: psycopg.Cursor[Any],
    rows: list[dict[str, Any]],
    texts: list[str],
    pending: list[Callable[[], object]],
) -> list[int]:
    """Binary COPY of checked rows without dedupe keys; their positions, in order."""
    positions = _take_positions(cur, len(rows))
    _copy_events(cur, map(_copy_row, positions, rows, texts), pending)
    return positions


def _copy_checking(
    cur: psycopg.Cursor[Any], listed: list[NewEvent | LogEvent], pending: list[Callable[[], object]]
) -> list[int]:
    """Binary COPY of events without dedupe keys, each checked as its row is sent (see
    :data:`STREAM_MIN_ROWS`); their positions, in order."""
    positions = _take_positions(cur, len(listed))
    pairs = zip(positions, listed, strict=True)
    _copy_events(cur, (_copy_row(position, *_row(event)) for position, event in pairs), pending)
    return positions


def _copy_events(
    cur: psycopg.Cursor[Any], rows: Iterable[tuple[Any, ...]], pending: list[Callable[[], object]]
) -> None:
    """One binary COPY of event rows (:func:`_copy_row`'s), each made as it is sent.

    A row whose (aggregate_id, aggregate_version) is taken fails the whole
    COPY with a unique violation, as the INSERT would. The ``pending``
    callbacks run (and are removed) once every row is sent, before the COPY
    ends: the server is still writing the rows meanwhile.
    """
    _bytes_as_they_are(cur)
    with cur.copy(_PG_COPY) as copy:
        copy.set_types(_copy_types(events, _PG_COPY_COLUMNS))
        write = copy.write_row
        for row in rows:
            write(row)
        while pending:
            pending.pop(0)()


#: PostgreSQL's name for each SQLAlchemy type herald's tables use (most specific first).
_PG_TYPES: Final[tuple[tuple[type[sa.types.TypeEngine[Any]], str], ...]] = (
    (sa.JSON, "jsonb"),
    (sa.BigInteger, "int8"),
    (sa.SmallInteger, "int2"),
    (sa.Integer, "int4"),
    (sa.Boolean, "bool"),
    (sa.Text, "text"),
    (sa.String, "varchar"),
    (sa.Float, "float8"),
)


@cache
def _copy_types(table: sa.TableClause, columns: tuple[str, ...]) -> list[str]:
    """The types the driver dumps ``columns`` as in a binary COPY (``int8``, ...; ``bytea``
    for JSON, given as :func:`_jsonb` bytes)."""
    names: list[str] = []
    for name in columns:
        kind = table.c[name].type
        if isinstance(kind, sa.DateTime):
            names.append("timestamptz" if kind.timezone else "timestamp")
            continue
        pg = next(pg for cls, pg in _PG_TYPES if isinstance(kind, cls))
        names.append("bytea" if pg == "jsonb" else pg)
    return names


def copy_rows(
    conn: sa.Connection | psycopg.Connection[Any],
    table: sa.TableClause,
    rows: Sequence[dict[str, Any]],
) -> None:
    """Binary ``COPY`` of new ``rows`` (dicts with the same keys: column names) into
    ``table`` (PostgreSQL), in the connection's transaction.

    COPY writes what an INSERT of the rows would, and the same constraints
    refuse the same rows, at a fraction of the cost. Each row is made ready
    (its values in order, JSON values encoded) as it is sent, while the
    server writes the rows sent before it.
    """
    raw = conn if isinstance(conn, psycopg.Connection) else driver_connection(conn)
    columns = tuple(rows[0])
    json_at = [i for i, name in enumerate(columns) if isinstance(table.c[name].type, sa.JSON)]
    encode = json_text
    with raw.cursor() as cur:
        _bytes_as_they_are(cur)
        with cur.copy(
            f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_copy_types(table, columns))
            write = copy.write_row
            for row in rows:
                # A dict's values in its keys' order: the columns', for rows made alike.
                values = list(row.values()) if tuple(row) == columns else [row[c] for c in columns]
                for i in json_at:
                    values[i] = _jsonb(encode(values[i]))
                write(values)


def _bytes_as_they_are(cur: psycopg.Cursor[Any]) -> None:
    """Dump ``bytea`` values (jsonb's binary form, in COPY) with the driver's C dumper.

    ``set_types`` picks dumpers by type; for ``bytea`` psycopg's default is a
    Python subclass that also takes ``psycopg.Binary`` wrappers, a Python call
    per value. This cursor only ever gets bytes.
    """
    cur.adapters.register_dumper(None, BytesBinaryDumper)


def _insert_postgresql(
    conn: sa.Connection, rows: list[dict[str, Any]], texts: list[str], *, deduped: bool
) -> Inserted:
    """Multi-row INSERT ... RETURNING (insertmanyvalues: 1,000 rows a statement)."""
    if not deduped:
        if len(rows) == 1:
            # The hot path (one event in a writer's transaction): one statement
            # straight to the driver, with the payload as JSON text. Compiling
            # the Core insert costs about as much client CPU as the round trip.
            new = [conn.exec_driver_sql(_PG_INSERT_ONE, _pg_params(rows[0], texts[0])).scalar_one()]
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


# -- SQLite ----------------------------------------------------------------------
#
# Fixed statements, with the parameters the driver takes, through
# ``exec_driver_sql``: building Core statements on every call and finding
# them in the compile cache (their cache keys) cost more client CPU than the
# rest of the append. Appending one event took about 0.5 ms of client CPU that
# way and takes 0.2 ms this way (herald's engine, ``time.thread_time``). The
# statements still go through the caller's SQLAlchemy connection, so its
# transaction (begun as herald's engine begins it), its events and its error
# wrapping apply as to any other statement.

#: What herald's append writes on SQLite, in its statements' order: the writer
#: numbers its rows (see _insert_sqlite) and gives them their recorded_at.
_SQLITE_COLUMNS: Final = ("position", *_PG_COLUMNS, "recorded_at")
_SQLITE_INSERT: Final = (
    f"INSERT INTO {events.name} ({', '.join(_SQLITE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _SQLITE_COLUMNS)})"
)
_SQLITE_INSERT_DEDUPED: Final = (
    f"{_SQLITE_INSERT} ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING"
)
# The next position on SQLite: AUTOINCREMENT never reuses one, even after a prune.
_SQLITE_LAST_POSITION: Final = (
    f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{events.name}'), 0),"
    f" coalesce((SELECT max(position) FROM {events.name}), 0))"
)
_SQLITE_ORDER: Final = (
    f"INSERT INTO {log_order.name} (seq, position) "
    f"SELECT (SELECT coalesce(max(seq), 0) FROM {log_order.name})"
    f" + row_number() OVER (ORDER BY position), position "
    f"FROM {events.name} WHERE position >= ?"
)

_Encode = Callable[[Any], Any]

#: Per dialect: how it turns a payload (JSON text, by the engine's
#: ``json_serializer``) and a timestamp (SQLite's text form) into what the
#: column stores, as a Core insert would. Weak: an engine's dialect goes with it.
_SQLITE_ENCODERS: Final[weakref.WeakKeyDictionary[sa.Dialect, tuple[_Encode, _Encode]]] = (
    weakref.WeakKeyDictionary()
)


def _sqlite_encoders(dialect: sa.Dialect) -> tuple[_Encode, _Encode]:
    """The dialect's conversions of the payload and of a timestamp (see _SQLITE_ENCODERS)."""
    found = _SQLITE_ENCODERS.get(dialect)
    if found is None:
        found = (_bind_processor("payload", dialect), _bind_processor("occurred_at", dialect))
        _SQLITE_ENCODERS[dialect] = found
    return found


def _bind_processor(column: str, dialect: sa.Dialect) -> _Encode:
    kind = events.c[column].type.dialect_impl(dialect)
    process = kind.bind_processor(dialect)
    if process is None:
        raise TypeError(f"{events.name}.{column} has no conversion on {dialect.name}")
    return process


def _sqlite_params(
    dialect: sa.Dialect, rows: list[dict[str, Any]], first: int
) -> list[tuple[Any, ...]]:
    """Checked rows as the driver's parameters for _SQLITE_INSERT, numbered from ``first``.

    Only the payload and the timestamps need converting: the other columns'
    types (strings, integers) have none on SQLite (a test checks it).
    """
    payload, timestamp = _sqlite_encoders(dialect)
    return [
        (
            position,
            row["topic"],
            payload(row["payload"]),
            row["delivery"],
            row["dedupe_key"],
            row["aggregate_id"],
            row["aggregate_version"],
            row["trace_id"],
            timestamp(row["occurred_at"]),
            timestamp(row["recorded_at"]),
        )
        for position, row in enumerate(rows, start=first)
    ]


def _insert_sqlite(
    conn: sa.Connection, rows: list[dict[str, Any]], _texts: list[str], *, deduped: bool
) -> Inserted:
    """One executemany with positions given by the writer.

    SQLite has one writer at a time, so the writer may number its own rows:
    this keeps the caller's order without RETURNING (which SQLite would run
    row by row to guarantee that order). Should another connection write in
    between anyway, the primary key refuses the insert: an error, never a
    wrong position.
    """
    batch = _unique_keys(rows) if deduped else rows
    base = int(conn.exec_driver_sql(_SQLITE_LAST_POSITION).scalar_one())
    params = _sqlite_params(conn.dialect, batch, base + 1)
    try:
        # One row as one execute, not an executemany of one.
        result = conn.exec_driver_sql(
            _SQLITE_INSERT_DEDUPED if deduped else _SQLITE_INSERT,
            params[0] if len(params) == 1 else params,
        )
    except sa_exc.IntegrityError as exc:
        if "aggregate" not in str(exc.orig):
            raise
        raise _conflict(exc, batch, _versions_in_log(conn, batch, base)) from exc
    numbered = list(range(base + 1, base + 1 + len(batch)))
    if not deduped:
        return numbered, numbered
    keys = [row["dedupe_key"] for row in batch]
    if result.rowcount == len(batch):
        # Every row was written (SQLite counts the rows a statement changed; a
        # key already in the log changes none): each has the position it was given.
        by_key = dict(zip(keys, numbered, strict=True))
    else:
        by_key = _sqlite_positions_of(conn, keys)
    new = [pos for key, pos in zip(keys, numbered, strict=True) if by_key[key] == pos]
    return [by_key[row["dedupe_key"]] for row in rows], new


def _sqlite_positions_of(conn: sa.Connection, keys: list[str]) -> dict[str, int]:
    """The positions of the events with these dedupe keys (SQLite)."""
    found: dict[str, int] = {}
    for chunk in (keys[i : i + 1000] for i in range(0, len(keys), 1000)):
        marks = ", ".join("?" for _ in chunk)
        sql = f"SELECT dedupe_key, position FROM {events.name} WHERE dedupe_key IN ({marks})"
        found.update((row[0], row[1]) for row in conn.exec_driver_sql(sql, tuple(chunk)))
    return found


def _order_on_sqlite(conn: sa.Connection, first_new: int) -> None:
    # SQLite has one writer at a time (herald's engine begins every
    # transaction with BEGIN IMMEDIATE), so commit order is position order and
    # no sequencer is needed: the writer gives its own events the next seqs,
    # in the same transaction. Every row from first_new on is this call's.
    conn.exec_driver_sql(_SQLITE_ORDER, (first_new,))


_KEY_DETAIL = re.compile(r"\(aggregate_id, aggregate_version\)=\((.*?), (\d+)\)")


def _conflict(
    exc: sa_exc.IntegrityError | psycopg.Error,
    rows: Sequence[dict[str, Any]],
    taken: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
) -> Exception:
    orig = exc.orig if isinstance(exc, sa_exc.IntegrityError) else exc
    diag = getattr(orig, "diag", None)
    text = f"{orig} {getattr(diag, 'message_detail', '') or ''}"
    if "aggregate_version" not in text and "aggregate_id" not in text:
        return translate(exc)
    match = _KEY_DETAIL.search(text)
    if match:
        return VersionConflict(match.group(1), int(match.group(2)))
    # SQLite names the index, not the key: find it, among the versions the log
    # held before the call (``taken``) and the call's own earlier rows.
    seen: set[tuple[str, int]] = set()
    versioned = [(r["aggregate_id"], r["aggregate_version"]) for r in rows if r["aggregate_id"]]
    for key in versioned:
        if key in taken or key in seen:
            return VersionConflict(*key)
        seen.add(key)
    return VersionConflict(*versioned[0])


def _versions_in_log(
    conn: sa.Connection, rows: Sequence[dict[str, Any]], upto: int
) -> set[tuple[str, int]]:
    """The (aggregate_id, aggregate_version) pairs of ``rows`` that the log holds at
    positions up to ``upto`` (SQLite: a failed statement leaves the transaction
    usable, and the rows before the failing one written)."""
    ids = sorted({r["aggregate_id"] for r in rows if r["aggregate_id"] is not None})
    found: set[tuple[str, int]] = set()
    for chunk in (ids[i : i + 1000] for i in range(0, len(ids), 1000)):
        stmt = sa.select(events.c.aggregate_id, events.c.aggregate_version).where(
            events.c.aggregate_id.in_(chunk), events.c.position <= upto
        )
        found.update((row[0], row[1]) for row in conn.execute(stmt))
    return found
