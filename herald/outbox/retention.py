"""Retention: ``herald prune``, the one path that deletes from the append-only log.

An event may go when all of these hold:

* it is older than the age asked for (``recorded_at``), and so is every event
  before it in the log: a prune removes the log's oldest seqs, never a hole
  in the middle of recent history;
* it is not the newest event: the log's head never goes back, so no seq is
  ever given out twice;
* every consumer has finished it: its seq is at or below every consumer's
  offset (a consumer configured but never run counts as offset 0), so an
  at_least_once event some consumer still has to deliver is never pruned;
* no consumer has an event parked at or before it (parked events wait for an
  operator, and so does everything after the first of them);
* it belongs to no aggregate, or its aggregate's whole history goes with it:
  a build or evaluation is state rebuilt from its events, so a build with one
  event too young to prune keeps all of them.

The events go with their order rows and their delivery records, in one
transaction (all or nothing), recorded in ``herald_operations`` (range,
counts, age limit, who, when). On PostgreSQL the append-only trigger lets
the DELETEs through only because the transaction sets ``herald.prune``.

Projections keep the rows of pruned aggregates (a finished build stays in
``herald_builds``); ``herald projections rebuild`` leaves them alone once the
log has been pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa

from herald import operations
from herald.outbox.reader import first_seq, first_seq_since, head
from herald.schema import consumers, deliveries, events, log_order, parked
from herald.schema.dberrors import translated

__all__ = ["PruneResult", "prune"]

#: The temporary table of the (seq, position) pairs a prune deletes.
_DOOMED: Final = "herald_prune_doomed"


@dataclass(slots=True)
class PruneResult:
    """What a prune deleted (or, dry, would delete), and what held it back."""

    older_than: timedelta
    cutoff: datetime
    dry_run: bool
    #: the range considered: seqs first_seq..last_seq (None, None: nothing old enough)
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    deliveries: int = 0
    #: events in the range kept because their aggregate has younger events
    kept: int = 0
    #: why the range ends where it does: age, a consumer's offset, a parked event, the head
    limited_by: list[str] = field(default_factory=list)
    operation_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "older_than_seconds": self.older_than.total_seconds(),
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "events": self.events,
            "deliveries": self.deliveries,
            "kept": self.kept,
            "limited_by": self.limited_by,
            "operation_id": self.operation_id,
        }


def _boundary(
    conn: sa.Connection, cutoff: datetime, configured: Iterable[str]
) -> tuple[int, list[str]]:
    """The newest seq a prune may reach, and what stops it there."""
    top = head(conn)
    # The newest event always stays: the head is the largest seq the log holds,
    # and the next event's seq follows it, so pruning it would let a seq be
    # given out twice.
    limits: list[tuple[int, str]] = [(top - 1, f"the newest event (seq {top}) always stays")]
    since = first_seq_since(conn, cutoff)
    if since is not None:
        limits.append((since - 1, f"age (seq {since} is younger than the cutoff)"))
    offsets = dict(conn.execute(sa.select(consumers.c.name, consumers.c.offset_seq)).all())
    for name in configured:
        offsets.setdefault(name, 0)
    if offsets:
        slowest = min(offsets, key=lambda n: (offsets[n], n))
        limits.append((offsets[slowest], f"consumer {slowest} (offset {offsets[slowest]})"))
    first_parked = conn.execute(
        sa.select(parked.c.consumer, parked.c.seq).order_by(parked.c.seq).limit(1)
    ).first()
    if first_parked is not None:
        limits.append(
            (first_parked.seq - 1, f"parked (seq {first_parked.seq} for {first_parked.consumer})")
        )
    bound = min(seq for seq, _ in limits)
    return bound, [why for seq, why in limits if seq == bound]


def prune(
    conn: sa.Connection,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    configured: Iterable[str] = (),
    now: datetime | None = None,
) -> PruneResult:
    """Delete what no consumer needs and is older than ``older_than``; one transaction.

    ``conn`` must have no transaction open. ``configured`` names consumers of
    the configuration file: one that has never run holds everything back.
    With ``dry_run`` nothing is deleted or recorded.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    result = PruneResult(older_than, cutoff, dry_run)
    with translated(), conn.begin() as tx:
        bound, result.limited_by = _boundary(conn, cutoff, configured)
        start = first_seq(conn)
        if start == 0 or bound < start:
            if not dry_run:
                result.operation_id = operations.record(conn, "prune", None, result.to_json())
            else:
                tx.rollback()
            return result
        result.first_seq, result.last_seq = start, bound
        in_range = conn.execute(
            sa.select(sa.func.count()).select_from(log_order).where(log_order.c.seq <= bound)
        ).scalar_one()
        _collect(conn, bound)
        doomed = sa.table(_DOOMED, sa.column("seq"), sa.column("position"))
        result.events = conn.execute(sa.select(sa.func.count()).select_from(doomed)).scalar_one()
        result.kept = in_range - result.events
        doomed_seqs = sa.select(doomed.c.seq)
        if dry_run:
            result.deliveries = conn.execute(
                sa.select(sa.func.count())
                .select_from(deliveries)
                .where(deliveries.c.seq.in_(doomed_seqs))
            ).scalar_one()
            _drop(conn)
            tx.rollback()
            return result
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL herald.prune = 'on'"))
        result.deliveries = conn.execute(
            deliveries.delete().where(deliveries.c.seq.in_(doomed_seqs))
        ).rowcount
        # The same (seq, position) pairs go from both tables: no order row outlives
        # its event (herald_log has no foreign key to keep it so; tables.py).
        conn.execute(log_order.delete().where(log_order.c.seq.in_(doomed_seqs)))
        conn.execute(events.delete().where(events.c.position.in_(sa.select(doomed.c.position))))
        _drop(conn)
        result.operation_id = operations.record(conn, "prune", None, result.to_json())
    return result


def _collect(conn: sa.Connection, bound: int) -> None:
    """Fill the temporary table with the seqs and positions to delete, up to ``bound``.

    ``bound`` is an integer herald computed (formatted in: CREATE TABLE AS
    takes no bound parameters on PostgreSQL).
    """
    bound = int(bound)
    conn.execute(
        sa.text(
            f"CREATE TEMPORARY TABLE {_DOOMED} AS "
            "SELECT l.seq AS seq, l.position AS position "
            "FROM herald_log l JOIN herald_events e ON e.position = l.position "
            f"WHERE l.seq <= {bound} AND (e.aggregate_id IS NULL OR NOT EXISTS ("
            "  SELECT 1 FROM herald_events e2 LEFT JOIN herald_log l2 ON l2.position = e2.position"
            "  WHERE e2.aggregate_id = e.aggregate_id"
            f"    AND (l2.seq IS NULL OR l2.seq > {bound})))"
        )
    )


def _drop(conn: sa.Connection) -> None:
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {_DOOMED}"))
