"""Projections can be rebuilt from the log alone."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from herald.domain import Build, Evaluation
from herald.errors import InvalidTransition, UsageError
from herald.outbox.projector import _snapshot, check, rebuild
from herald.outbox.unit_of_work import UnitOfWork
from herald.schema import PROJECTIONS, build_messages, build_steps, builds

N_BUILDS = 30


def _command(rng: random.Random, build: Build, i: int) -> Callable[[], object]:
    step = rng.randint(1, 3)
    commands: list[Callable[[], object]] = [
        build.start,
        lambda: build.start_step(step, f"builder-{rng.randint(1, 4)}"),
        lambda: build.finish_step(step, rng.choice([0, 1]), f"/log/{i}"),
        lambda: build.finish(rng.choice([0, 1, 3, 7])),
        lambda: build.fail_because_of(rng.randint(1, N_BUILDS)),
        build.cancel,
        lambda: build.bump(rng.randint(1, 500)),
        build.restart,
        build.wait_for_message,
        lambda: build.receive_message(
            f"m{rng.randint(1, 60)}",
            rng.choice(["pass", "fail", "work"]),
            rng.choice([None, None, 1, 2, 3]),
        ),
    ]
    return rng.choice(commands)


def _random_history(engine: sa.Engine, seed: int, transactions: int) -> int:
    rng = random.Random(seed)
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("trace-1", 1)).add(eval_id=1, new_builds=N_BUILDS, cached_builds=0)
        for b in range(1, N_BUILDS + 1):
            uow.add(Build(b, 1, f"job-{b}", f"/nix/store/{b}.drv", "x86_64-linux"))
        uow.save()
    applied = 0
    for i in range(transactions):
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            for _ in range(rng.randint(1, 3)):
                build = uow.build(rng.randint(1, N_BUILDS))
                try:
                    _command(rng, build, i)()
                    applied += 1
                except (InvalidTransition, UsageError):
                    pass
            uow.save()
    return applied


def _projections(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {table.name: _snapshot(conn, table) for table in PROJECTIONS}


@pytest.mark.slow
def test_rebuilt_projections_equal_the_originals_after_a_long_random_history(
    engine: sa.Engine,
) -> None:
    applied = _random_history(engine, seed=3, transactions=400)
    assert applied > 150, "the history applied too few commands to prove much"
    original = _projections(engine)
    assert len(original["herald_builds"]) == N_BUILDS
    assert original["herald_build_messages"], "no message reached the projections"
    assert original["herald_build_steps"], "no step reached the projections"

    with engine.begin() as conn:
        assert check(conn) == []
        progress: list[tuple[int, int]] = []
        rebuild(conn, batch=100, progress=lambda done, total: progress.append((done, total)))
    assert _projections(engine) == original
    assert progress[-1][0] == progress[-1][1] > 100
    # The whole log in one batch: the projector's batching reorders the most.
    with engine.begin() as conn:
        rebuild(conn, batch=1_000_000)
    assert _projections(engine) == original

    # The projections are what the aggregates say.
    with engine.connect() as conn:
        aggregates = UnitOfWork(conn).builds(range(1, N_BUILDS + 1))
    for build_id, build in aggregates.items():
        row = original["herald_builds"][(build_id,)]
        assert (row["state"], row["status"], row["generation"], row["version"]) == (
            build.state,
            build.status,
            build.generation,
            build.version,
        )
        assert (row["priority"], row["substituted"]) == (build.priority, build.substituted)
        for message_id, message in build.messages.items():
            stored = original["herald_build_messages"][(build_id, message_id)]
            assert (stored["state"], stored["reason"]) == (message["state"], message["reason"])
        for step_nr, step in build.steps.items():
            stored = original["herald_build_steps"][(build_id, build.generation, step_nr)]
            assert (stored["status"], stored["log_path"]) == (step["status"], step["log_path"])


def test_check_reports_what_differs(engine: sa.Engine) -> None:
    _random_history(engine, seed=5, transactions=60)
    with engine.begin() as conn:
        conn.execute(sa.update(builds).where(builds.c.build_id == 1).values(priority=12345))
        message = conn.execute(sa.select(build_messages).limit(1)).first()
        if message is not None:
            conn.execute(
                sa.delete(build_messages).where(
                    build_messages.c.build_id == message.build_id,
                    build_messages.c.message_id == message.message_id,
                )
            )
        conn.execute(
            sa.insert(build_steps).values(
                build_id=999,
                generation=1,
                step_nr=1,
                machine="ghost",
                started_at=sa.func.current_timestamp(),
            )
        )
    with engine.begin() as conn:
        found = {(d.table, d.kind, d.columns) for d in check(conn)}
        # check() changed nothing.
        assert (
            conn.execute(sa.select(builds.c.priority).where(builds.c.build_id == 1)).scalar_one()
            == 12345
        )
    assert ("herald_builds", "changed", ("priority",)) in found
    assert ("herald_build_steps", "extra", ()) in found
    if message is not None:
        assert ("herald_build_messages", "missing", ()) in found
