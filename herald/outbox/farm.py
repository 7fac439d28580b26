"""The farm's operations that span several aggregates.

A build that fails takes its queued dependents with it (Hydra: they finish
as "dependency failed", status 2, and the failing build's
``build_finished`` lists them); an evaluation queues its new builds and
announces the builds it shares with earlier evaluations. Each operation
works inside a :class:`UnitOfWork`; the caller saves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from herald.domain import Build, Evaluation
from herald.domain.build import MessageState
from herald.outbox.append import NewEvent
from herald.outbox.unit_of_work import UnitOfWork, collector_paused
from herald.schema import build_dependencies, builds
from herald.schema.dberrors import translated

__all__ = [
    "NewBuild",
    "add_evaluation",
    "finish_build",
    "queued_dependents",
    "receive_message",
    "wait_for_message",
]


@dataclass(frozen=True, slots=True)
class NewBuild:
    """A build an evaluation adds to the queue."""

    build_id: int
    job: str
    drv_path: str
    system: str
    priority: int = 100
    dependencies: Sequence[int] = field(default_factory=tuple)


def queued_dependents(conn: sa.Connection, build_id: int) -> list[int]:
    """The queued builds that depend on ``build_id``, directly or through other queued
    builds, as the projections say (one indexed query per level of the graph)."""
    found: set[int] = set()
    frontier = [build_id]
    with translated():
        while frontier:
            # Two index-driven steps, not a join: planners (SQLite's at least)
            # would drive a join from every queued build instead of the edges.
            edges = _chunked_select(
                conn, build_dependencies.c.build_id, build_dependencies.c.depends_on, frontier
            )
            queued = _chunked_select(
                conn,
                builds.c.build_id,
                builds.c.build_id,
                sorted(set(edges) - found),
                builds.c.state == "queued",
            )
            found.update(queued)
            frontier = sorted(set(queued))
    found.discard(build_id)
    return sorted(found)


def _chunked_select(
    conn: sa.Connection,
    column: sa.ColumnElement[int],
    key: sa.ColumnElement[int],
    values: Sequence[int],
    *where: sa.ColumnElement[bool],
) -> list[int]:
    """``SELECT column WHERE key IN values AND where``, 1,000 values a query."""
    found: list[int] = []
    for i in range(0, len(values), 1000):
        stmt = sa.select(column).where(key.in_(values[i : i + 1000]), *where)
        found += conn.execute(stmt).scalars()
    return found


def _dependents(uow: UnitOfWork, build_id: int) -> list[int]:
    """The queued dependents of ``build_id`` that a failure takes with it.

    The aggregates have the last word: a dependent that left the queue since
    the projection was read is neither failed nor listed.
    """
    candidates = queued_dependents(uow.conn, build_id)
    return sorted(b for b, dep in uow.builds(candidates).items() if dep.state == "queued")


def _fail_dependents(
    uow: UnitOfWork, build: Build, dependents: list[int], *, was_finished: bool
) -> None:
    """If ``build`` has just finished with a failure (and so listed ``dependents`` in its
    ``build_finished``), they finish with it as "dependency failed"."""
    if was_finished or build.state != "finished" or not build.status:
        return
    for dependent in uow.builds(dependents).values():
        dependent.fail_because_of(build.build_id)


def finish_build(uow: UnitOfWork, build_id: int, status: int) -> Build:
    """Finish ``build_id`` with Hydra ``status``; on a failure, its queued dependents
    finish with it as "dependency failed" and its ``build_finished`` lists them."""
    build = uow.build(build_id)
    dependents = [] if status == 0 else _dependents(uow, build_id)
    build.finish(status, dependents)
    _fail_dependents(uow, build, dependents, was_finished=False)
    return build


def receive_message(
    uow: UnitOfWork,
    build_id: int,
    message_id: str,
    type: str,  # noqa: A002 - Harbormaster's name for it
    generation: int | None = None,
) -> MessageState:
    """Record a Harbormaster message for ``build_id``; a ``fail`` that finishes the
    build takes its queued dependents with it, as :func:`finish_build` does."""
    build = uow.build(build_id)
    was_finished = build.state == "finished"
    dependents = _dependents(uow, build_id) if type == "fail" else []
    state = build.receive_message(message_id, type, generation, dependent_ids=dependents)
    _fail_dependents(uow, build, dependents, was_finished=was_finished)
    return state


def wait_for_message(uow: UnitOfWork, build_id: int) -> Build:
    """The build's work is done; it waits for a message. A ``fail`` that arrived
    earlier finishes it at once and takes its queued dependents with it."""
    build = uow.build(build_id)
    dependents = _dependents(uow, build_id)
    build.wait_for_message(dependent_ids=dependents)
    _fail_dependents(uow, build, dependents, was_finished=False)
    return build


def add_evaluation(
    uow: UnitOfWork,
    trace_id: str,
    eval_id: int,
    new_builds: Iterable[NewBuild],
    cached_build_ids: Iterable[int] = (),
) -> Evaluation:
    """Record the evaluation ``trace_id`` (started earlier) as added with ``eval_id``.

    Queues ``new_builds`` (``build_queued`` each, then one ``builds_added``
    with the lowest new id) and announces each build it shares with earlier
    evaluations as ``cached_build_finished`` or ``cached_build_queued`` (once
    per evaluation and build, however often this is called).
    """
    evaluation = uow.evaluation(trace_id)
    specs = list(new_builds)
    with collector_paused(len(specs)):
        added = [
            uow.add(
                Build.queue(
                    spec.build_id,
                    evaluation.jobset_id,
                    spec.job,
                    spec.drv_path,
                    spec.system,
                    spec.priority,
                    list(spec.dependencies),
                )
            )
            for spec in specs
        ]
    cached = uow.builds(cached_build_ids)
    evaluation.add(eval_id, len(added), len(cached))
    if added:
        uow.notify(NewEvent("builds_added", {"build_id": min(b.build_id for b in added)}))
    for build_id, build in sorted(cached.items()):
        topic = "cached_build_finished" if build.state == "finished" else "cached_build_queued"
        uow.notify(NewEvent(topic, {"eval_id": eval_id, "build_id": build_id}))
    return evaluation
