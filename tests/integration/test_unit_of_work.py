"""The unit of work on SQLite and PostgreSQL: state and events commit together."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from herald.domain import Build, Evaluation
from herald.errors import UnknownAggregate, VersionConflict
from herald.outbox import unit_of_work
from herald.outbox.unit_of_work import UnitOfWork
from herald.schema import build_messages, build_steps, builds, evaluations
from tests.integration.helpers import count_events, read_all


def _queue(conn: sa.Connection, *build_ids: int) -> None:
    uow = UnitOfWork(conn)
    for build_id in build_ids:
        uow.add(Build(build_id, 1, f"job-{build_id}", f"/nix/store/{build_id}.drv", "x86_64-linux"))
    uow.save()


def _row(engine: sa.Engine, table: sa.Table, **where: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        stmt = sa.select(table).where(*(table.c[k] == v for k, v in where.items()))
        return dict(conn.execute(stmt).one()._mapping)


def test_save_writes_events_and_projections_together(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("trace-1", 7)).add(eval_id=3, new_builds=1, cached_builds=0)
        build = uow.add(Build(42, 7, "hello", "/nix/store/x-hello.drv", "x86_64-linux"))
        build.start()
        build.start_step(1, "builder-1")
        uow.save()
    entries = read_all(engine)
    assert [e.topic for e in entries] == [
        "eval_started",
        "eval_added",
        "build_queued",
        "build_started",
        "step_started",
    ]
    assert all(e.aggregate_id for e in entries)
    assert [e.aggregate_version for e in entries if e.topic != "eval_started"][-3:] == [1, 2, 3]
    row = _row(engine, builds, build_id=42)
    assert (row["state"], row["generation"], row["version"], row["job"]) == (
        "running",
        1,
        3,
        "hello",
    )
    assert row["started_at"] is not None
    assert _row(engine, build_steps, build_id=42)["machine"] == "builder-1"
    assert _row(engine, evaluations, trace_id="trace-1")["eval_id"] == 3

    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        build = uow.build(42)
        assert (build.state, build.version) == ("running", 3)
        build.finish_step(1, 0, "/log/1")
        build.wait_for_message()
        build.receive_message("m1", "pass")
        uow.save()
    row = _row(engine, builds, build_id=42)
    assert (row["state"], row["status"], row["version"]) == ("finished", 0, build.version)
    assert _row(engine, build_messages, build_id=42)["state"] == "applied"
    assert _row(engine, build_steps, build_id=42)["log_path"] == "/log/1"


def test_fail_restart_succeed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        _queue(conn, 1)
    for status in (1, 0):
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            build = uow.build(1)
            if build.state == "finished":
                build.restart()
            build.start()
            build.finish(status)
            uow.save()
    finished = [e for e in read_all(engine) if e.topic == "build_finished"]
    assert [(e.payload["status"], e.payload["generation"]) for e in finished] == [(1, 1), (0, 2)]
    row = _row(engine, builds, build_id=1)
    assert (row["state"], row["status"], row["generation"]) == ("finished", 0, 2)


def test_a_fault_between_append_and_projection_writes_nothing(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with engine.begin() as conn:
        _queue(conn, 1)
    before = count_events(engine)

    def broken(*_args: Any) -> int:
        raise RuntimeError("the projection write failed")

    monkeypatch.setattr(unit_of_work, "write_projection", broken)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.build(1).start()
        uow.save()
    assert count_events(engine) == before
    assert _row(engine, builds, build_id=1)["state"] == "queued"


def test_a_stale_aggregate_gets_a_version_conflict(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        _queue(conn, 1)
    with engine.connect() as first:
        mine = UnitOfWork(first)
        build = mine.build(1)
        first.rollback()
        build.bump(500)
        # Another writer changes the same build and commits first.
        with engine.begin() as conn:
            theirs = UnitOfWork(conn)
            theirs.build(1).start()
            theirs.save()
        with pytest.raises(VersionConflict) as info, first.begin():
            mine.save()
    assert info.value.version == 2
    row = _row(engine, builds, build_id=1)
    assert (row["state"], row["priority"], row["version"]) == ("running", 100, 2)
    assert [e.topic for e in read_all(engine)] == ["build_queued", "build_started"]


@pytest.mark.postgresql
def test_overlapping_transactions_get_a_version_conflict(pg_engine: sa.Engine) -> None:
    """Two writers in open transactions on the same build: one wins, one conflicts."""
    with pg_engine.begin() as conn:
        _queue(conn, 1)
    with pg_engine.connect() as first, pg_engine.connect() as second:
        mine, theirs = UnitOfWork(first), UnitOfWork(second)
        mine.build(1).bump(500)
        theirs.build(1).start()
        theirs.save()
        second.commit()
        with pytest.raises(VersionConflict):
            mine.save()
        first.rollback()
    assert _row(pg_engine, builds, build_id=1)["state"] == "running"
    assert count_events(pg_engine) == 2


def test_unknown_aggregates(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        with pytest.raises(UnknownAggregate, match="build 99 does not exist"):
            uow.build(99)
        with pytest.raises(UnknownAggregate, match="evaluation nope does not exist"):
            uow.evaluation("nope")


def test_many_builds_in_one_save_take_few_statements(engine: sa.Engine) -> None:
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    n = 5_000
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.begin() as conn:
            _queue(conn, *range(1, n + 1))
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            loaded = uow.builds(range(1, n + 1))
            for build in loaded.values():
                if build.build_id % 2:
                    build.fail_because_of(n + 1)
                else:
                    build.cancel()
            uow.save()
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert statements < 200, f"{statements} statements for {n} builds, twice"
    with engine.connect() as conn:
        states: dict[str, int] = dict(
            conn.execute(sa.select(builds.c.state, sa.func.count()).group_by(builds.c.state)).all()
        )
    assert states == {"finished": n // 2, "cancelled": n // 2}
