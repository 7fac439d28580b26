"""Projections: the farm's current state, derived from log events.

:func:`project` applies domain log events (:class:`herald.domain.LogEvent`)
to the projection tables (``herald_evaluations``, ``herald_builds``,
``herald_build_steps``, ``herald_build_messages``). It is the one way those
tables are written: the unit of work calls it in the same transaction as it
appends the events, and ``herald projections rebuild`` calls it on the whole
log, so a rebuilt database equals the original by construction and the
check is whether the log holds everything.

Consecutive events that need the same statement go in one executemany, so an
evaluation that queues 50,000 builds is a few statements, not 50,000; on
PostgreSQL a long batch of new rows goes in by binary ``COPY`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from functools import cache
from typing import Any

import sqlalchemy as sa

from herald.domain import LogEvent
from herald.domain.build import unwaited_reason
from herald.outbox.append import COPY_MIN_ROWS, copy_rows
from herald.schema import (
    PROJECTIONS,
    build_dependencies,
    build_messages,
    build_steps,
    builds,
    evaluations,
    events,
    operations,
)

__all__ = [
    "PROJECTED_TOPICS",
    "Difference",
    "ProjectionPlan",
    "check",
    "log_event",
    "plan_projection",
    "project",
    "rebuild",
    "write_projection",
]

Op = tuple[sa.Executable, dict[str, Any]]


@cache
def _update(table: sa.Table, keys: tuple[str, ...], columns: tuple[str, ...]) -> sa.Update:
    """``UPDATE table SET columns WHERE keys``, keys bound as ``k_<name>``."""
    return (
        sa.update(table)
        .where(*(table.c[key] == sa.bindparam(f"k_{key}") for key in keys))
        .values({column: sa.bindparam(column) for column in columns})
    )


@cache
def _insert(table: sa.Table) -> sa.Insert:
    return sa.insert(table)


def _build(event: LogEvent, **changes: Any) -> Op:
    """Update the build's row: ``changes`` plus its version and time."""
    values = {**changes, "version": event.aggregate_version, "updated_at": event.occurred_at}
    stmt = _update(builds, ("build_id",), tuple(sorted(values)))
    return stmt, {"k_build_id": event.payload["build_id"], **values}


def _evaluation(event: LogEvent, **changes: Any) -> Op:
    values = {**changes, "version": event.aggregate_version, "updated_at": event.occurred_at}
    stmt = _update(evaluations, ("aggregate_id",), tuple(sorted(values)))
    return stmt, {"k_aggregate_id": event.aggregate_id, **values}


def _eval_started(e: LogEvent) -> list[Op]:
    row = {
        "aggregate_id": e.aggregate_id,
        "trace_id": e.payload["trace_id"],
        "jobset_id": e.payload["jobset_id"],
        "state": "running",
        "eval_id": None,
        "new_builds": None,
        "cached_builds": None,
        "previous_eval_id": None,
        "error": None,
        "version": e.aggregate_version,
        "started_at": e.occurred_at,
        "updated_at": e.occurred_at,
    }
    return [(_insert(evaluations), row)]


def _build_queued(e: LogEvent) -> list[Op]:
    p = e.payload
    row = {
        "build_id": p["build_id"],
        "aggregate_id": e.aggregate_id,
        "jobset_id": p["jobset_id"],
        "job": p["job"],
        "drv_path": p["drv_path"],
        "system": p["system"],
        "priority": p["priority"],
        "dependencies": list(p["dependencies"]),
        "state": "queued",
        "status": None,
        "generation": 1,
        "substituted": False,
        "version": e.aggregate_version,
        "queued_at": e.occurred_at,
        "started_at": None,
        "finished_at": None,
        "updated_at": e.occurred_at,
    }
    # Once per build an evaluation adds (tens of thousands at once): the
    # statements are looked up once, not once per edge.
    insert_edge = _insert(build_dependencies)
    build_id = p["build_id"]
    edges = [(insert_edge, {"build_id": build_id, "depends_on": d}) for d in p["dependencies"]]
    return [(_insert(builds), row), *edges]


def _step_started(e: LogEvent) -> list[Op]:
    p = e.payload
    row = {
        "build_id": p["build_id"],
        "generation": p["generation"],
        "step_nr": p["step_nr"],
        "machine": p["machine"],
        "status": None,
        "log_path": None,
        "started_at": e.occurred_at,
        "finished_at": None,
    }
    return [(_insert(build_steps), row), _build(e)]


def _step_finished(e: LogEvent) -> list[Op]:
    p = e.payload
    stmt = _update(
        build_steps, ("build_id", "generation", "step_nr"), ("finished_at", "log_path", "status")
    )
    params = {
        "k_build_id": p["build_id"],
        "k_generation": p["generation"],
        "k_step_nr": p["step_nr"],
        "status": p["status"],
        "log_path": p["log_path"],
        "finished_at": e.occurred_at,
    }
    return [(stmt, params), _build(e)]


def _restarted(e: LogEvent) -> list[Op]:
    p = e.payload
    ops = [
        _build(
            e,
            state="queued",
            status=None,
            generation=p["generation"],
            substituted=False,
            started_at=None,
            finished_at=None,
        )
    ]
    stale = _update(build_messages, ("build_id", "message_id"), ("reason", "state", "updated_at"))
    reason = f"the build was restarted (generation {p['generation']})"
    ops += [
        (
            stale,
            {
                "k_build_id": p["build_id"],
                "k_message_id": message_id,
                "state": "stale",
                "reason": reason,
                "updated_at": e.occurred_at,
            },
        )
        for message_id in p["stale_message_ids"]
    ]
    return ops


def _message_received(e: LogEvent) -> list[Op]:
    p = e.payload
    row = {
        "build_id": p["build_id"],
        "message_id": p["message_id"],
        "type": p["type"],
        "generation": p["generation"],
        "state": p["state"],
        "reason": p["reason"],
        "received_at": e.occurred_at,
        "updated_at": e.occurred_at,
    }
    return [(_insert(build_messages), row), _build(e)]


def _message_applied(e: LogEvent) -> list[Op]:
    p = e.payload
    stmt = _update(build_messages, ("build_id", "message_id"), ("state", "updated_at"))
    params = {
        "k_build_id": p["build_id"],
        "k_message_id": p["message_id"],
        "state": "applied",
        "updated_at": e.occurred_at,
    }
    return [(stmt, params), _build(e)]


_SETTLE = (
    sa.update(build_messages)
    .where(
        build_messages.c.build_id == sa.bindparam("k_build_id"),
        build_messages.c.state == "pending",
    )
    .values(state="ignored", reason=sa.bindparam("reason"), updated_at=sa.bindparam("updated_at"))
)


def _ended(e: LogEvent, state: str, status: int, **changes: Any) -> list[Op]:
    """The build ended: its row, and its still pending messages ignored (as the aggregate
    does: see Build._settle_pending_messages)."""
    settle = {
        "k_build_id": e.payload["build_id"],
        "reason": unwaited_reason(status),
        "updated_at": e.occurred_at,
    }
    row = _build(e, state=state, status=status, finished_at=e.occurred_at, **changes)
    return [row, (_SETTLE, settle)]


_HANDLERS: dict[str, Callable[[LogEvent], list[Op]]] = {
    "eval_started": _eval_started,
    "eval_added": lambda e: [
        _evaluation(
            e,
            state="added",
            eval_id=e.payload["eval_id"],
            new_builds=e.payload["new_builds"],
            cached_builds=e.payload["cached_builds"],
        )
    ],
    "eval_cached": lambda e: [
        _evaluation(e, state="cached", previous_eval_id=e.payload["previous_eval_id"])
    ],
    "eval_failed": lambda e: [_evaluation(e, state="failed", error=e.payload["error"])],
    "build_queued": _build_queued,
    "build_started": lambda e: [_build(e, state="running", started_at=e.occurred_at)],
    "step_started": _step_started,
    "step_finished": _step_finished,
    "build_finished": lambda e: _ended(
        e, "finished", e.payload["status"], substituted=e.payload["substituted"]
    ),
    "herald.build_dependency_failed": lambda e: _ended(e, "finished", 2, substituted=False),
    "build_cancelled": lambda e: _ended(e, "cancelled", 4),
    "build_bumped": lambda e: [_build(e, priority=e.payload["priority"])],
    "build_restarted": _restarted,
    "herald.build_waiting": lambda e: [_build(e, state="waiting")],
    "build_message_received": _message_received,
    "herald.build_message_applied": _message_applied,
}

#: The topics that change a projection.
PROJECTED_TOPICS = frozenset(_HANDLERS)


#: Each statement's table, and the parameter that names the build (or evaluation)
#: whose rows it writes (filled as statements are first seen; they are few).
_OWNER: dict[sa.Executable, tuple[str, str]] = {}


def _owner(stmt: sa.Executable, params: dict[str, Any]) -> tuple[str, object]:
    """The table and the build (or evaluation) whose rows an op writes."""
    found = _OWNER.get(stmt)
    if found is None:
        table: str = stmt.table.name  # type: ignore[attr-defined]
        for name in ("k_build_id", "build_id", "k_aggregate_id", "aggregate_id"):
            if name in params:
                found = _OWNER[stmt] = (table, name)
                break
        else:
            raise KeyError("a projection op names no build or evaluation")
    return found[0], params[found[1]]


@dataclass(frozen=True, slots=True)
class ProjectionPlan:
    """The statements that apply some log events to the projections, to run in this
    order, each with a batch of parameters."""

    batches: list[tuple[sa.Executable, list[dict[str, Any]]]]
    #: how many of the events change a projection
    applied: int


def plan_projection(log_events: Iterable[LogEvent]) -> ProjectionPlan:
    """The statements that apply ``log_events`` (in log order) to the projections.

    Pure Python, no database: the unit of work makes the plan while the
    database is still writing the log rows (see :func:`append_many`'s
    ``while_writing``). Events of other topics (custom ones, notifications
    with no state) are passed over.
    """
    # Batching. Each statement writes rows of one table, all of one build (or
    # evaluation), and reads nothing else, so what must keep its order is the
    # ops on the same (table, build). An op joins the pending batch of its
    # statement unless a later batch already holds an op on the same
    # (table, build); an INSERT always may (its row is new). Otherwise
    # everything pending is closed (it runs first, in order) and a new group
    # of batches begins.
    applied = 0
    done: list[tuple[sa.Executable, list[dict[str, Any]]]] = []
    batches: list[tuple[sa.Executable, list[dict[str, Any]], set[tuple[str, object]]]] = []
    index: dict[sa.Executable, int] = {}
    for event in log_events:
        handler = _HANDLERS.get(event.topic)
        if handler is None:
            continue
        applied += 1
        for stmt, params in handler(event):
            row = _owner(stmt, params)
            at = index.get(stmt)
            if at is not None and (
                isinstance(stmt, sa.Insert)
                or all(row not in keys for _, _, keys in batches[at + 1 :])
            ):
                batches[at][1].append(params)
                batches[at][2].add(row)
                continue
            if at is not None:
                done += [(stmt, params) for stmt, params, _ in batches]
                batches.clear()
                index.clear()
            index[stmt] = len(batches)
            batches.append((stmt, [params], {row}))
    done += [(stmt, params) for stmt, params, _ in batches]
    return ProjectionPlan(done, applied)


def write_projection(conn: sa.Connection, plan: ProjectionPlan) -> int:
    """Run ``plan``'s statements in ``conn``'s transaction; returns how many events it
    applied. On PostgreSQL a batch of at least :data:`COPY_MIN_ROWS` new rows goes by
    binary COPY."""
    copy = conn.dialect.name == "postgresql"
    for stmt, batch in plan.batches:
        if copy and isinstance(stmt, sa.Insert) and len(batch) >= COPY_MIN_ROWS:
            copy_rows(conn, stmt.table, batch)
        else:
            conn.execute(stmt, batch)
    return plan.applied


def project(conn: sa.Connection, log_events: Iterable[LogEvent]) -> int:
    """Apply ``log_events`` (in log order) to the projections; returns how many applied.

    Events of other topics (custom ones, notifications with no state) are
    passed over. Runs in ``conn``'s transaction.
    """
    return write_projection(conn, plan_projection(log_events))


def log_event(row: Any) -> LogEvent:
    """A domain log event from a ``herald_events`` row (topic, payload, aggregate id and
    version, occurred_at)."""
    when = row.occurred_at
    if when.tzinfo is None:  # SQLite gives naive UTC times back
        when = when.replace(tzinfo=UTC)
    return LogEvent(row.topic, row.payload, row.aggregate_id, row.aggregate_version, when)


_DOMAIN_EVENTS = sa.select(
    events.c.position,
    events.c.topic,
    events.c.payload,
    events.c.aggregate_id,
    events.c.aggregate_version,
    events.c.occurred_at,
).where(events.c.aggregate_id.is_not(None), events.c.topic.in_(sorted(PROJECTED_TOPICS)))


def _empty(conn: sa.Connection) -> None:
    """Empty the projections, except, once the log was pruned, the rows of aggregates
    whose whole history was pruned: the log cannot make those again."""
    pruned = conn.execute(
        sa.select(operations.c.id).where(operations.c.action == "prune").limit(1)
    ).first()
    if pruned is None:
        for table in PROJECTIONS:
            conn.execute(sa.delete(table))
        return

    def has_events(aggregate_id: sa.ColumnElement[Any]) -> sa.Exists:
        return sa.exists().where(events.c.aggregate_id == aggregate_id)

    in_log = sa.select(builds.c.build_id).where(has_events(builds.c.aggregate_id))
    for table in (build_messages, build_steps, build_dependencies):
        conn.execute(sa.delete(table).where(table.c.build_id.in_(in_log)))
    conn.execute(sa.delete(builds).where(has_events(builds.c.aggregate_id)))
    conn.execute(sa.delete(evaluations).where(has_events(evaluations.c.aggregate_id)))


def rebuild(
    conn: sa.Connection,
    *,
    batch: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Empty the projections and apply every aggregate event of the log again.

    Once the log was pruned, the rows of aggregates it no longer holds stay
    as they are (their last state).

    Events are applied in position order: an aggregate's next version is
    inserted only after its previous one committed, so position order keeps
    each aggregate's version order (seq order may not, for two writers made
    visible in one sequencer cycle). Events with no aggregate (notifications
    appended by other writers) are not state and are passed over.
    ``progress(done, total)`` is called after each batch. Runs in ``conn``'s
    transaction; returns how many events were applied.
    """
    total = conn.execute(
        sa.select(sa.func.count()).select_from(_DOMAIN_EVENTS.subquery())
    ).scalar_one()
    _empty(conn)
    done, after = 0, 0
    while True:
        rows = conn.execute(
            _DOMAIN_EVENTS.where(events.c.position > after).order_by(events.c.position).limit(batch)
        ).all()
        if not rows:
            return done
        done += project(conn, [log_event(row) for row in rows])
        after = rows[-1].position
        if progress is not None:
            progress(done, total)


@dataclass(frozen=True, slots=True)
class Difference:
    """A projection row that differs from what the log makes of it."""

    table: str
    key: tuple[Any, ...]
    #: "missing" (the log makes it, the table lacks it), "extra" (the reverse),
    #: or "changed" (both have it; ``columns`` says which differ)
    kind: str
    columns: tuple[str, ...] = ()

    def __str__(self) -> str:
        key = ", ".join(map(str, self.key))
        what = f"{self.kind} ({', '.join(self.columns)})" if self.columns else self.kind
        return f"{self.table} [{key}]: {what}"


def _snapshot(conn: sa.Connection, table: sa.Table) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = [column.name for column in table.primary_key.columns]
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in conn.execute(sa.select(table)):
        values = dict(row._mapping)
        rows[tuple(values[key] for key in keys)] = values
    return rows


def check(conn: sa.Connection) -> list[Difference]:
    """Rebuild the projections inside a savepoint, compare, and roll the rebuild back.

    An empty list means the stored projections are exactly what the log makes.
    """
    stored = {table.name: _snapshot(conn, table) for table in PROJECTIONS}
    savepoint = conn.begin_nested()
    try:
        rebuild(conn)
        rebuilt = {table.name: _snapshot(conn, table) for table in PROJECTIONS}
    finally:
        savepoint.rollback()
    differences: list[Difference] = []
    for table in PROJECTIONS:
        have, want = stored[table.name], rebuilt[table.name]
        differences += [
            Difference(table.name, key, "missing")
            for key in sorted(want.keys() - have.keys(), key=repr)
        ]
        differences += [
            Difference(table.name, key, "extra")
            for key in sorted(have.keys() - want.keys(), key=repr)
        ]
        for key in sorted(have.keys() & want.keys(), key=repr):
            changed = tuple(c for c in want[key] if have[key][c] != want[key][c])
            if changed:
                differences.append(Difference(table.name, key, "changed", changed))
    return differences
