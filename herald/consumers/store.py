"""Every database call about consumers: offsets, claims, delivery records, parked events.

The daemon, the CLI and the Python API go through these functions; nothing
else in herald writes ``herald_consumers`` or ``herald_parked``, and only
``herald prune`` (:mod:`herald.outbox.retention`) deletes from
``herald_deliveries``, with the events the records are of. The audit
queries (:mod:`herald.audit`) read all three.

**The offset convention.** A consumer's offset (``offset_seq``) is the last
seq it has *finished*: delivered, parked, expired, failed for good (an
ephemeral event gets one attempt), or passed over as outside its topics. It
next reads ``seq > offset``. A new consumer starts at 0 (the beginning of
the log).

**Claims.** A consumer is run by one process at a time. On PostgreSQL the
claim is a session advisory lock held by the daemon's listening connection
(released the moment the process dies); on SQLite it is a lease in the row,
renewed while the daemon runs. Either way the claimant writes its token into
``owner``, and every commit is fenced with ``WHERE owner = <token> AND
offset_seq = <the offset it read>``: a process that lost its claim (a killed
connection, an expired lease) can never move an offset, and its uncommitted
batch is delivered again by the new owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql, sqlite

from herald.consumers.model import Outcome, validate_name
from herald.errors import LostClaim, NotParked, UnknownConsumer
from herald.outbox import LogEntry
from herald.outbox.reader import entries_at, head
from herald.schema import consumers, deliveries, parked
from herald.schema.dberrors import translated
from herald.schema.queries import QUERIES

__all__ = [
    "ConsumerRow",
    "ParkedRow",
    "Record",
    "claim_lease",
    "commit_batch",
    "commit_redelivery",
    "consumer_row",
    "consumer_rows",
    "discard_parked",
    "ensure_consumer",
    "finished_ahead",
    "insert_records",
    "last_errors",
    "last_record",
    "look",
    "now",
    "parked_counts",
    "parked_heads",
    "parked_rows",
    "parked_seqs_after",
    "redeliver_requests",
    "release",
    "request_redelivery",
    "reset_offset",
    "set_owner",
]


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """A consumer as the database has it."""

    name: str
    offset: int
    owner: str | None
    lease_until: datetime | None
    control: int
    updated_at: datetime | None = None
    #: bumped by every reset (``herald consumers reset``)
    epoch: int = 0
    #: the newest delivery record id at the last reset
    records_floor: int = 0


@dataclass(slots=True)
class Record:
    """One delivery attempt, as ``herald_deliveries`` stores it."""

    seq: int
    attempt: int
    outcome: Outcome
    started_at: datetime
    duration_ms: float
    error: str | None = None
    http_status: int | None = None
    detail: dict[str, Any] | None = None
    kind: str = "live"

    def row(self, consumer: str) -> dict[str, Any]:
        return {
            "consumer": consumer,
            "seq": self.seq,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "kind": self.kind,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "error": self.error,
            "http_status": self.http_status,
            "detail": self.detail,
        }


@dataclass(slots=True)
class ParkedRow:
    """An event parked for a consumer."""

    seq: int
    key: str | None
    held_by: int | None
    attempts: int
    error: str | None
    parked_at: datetime = field(default_factory=now)
    redeliver: bool = False
    consumer: str = ""
    topic: str | None = None

    def row(self, consumer: str) -> dict[str, Any]:
        return {
            "consumer": consumer,
            "seq": self.seq,
            "key": self.key,
            "held_by": self.held_by,
            "attempts": self.attempts,
            "error": self.error,
            "parked_at": self.parked_at,
            "redeliver": self.redeliver,
        }


#: The columns of a delivery record, in the order COPY writes them.
_RECORD_COLUMNS = (
    "consumer", "seq", "attempt", "outcome", "kind", "started_at", "duration_ms", "error",
    "http_status", "detail",
)  # fmt: skip


#: Their types, for COPY's binary format (cheaper to write than text: no formatting of
#: times and numbers in Python).
_RECORD_TYPES = (
    "text", "int8", "int4", "text", "text", "timestamptz", "float8", "text", "int4", "jsonb",
)  # fmt: skip

_COPY_RECORDS = f"COPY herald_deliveries ({', '.join(_RECORD_COLUMNS)}) FROM STDIN (FORMAT BINARY)"


def _write_records(conn: sa.Connection, name: str, records: Sequence[Record]) -> None:
    """Insert delivery records in the caller's transaction.

    On PostgreSQL through COPY on the same connection (a batch of thousands is
    one stream, not thousands of INSERTs: records are most of a busy consumer's
    writes); on SQLite an executemany.
    """
    if not records:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(deliveries.insert(), [r.row(name) for r in records])
        return
    driver: Any = conn.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(_COPY_RECORDS) as copy:
        copy.set_types(_RECORD_TYPES)
        write = copy.write_row
        for r in records:
            write(
                (
                    name, r.seq, r.attempt, r.outcome, r.kind, r.started_at, r.duration_ms,
                    r.error, r.http_status, None if r.detail is None else Jsonb(r.detail),
                )
            )  # fmt: skip


def _insert_ignore(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """INSERT, doing nothing if the primary key exists (the one dialect difference here)."""
    if conn.dialect.name == "postgresql":
        conn.execute(postgresql.insert(table).values(values).on_conflict_do_nothing())
    else:
        conn.execute(sqlite.insert(table).values(values).on_conflict_do_nothing())


def ensure_consumer(conn: sa.Connection, name: str) -> None:
    """Create the consumer's row (offset 0) if it has none; inside the caller's transaction."""
    with translated():
        _insert_ignore(conn, consumers, {"name": validate_name(name), "offset_seq": 0})


def consumer_row(conn: sa.Connection, name: str) -> ConsumerRow | None:
    """The consumer's row, or None if it has never run."""
    if conn.dialect.name == "postgresql":
        # The daemon reads it before every page: the named statement as it is, with
        # none of SQLAlchemy's building and compiling (a third of the CPU).
        with translated():
            found = conn.exec_driver_sql(QUERIES["consumer_row"], (name,)).one_or_none()
        return None if found is None else _consumer(found)
    with translated():
        row = conn.execute(
            sa.select(
                consumers.c.name,
                consumers.c.offset_seq,
                consumers.c.owner,
                consumers.c.lease_until,
                consumers.c.control,
                consumers.c.updated_at,
                consumers.c.epoch,
                consumers.c.records_floor,
            ).where(consumers.c.name == name)
        ).one_or_none()
    if row is None:
        return None
    return _consumer(row)


def look(conn: sa.Connection, name: str) -> tuple[ConsumerRow | None, int]:
    """The consumer's row and the log's head, as the daemon reads them before a page.

    On PostgreSQL in one round trip (psycopg's pipeline mode); ``conn`` must
    not be in a transaction it has begun (the daemon reads on an autocommit
    connection), and the head is read after the row.
    """
    if conn.dialect.name != "postgresql":
        return consumer_row(conn, name), head(conn)
    driver: Any = conn.connection.driver_connection
    with (
        translated(conn),
        driver.cursor(row_factory=namedtuple_row) as rows,
        driver.cursor() as heads,
    ):
        with driver.pipeline():
            rows.execute(QUERIES["consumer_row"], (name,))
            heads.execute(QUERIES["head"])
        found = rows.fetchone()
        top = heads.fetchone()
    return (None if found is None else _consumer(found)), int(top[0])


def _consumer(row: Any) -> ConsumerRow:
    return ConsumerRow(
        row.name, row.offset_seq, row.owner, _aware(row.lease_until), row.control,
        _aware(row.updated_at), row.epoch, row.records_floor,
    )  # fmt: skip


def consumer_rows(conn: sa.Connection) -> list[ConsumerRow]:
    """Every consumer that has a row, by name."""
    with translated():
        rows = conn.execute(sa.select(consumers).order_by(consumers.c.name)).all()
    return [_consumer(r) for r in rows]


def set_owner(conn: sa.Connection, name: str, token: str, lease: float) -> None:
    """Write the claimant's token (PostgreSQL: after taking the consumer's advisory lock)."""
    with translated():
        ensure_consumer(conn, name)
        conn.execute(
            consumers.update()
            .where(consumers.c.name == name)
            .values(owner=token, lease_until=now() + timedelta(seconds=lease), updated_at=now())
        )


def claim_lease(conn: sa.Connection, name: str, token: str, lease: float) -> bool:
    """Take or renew the consumer's lease (SQLite); False if another process holds it."""
    with translated():
        ensure_consumer(conn, name)
        row = consumer_row(conn, name)
        assert row is not None
        current = now()
        if row.owner not in (None, token) and row.lease_until and row.lease_until > current:
            return False
        conn.execute(
            consumers.update()
            .where(consumers.c.name == name)
            .where(
                consumers.c.owner.is_(None) if row.owner is None else consumers.c.owner == row.owner
            )
            .values(owner=token, lease_until=current + timedelta(seconds=lease))
        )
        return True


def release(conn: sa.Connection, name: str, token: str) -> None:
    """Give the claim up (a clean stop): the row no longer names this process."""
    with translated():
        conn.execute(
            consumers.update()
            .where(consumers.c.name == name, consumers.c.owner == token)
            .values(owner=None, lease_until=None)
        )


def _fence(conn: sa.Connection, name: str, token: str, epoch: int, old: int, new: int) -> bool:
    """Move the offset from ``old`` to ``new`` if this claim and epoch still hold.

    False: the consumer was reset since ``epoch`` (the offset is the
    operator's now). Raises LostClaim if another process owns it.
    """
    if conn.dialect.name == "postgresql":
        # Once per page committed, the first statement of its transaction: in
        # pipeline mode the transaction's BEGIN goes with it, one round trip for
        # both instead of two.
        driver: Any = conn.connection.driver_connection
        # translated(conn): a session lost mid-pipeline is dropped by the pool, not reset.
        with translated(conn), driver.pipeline(), driver.cursor() as cursor:
            cursor.execute(QUERIES["consumer_fence"], (new, now(), name, token, epoch, old))
        rowcount = cursor.rowcount
    else:
        rowcount = conn.execute(
            consumers.update()
            .where(
                consumers.c.name == name,
                consumers.c.owner == token,
                consumers.c.epoch == epoch,
                consumers.c.offset_seq == old,
            )
            .values(offset_seq=new, updated_at=now())
        ).rowcount
    if rowcount == 1:
        return True
    row = conn.execute(
        sa.select(consumers.c.owner, consumers.c.epoch).where(consumers.c.name == name)
    ).one_or_none()
    if row is None or row.owner != token or row.epoch == epoch:
        raise LostClaim(name)
    return False


def commit_batch(
    conn: sa.Connection,
    name: str,
    token: str,
    epoch: int,
    old_offset: int,
    new_offset: int,
    records: Sequence[Record],
    parked_rows: Sequence[ParkedRow] = (),
) -> bool:
    """Advance the offset and write the batch's records and parked events, in one transaction.

    Returns False if an operator reset the consumer since ``epoch``: the
    records and parked events are written all the same (those attempts
    happened), the offset stays where the reset put it, and the records floor
    moves past them so that a run after the reset never mistakes them for its
    own finished work. Raises :class:`~herald.errors.LostClaim` (and writes
    nothing) if another process owns the consumer now.
    """
    with translated(), conn.begin():
        moved = _fence(conn, name, token, epoch, old_offset, new_offset)
        if records:
            _write_records(conn, name, records)
        if parked_rows:
            conn.execute(parked.insert(), [p.row(name) for p in parked_rows])
        if not moved:
            conn.execute(
                consumers.update()
                .where(consumers.c.name == name)
                .values(records_floor=_newest_record())
            )
        return moved


def _newest_record() -> sa.ScalarSelect[Any]:
    return sa.select(sa.func.coalesce(sa.func.max(deliveries.c.id), 0)).scalar_subquery()


def finished_ahead(
    conn: sa.Connection, name: str, offset: int, floor: int = 0
) -> dict[int, tuple[int, set[str]]]:
    """Live records beyond the offset (a clean stop mid-batch): seq → (attempts, outcomes).

    Only records newer than ``floor`` (the newest record at the last reset)
    count: older ones are history the reset asked to deliver again.
    """
    found: dict[int, tuple[int, set[str]]] = {}
    with translated():
        rows = conn.execute(
            sa.select(deliveries.c.seq, deliveries.c.attempt, deliveries.c.outcome).where(
                deliveries.c.consumer == name,
                deliveries.c.seq > offset,
                deliveries.c.kind == "live",
                deliveries.c.id > floor,
            )
        ).all()
    for seq, attempt, outcome in rows:
        attempts, outcomes = found.get(seq, (0, set()))
        outcomes.add(outcome)
        found[seq] = (max(attempts, attempt), outcomes)
    return found


def last_record(conn: sa.Connection, name: str, seq: int) -> Record | None:
    """The consumer's newest delivery record of ``seq`` (None: it has none)."""
    with translated():
        row = conn.execute(
            sa.select(deliveries)
            .where(deliveries.c.consumer == name, deliveries.c.seq == seq)
            .order_by(deliveries.c.id.desc())
            .limit(1)
        ).one_or_none()
    if row is None:
        return None
    return Record(
        seq=row.seq,
        attempt=row.attempt,
        outcome=row.outcome,
        started_at=_aware(row.started_at) or now(),
        duration_ms=row.duration_ms,
        error=row.error,
        http_status=row.http_status,
        detail=row.detail,
        kind=row.kind,
    )


def parked_heads(conn: sa.Connection, name: str) -> dict[str, int]:
    """The builds (keys) with a parked event for this consumer: key → its first parked seq."""
    with translated():
        rows = conn.execute(
            sa.select(parked.c.key, sa.func.min(parked.c.seq))
            .where(parked.c.consumer == name, parked.c.key.is_not(None))
            .group_by(parked.c.key)
        ).all()
    return {key: int(seq) for key, seq in rows}


def parked_rows(conn: sa.Connection, name: str | None = None) -> list[ParkedRow]:
    """Parked events (of one consumer, or all), by consumer and seq, with their topics."""
    from herald.schema import events, log_order  # noqa: PLC0415 - only listing needs them

    stmt = (
        sa.select(parked, events.c.topic)
        .select_from(
            parked.outerjoin(log_order, log_order.c.seq == parked.c.seq).outerjoin(
                events, events.c.position == log_order.c.position
            )
        )
        .order_by(parked.c.consumer, parked.c.seq)
    )
    if name is not None:
        stmt = stmt.where(parked.c.consumer == name)
    with translated():
        rows = conn.execute(stmt).all()
    return [
        ParkedRow(
            seq=r.seq,
            key=r.key,
            held_by=r.held_by,
            attempts=r.attempts,
            error=r.error,
            parked_at=_aware(r.parked_at) or now(),
            redeliver=bool(r.redeliver),
            consumer=r.consumer,
            topic=r.topic,
        )
        for r in rows
    ]


def parked_seqs_after(conn: sa.Connection, name: str, offset: int) -> set[int]:
    """The consumer's parked seqs beyond ``offset`` (after a reset moved it back)."""
    with translated():
        return set(
            conn.execute(
                sa.select(parked.c.seq).where(parked.c.consumer == name, parked.c.seq > offset)
            ).scalars()
        )


def parked_counts(conn: sa.Connection) -> dict[str, int]:
    """How many events each consumer has parked."""
    with translated():
        rows = conn.execute(
            sa.select(parked.c.consumer, sa.func.count()).group_by(parked.c.consumer)
        ).all()
    return {consumer: int(count) for consumer, count in rows}


def last_errors(conn: sa.Connection, names: Iterable[str]) -> dict[str, tuple[int, str, datetime]]:
    """Each consumer's newest failed/parked record: (seq, error, when)."""
    found: dict[str, tuple[int, str, datetime]] = {}
    with translated():
        for name in names:
            row = conn.execute(
                sa.select(deliveries.c.seq, deliveries.c.error, deliveries.c.started_at)
                .where(
                    deliveries.c.consumer == name,
                    deliveries.c.outcome.in_(("failed", "parked")),
                    deliveries.c.error.is_not(None),
                )
                .order_by(deliveries.c.id.desc())
                .limit(1)
            ).one_or_none()
            if row is not None:
                found[name] = (row.seq, row.error, _aware(row.started_at) or now())
    return found


def _require(conn: sa.Connection, name: str) -> ConsumerRow:
    row = consumer_row(conn, name)
    if row is None:
        known = [r.name for r in consumer_rows(conn)]
        raise UnknownConsumer(name, known)
    return row


def _bump(conn: sa.Connection, name: str) -> None:
    conn.execute(
        consumers.update()
        .where(consumers.c.name == name)
        .values(control=consumers.c.control + 1, updated_at=now())
    )


def request_redelivery(conn: sa.Connection, name: str, seq: int | None) -> list[int]:
    """Mark parked events for redelivery by the daemon running the consumer.

    ``seq=None`` marks all of them. One seq can be redelivered only if no
    earlier event of the same build is still parked (a build's events go to
    a consumer in order). Returns the seqs marked; in the caller's transaction.
    """
    _require(conn, name)
    rows = parked_rows(conn, name)
    if seq is None:
        chosen = [r.seq for r in rows]
    else:
        target = next((r for r in rows if r.seq == seq), None)
        if target is None:
            raise NotParked(name, seq)
        earlier = [r.seq for r in rows if r.key is not None and r.key == target.key and r.seq < seq]
        if earlier:
            raise NotParked(
                name,
                seq,
                f"seq {seq} waits behind seq {earlier[0]} of the same build ({target.key}), "
                f"parked for {name!r}; redeliver seq {earlier[0]} first, or all with --all",
            )
        chosen = [seq]
    if chosen:
        with translated():
            conn.execute(
                parked.update()
                .where(parked.c.consumer == name, parked.c.seq.in_(chosen))
                .values(redeliver=True)
            )
            _bump(conn, name)
    return chosen


def discard_parked(conn: sa.Connection, name: str, seq: int, reason: str) -> ParkedRow:
    """Give up a parked event: removed from the parked list, recorded as discarded."""
    _require(conn, name)
    target = next((r for r in parked_rows(conn, name) if r.seq == seq), None)
    if target is None:
        raise NotParked(name, seq)
    with translated():
        conn.execute(parked.delete().where(parked.c.consumer == name, parked.c.seq == seq))
        conn.execute(
            deliveries.insert(),
            Record(
                seq=seq,
                attempt=target.attempts,
                outcome="discarded",
                started_at=now(),
                duration_ms=0.0,
                error=reason,
                kind="operator",
            ).row(name),
        )
        _bump(conn, name)
    return target


def reset_offset(conn: sa.Connection, name: str, offset: int) -> ConsumerRow:
    """Set the consumer's offset (an operator's reset), in the caller's transaction.

    Bumps the epoch, so the daemon running the consumer takes the new offset
    at its next batch, and sets the records floor to the newest delivery
    record, so that no earlier record counts as work already done beyond the
    new offset. Parked events stay parked. Returns the row as it was.
    """
    before = _require(conn, name)
    with translated():
        conn.execute(
            consumers.update()
            .where(consumers.c.name == name)
            .values(
                offset_seq=offset,
                epoch=consumers.c.epoch + 1,
                records_floor=_newest_record(),
                control=consumers.c.control + 1,
                updated_at=now(),
            )
        )
    return before


def insert_records(conn: sa.Connection, name: str, records: Sequence[Record]) -> None:
    """Write delivery records that move no offset (a replay's), in one transaction."""
    if records:
        with translated(), conn.begin():
            _write_records(conn, name, records)


def redeliver_requests(conn: sa.Connection, name: str) -> list[tuple[ParkedRow, LogEntry]]:
    """The parked events an operator asked to redeliver, with their log entries, by seq."""
    with translated():
        rows = [r for r in parked_rows(conn, name) if r.redeliver]
        found = entries_at(conn, [r.seq for r in rows])
    return [(r, found[r.seq]) for r in rows if r.seq in found]


def commit_redelivery(
    conn: sa.Connection,
    name: str,
    token: str,
    records: Sequence[Record],
    finished: Sequence[int],
    still_parked: Sequence[ParkedRow],
) -> None:
    """Write a redelivery's records; unpark what finished; re-park the rest (one transaction)."""
    with translated(), conn.begin():
        owned = conn.execute(
            sa.select(consumers.c.name).where(consumers.c.name == name, consumers.c.owner == token)
        ).one_or_none()
        if owned is None:
            raise LostClaim(name)
        if records:
            _write_records(conn, name, records)
        if finished:
            conn.execute(
                parked.delete().where(parked.c.consumer == name, parked.c.seq.in_(finished))
            )
        for row in still_parked:
            conn.execute(
                parked.update()
                .where(parked.c.consumer == name, parked.c.seq == row.seq)
                .values(
                    attempts=row.attempts, error=row.error, held_by=row.held_by, redeliver=False
                )
            )
