"""The unit of work: load aggregates from the log, change them, save them.

>>> with engine.begin() as conn:
...     uow = UnitOfWork(conn)
...     build = uow.build(42)
...     build.finish(0)
...     uow.save()

Saving appends every new domain event to the log (with the aggregate's id
and version) and applies it to the projections, in the caller's
transaction: the state and its events commit together or not at all.
Another writer that saved the same aggregate's next version first makes
the save raise :class:`~herald.errors.VersionConflict`; roll back, and the
transaction has written nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from operator import itemgetter
from typing import Any, Final, TypeVar
from uuid import UUID

import sqlalchemy as sa
from eventsourcing.domain import Aggregate
from sqlalchemy.orm import Session

from herald.domain import Build, Evaluation, LogEvent, replay, to_log
from herald.errors import UnknownAggregate
from herald.outbox.append import NewEvent, append_many
from herald.outbox.projector import (
    ProjectionPlan,
    log_event,
    plan_projection,
    write_projection,
)
from herald.schema import events
from herald.schema.dberrors import translated

__all__ = ["PAUSE_COLLECTOR_FROM", "UnitOfWork", "collector_paused"]

A = TypeVar("A", bound=Aggregate)


class UnitOfWork:
    """Aggregates loaded or created in one transaction, saved together."""

    def __init__(self, conn: sa.Connection | Session) -> None:
        self.conn = conn.connection() if isinstance(conn, Session) else conn
        self._aggregates: dict[UUID, Aggregate] = {}
        self._notifications: list[NewEvent] = []

    # -- loading ------------------------------------------------------------------------

    def build(self, build_id: int) -> Build:
        """Build ``build_id`` as its log events make it."""
        return self.builds([build_id])[build_id]

    def builds(self, build_ids: Iterable[int]) -> dict[int, Build]:
        """Many builds, read in bulk (one query per 1,000)."""
        wanted = {Build.id_for(build_id): build_id for build_id in build_ids}
        loaded = self._load(list(wanted))
        missing = [build_id for agg_id, build_id in wanted.items() if agg_id not in loaded]
        if missing:
            raise UnknownAggregate("build", missing[0])
        return {wanted[agg_id]: agg for agg_id, agg in loaded.items()}

    def evaluation(self, trace_id: str) -> Evaluation:
        """The evaluation with ``trace_id`` as its log events make it."""
        agg_id = Evaluation.id_for(trace_id)
        loaded = self._load([agg_id])
        if agg_id not in loaded:
            raise UnknownAggregate("evaluation", trace_id)
        evaluation: Evaluation = loaded[agg_id]
        return evaluation

    def add(self, aggregate: A) -> A:
        """Take a new aggregate (``Build(...)``, ``Evaluation(...)``) into this unit of work."""
        self._aggregates[aggregate.id] = aggregate
        return aggregate

    def notify(self, event: NewEvent) -> None:
        """Append ``event`` (a notification of no aggregate, e.g. ``builds_added``) on save,
        after the aggregates' events."""
        self._notifications.append(event)

    def _load(self, ids: Sequence[UUID]) -> dict[UUID, Any]:
        found = {agg_id: self._aggregates[agg_id] for agg_id in ids if agg_id in self._aggregates}
        todo = [str(agg_id) for agg_id in ids if agg_id not in found]
        by_aggregate: dict[str, list[LogEvent]] = {}
        with translated():
            for chunk in (todo[i : i + 1000] for i in range(0, len(todo), 1000)):
                stmt = (
                    sa.select(
                        events.c.topic,
                        events.c.payload,
                        events.c.aggregate_id,
                        events.c.aggregate_version,
                        events.c.occurred_at,
                    )
                    .where(events.c.aggregate_id.in_(chunk))
                    .order_by(events.c.aggregate_id, events.c.aggregate_version)
                )
                for row in self.conn.execute(stmt):
                    by_aggregate.setdefault(row.aggregate_id, []).append(log_event(row))
        for agg_id, log_events in by_aggregate.items():
            aggregate = replay(log_events)
            self._aggregates[UUID(agg_id)] = aggregate
            found[UUID(agg_id)] = aggregate
        return found

    # -- saving -------------------------------------------------------------------------

    def save(self, notifications: Iterable[NewEvent] = ()) -> list[int]:
        """Append the new events of every aggregate, then ``notifications`` (events
        of no aggregate, e.g. ``builds_added``), and update the projections.

        Returns the positions of everything appended. Raises
        :class:`~herald.errors.VersionConflict` if another writer got there first.
        """
        with collector_paused(len(self._aggregates)):
            log_events = [to_log(event) for event in _in_command_order(self._aggregates.values())]
            plans: list[ProjectionPlan] = []
            positions = append_many(
                self.conn,
                [*log_events, *self._notifications, *notifications],
                # Planned while the server writes the log rows: the two overlap.
                while_writing=lambda: plans.append(plan_projection(log_events)),
            )
            self._notifications.clear()
            with translated():
                write_projection(self.conn, plans[0])
        return positions


def _in_command_order(aggregates: Iterable[Aggregate]) -> list[Any]:
    """Every pending event of ``aggregates``, in the order the commands were given in.

    A stable sort by time, where an event's time is the latest of its own
    aggregate's so far: each aggregate's events keep their version order
    whatever the clock did, and events of different aggregates with the same
    time keep the aggregates' order.
    """
    keyed: list[tuple[datetime, Any]] = []
    for aggregate in aggregates:
        latest: datetime | None = None
        for event in aggregate.collect_events():
            if latest is None or event.timestamp > latest:
                latest = event.timestamp
            keyed.append((latest, event))
    keyed.sort(key=itemgetter(0))
    return [event for _, event in keyed]


#: From this many objects in one operation (aggregates saved, builds added), the
#: cyclic garbage collector is paused while it runs (see :func:`collector_paused`).
PAUSE_COLLECTOR_FROM: Final = 1000


@contextmanager
def collector_paused(count: int) -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk operation on ``count`` objects.

    Building 50,000 aggregates, their events and their rows allocates millions
    of objects that all stay alive until the save ends; each collection the
    allocations trigger walks them again, and that cost was a third or more of
    the whole bulk save (measured in ``bench/bulk.py``). Nothing made here is
    garbage until then, so pausing costs no memory.

    At the end the objects made meanwhile join the oldest generation at once
    (``gc.freeze()`` then ``gc.unfreeze()``: two list splices), as they would
    after surviving two young collections; otherwise re-enabling starts with
    a young collection that walks all of them only to find them alive (a tenth
    of the bulk save). They are examined at the next full collection, as any
    long-lived object is; cycles made meanwhile elsewhere in the process wait
    for it too. Skipped if the process has frozen objects of its own (a
    pre-forking server): unfreezing would thaw them. The collector is enabled
    again unless it was off to begin with.
    """
    if count < PAUSE_COLLECTOR_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        gc.enable()
