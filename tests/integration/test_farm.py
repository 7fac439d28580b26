"""Farm operations over several aggregates, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa

from herald.domain import Evaluation
from herald.outbox import NewEvent, UnitOfWork
from herald.outbox.farm import (
    NewBuild,
    add_evaluation,
    finish_build,
    queued_dependents,
    receive_message,
    wait_for_message,
)
from herald.schema import builds
from tests.integration.helpers import read_all


def _build(build_id: int, *dependencies: int) -> NewBuild:
    return NewBuild(
        build_id,
        f"job-{build_id}",
        f"/nix/store/{build_id}.drv",
        "x86_64-linux",
        dependencies=dependencies,
    )


def _evaluate(
    engine: sa.Engine, trace: str, eval_id: int, new: list[NewBuild], cached: tuple[int, ...] = ()
) -> None:
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation(trace, 1))
        add_evaluation(uow, trace, eval_id, new, cached)
        uow.save()


def test_a_failure_takes_its_queued_dependents_with_it(engine: sa.Engine) -> None:
    # 2 and 3 depend on 1, 4 on 3 (so on 1 through it); 5 depends on 1 but is running.
    _evaluate(
        engine,
        "t1",
        1,
        [_build(1), _build(2, 1), _build(3, 1), _build(4, 3), _build(5, 1), _build(6)],
    )
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        for build_id in (1, 5):
            uow.build(build_id).start()
        uow.save()
    with engine.begin() as conn:
        assert queued_dependents(conn, 1) == [2, 3, 4]
        uow = UnitOfWork(conn)
        finish_build(uow, 1, 1)
        uow.save()
    (finished,) = [e for e in read_all(engine) if e.topic == "build_finished"]
    assert finished.payload["dependent_ids"] == [2, 3, 4]
    assert finished.payload["status"] == 1
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(builds.c.build_id, builds.c.status)).all())
    assert rows == {1: 1, 2: 2, 3: 2, 4: 2, 5: None, 6: None}


def test_a_success_lists_no_dependents(engine: sa.Engine) -> None:
    _evaluate(engine, "t1", 1, [_build(1), _build(2, 1)])
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.build(1).start()
        finish_build(uow, 1, 0)
        uow.save()
    (finished,) = [e for e in read_all(engine) if e.topic == "build_finished"]
    assert finished.payload["dependent_ids"] == []


def test_ten_thousand_dependents_append_and_read_back_intact(engine: sa.Engine) -> None:
    n = 10_000
    _evaluate(engine, "t1", 1, [_build(1), *(_build(i, 1) for i in range(2, n + 2))])
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        finish_build(uow, 1, 1)
        uow.save()
    entries = read_all(engine)
    (finished,) = [e for e in entries if e.topic == "build_finished"]
    assert finished.payload["dependent_ids"] == list(range(2, n + 2))
    assert sum(e.topic == "herald.build_dependency_failed" for e in entries) == n
    with engine.connect() as conn:
        failed = conn.execute(sa.select(sa.func.count()).where(builds.c.status == 2)).scalar_one()
    assert failed == n


def test_an_evaluation_announces_new_and_cached_builds(engine: sa.Engine) -> None:
    _evaluate(engine, "t1", 1, [_build(1), _build(2)])
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.build(1).finish(0)  # substituted
        uow.save()
    _evaluate(engine, "t2", 2, [_build(3)], cached=(1, 2))
    entries = read_all(engine)
    second = [(e.topic, e.payload) for e in entries if e.seq > 6]
    assert ("builds_added", {"build_id": 3}) in second
    assert ("cached_build_finished", {"eval_id": 2, "build_id": 1}) in second
    assert ("cached_build_queued", {"eval_id": 2, "build_id": 2}) in second
    added = [e.payload for e in entries if e.topic == "eval_added"]
    assert added[-1] == {
        "trace_id": "t2",
        "jobset_id": 1,
        "eval_id": 2,
        "new_builds": 1,
        "cached_builds": 2,
    }
    # Once per evaluation and build: announcing again appends nothing.
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.notify(NewEvent("cached_build_finished", {"eval_id": 2, "build_id": 1}))
        uow.notify(NewEvent("cached_build_queued", {"eval_id": 2, "build_id": 2}))
        uow.save()
    assert len(read_all(engine)) == len(entries)


def test_a_fail_message_takes_the_dependents_with_it(engine: sa.Engine) -> None:
    _evaluate(engine, "t1", 1, [_build(1), _build(2, 1), _build(3, 2), _build(4)])
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.build(1).start()
        uow.build(4).start()
        uow.save()
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        # Build 1 waits; its fail comes later. Build 4's fail came before it waits.
        wait_for_message(uow, 1)
        assert receive_message(uow, 4, "early", "fail") == "pending"
        uow.save()
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        assert receive_message(uow, 1, "verdict", "fail") == "applied"
        wait_for_message(uow, 4)  # applies the pending fail: nothing depends on 4
        uow.save()
    finished = {
        e.payload["build_id"]: e.payload for e in read_all(engine) if e.topic == "build_finished"
    }
    assert finished[1]["dependent_ids"] == [2, 3]
    assert finished[4]["dependent_ids"] == []
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(builds.c.build_id, builds.c.status)).all())
    assert rows == {1: 1, 2: 2, 3: 2, 4: 1}
    # A pass lists no dependents and fails none.
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        build = uow.build(1)
        build.restart()
        build.start()
        wait_for_message(uow, 1)
        assert receive_message(uow, 1, "second", "pass") == "applied"
        uow.save()
    assert [
        e.payload["dependent_ids"]
        for e in read_all(engine)
        if e.topic == "build_finished" and e.payload["build_id"] == 1
    ] == [[2, 3], []]
