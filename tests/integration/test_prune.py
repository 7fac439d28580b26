"""Retention: what ``herald prune`` deletes, and above all what it never deletes.

The property test builds random logs (plain events, events of a few
aggregates, random ages), random consumers with random offsets, parked
events and a consumer configured but never run, prunes, and checks the
result against an independent statement of the rules; then the safety
properties on their own: no event after any consumer's offset, no parked
event and nothing after it, and no event younger than the cutoff is ever
gone, and an aggregate keeps all of its events or none.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herald.config import create_engine
from herald.demo import run_demo
from herald.errors import AppendOnlyViolation
from herald.outbox import Sequencer, head
from herald.outbox.projector import check, rebuild
from herald.outbox.retention import prune
from herald.schema import builds, consumers, deliveries, events, log_order, operations, parked
from herald.schema.dberrors import translated

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 30))
    log = []
    for seq in range(1, n + 1):
        aggregate = draw(st.one_of(st.none(), st.integers(0, 4)))
        log.append(
            {
                "seq": seq,
                "aggregate": None if aggregate is None else f"agg-{aggregate}",
                "age": draw(st.integers(0, 1000)),
                "delivery": draw(st.sampled_from(["at_least_once", "ephemeral"])),
            }
        )
    names = draw(st.lists(st.sampled_from(["github", "hook", "metrics"]), unique=True))
    offsets = {name: draw(st.integers(0, n)) for name in names}
    parked_rows = sorted(
        {
            (name, draw(st.integers(1, offsets[name])))
            for name in names
            if offsets[name] > 0 and draw(st.booleans())
        }
    )
    return {
        "log": log,
        "offsets": offsets,
        "parked": parked_rows,
        "never_run": draw(st.booleans()),
        "older_than": draw(st.integers(1, 1000)),
    }


def _fill(engine: sa.Engine, scenario: dict[str, Any]) -> None:
    versions: dict[str, int] = {}
    with engine.begin() as conn:
        for item in scenario["log"]:
            aggregate = item["aggregate"]
            version = None
            if aggregate is not None:
                version = versions[aggregate] = versions.get(aggregate, 0) + 1
            when = NOW - timedelta(seconds=item["age"])
            conn.execute(
                events.insert().values(
                    position=item["seq"],
                    topic="acme.tick",
                    payload={"n": item["seq"]},
                    delivery=item["delivery"],
                    aggregate_id=aggregate,
                    aggregate_version=version,
                    occurred_at=when,
                    recorded_at=when,
                )
            )
            conn.execute(log_order.insert().values(seq=item["seq"], position=item["seq"]))
        for name, offset in scenario["offsets"].items():
            conn.execute(consumers.insert().values(name=name, offset_seq=offset))
            for seq in range(1, offset + 1):
                conn.execute(
                    deliveries.insert().values(
                        consumer=name,
                        seq=seq,
                        attempt=1,
                        outcome="delivered",
                        started_at=NOW,
                        duration_ms=1.0,
                    )
                )
        for name, seq in scenario["parked"]:
            conn.execute(
                parked.insert().values(
                    consumer=name, seq=seq, key=None, attempts=3, error="boom", parked_at=NOW
                )
            )


def _expected_doomed(scenario: dict[str, Any]) -> set[int]:
    """The rules, stated independently of the implementation."""
    log = scenario["log"]
    cutoff_age = scenario["older_than"]
    bound = len(log) - 1  # the newest event always stays
    for item in log:  # the first event younger than the cutoff stops the prune
        if item["age"] <= cutoff_age:
            bound = min(bound, item["seq"] - 1)
            break
    offsets = list(scenario["offsets"].values())
    if scenario["never_run"]:
        offsets.append(0)
    bound = min([bound, *offsets])
    if scenario["parked"]:
        bound = min(bound, min(seq for _, seq in scenario["parked"]) - 1)
    last_of: dict[str, int] = {}
    for item in log:
        if item["aggregate"] is not None:
            last_of[item["aggregate"]] = item["seq"]
    return {
        item["seq"]
        for item in log
        if item["seq"] <= bound
        and (item["aggregate"] is None or last_of[item["aggregate"]] <= bound)
    }


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prune")


@pytest.mark.sqlite
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios(), dry_run=st.booleans())
def test_prune_never_removes_what_a_consumer_still_needs(
    sqlite_template: Path, scratch: Path, scenario: dict[str, Any], dry_run: bool
) -> None:
    path = scratch / f"{uuid.uuid4().hex}.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite:///{path}")
    try:
        _fill(engine, scenario)
        with engine.connect() as conn:
            before_events = set(conn.execute(sa.select(log_order.c.seq)).scalars())
            before_records = conn.execute(sa.select(deliveries.c.consumer, deliveries.c.seq)).all()
            conn.rollback()
            configured = ["never-run"] if scenario["never_run"] else []
            result = prune(
                conn,
                timedelta(seconds=scenario["older_than"]),
                dry_run=dry_run,
                configured=configured,
                now=NOW,
            )
            remaining = set(conn.execute(sa.select(log_order.c.seq)).scalars())
            remaining_positions = set(conn.execute(sa.select(events.c.position)).scalars())
            kept_records = conn.execute(sa.select(deliveries.c.consumer, deliveries.c.seq)).all()
            recorded = conn.execute(sa.select(operations.c.detail)).scalars().all()
            conn.rollback()
    finally:
        engine.dispose()
        path.unlink()

    doomed = _expected_doomed(scenario)
    assert result.events == len(doomed)
    if dry_run:
        assert remaining == before_events
        assert sorted(kept_records) == sorted(before_records)
        assert recorded == []
        return
    assert remaining == before_events - doomed
    assert remaining_positions == remaining  # the events went with their order rows
    assert sorted(kept_records) == sorted(r for r in before_records if r[1] not in doomed)
    assert [d["events"] for d in recorded] == [len(doomed)]
    assert result.deliveries == len(before_records) - len(kept_records)

    # The safety properties, each on its own.
    log = {item["seq"]: item for item in scenario["log"]}
    gone = before_events - remaining
    for name, offset in scenario["offsets"].items():
        assert all(seq <= offset for seq in gone), f"pruned past {name}'s offset {offset}"
    if scenario["never_run"]:
        assert gone == set(), "a configured consumer that never ran needs everything"
    for _, seq in scenario["parked"]:
        assert all(g < seq for g in gone), f"pruned a parked event (seq {seq}) or one after it"
    younger = [s for s, item in log.items() if item["age"] <= scenario["older_than"]]
    if younger:
        assert all(g < min(younger) for g in gone), "pruned at or after a young event"
    if log:
        assert len(log) in remaining, "the newest event was pruned: its seq could come again"
    for aggregate in {item["aggregate"] for item in log.values()} - {None}:
        own = {s for s, item in log.items() if item["aggregate"] == aggregate}
        assert own <= gone or not (own & gone), f"{aggregate} lost part of its history"


@pytest.fixture
def demo_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(pg_url)
    run_demo(engine, builds=12, writers=2, seed=3, echo=lambda _line: None)
    with engine.connect() as conn:
        Sequencer().cycle(conn)
    yield engine
    engine.dispose()


@pytest.mark.postgresql
def test_prune_on_postgresql_goes_through_the_trigger_and_keeps_projections(
    demo_engine: sa.Engine,
) -> None:
    engine = demo_engine
    with engine.begin() as conn:
        top = head(conn)
        conn.execute(consumers.insert().values(name="github", offset_seq=top))
        count_builds = conn.execute(sa.select(sa.func.count()).select_from(builds)).scalar_one()
    later = datetime.now(UTC) + timedelta(days=1)
    with engine.connect() as conn:
        dry = prune(conn, timedelta(hours=1), dry_run=True, now=later)
        assert dry.events > 0
        assert head(conn) == top
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() >= top
        conn.rollback()
        result = prune(conn, timedelta(hours=1), now=later)
        assert result.events == dry.events
        assert (result.first_seq, result.last_seq) == (1, top - 1)
        left = conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar_one()
        assert left == top - result.events == result.kept + 1
        conn.rollback()
    # Whole builds went (the demo finishes them all); their projection rows stay,
    # and a rebuild from what the log still holds keeps them.
    with engine.begin() as conn:
        assert check(conn) == []
        rebuild(conn)
        after = conn.execute(sa.select(sa.func.count()).select_from(builds)).scalar_one()
        assert after == count_builds
    # Outside `herald prune` the log is as append-only as ever.
    with pytest.raises(AppendOnlyViolation), engine.begin() as conn, translated():
        conn.execute(sa.text("DELETE FROM herald_events"))
    with pytest.raises(AppendOnlyViolation), engine.begin() as conn, translated():
        conn.execute(sa.text("SET LOCAL herald.prune = 'on'"))
        conn.execute(sa.text("UPDATE herald_events SET topic = 'acme.rewritten'"))


@pytest.mark.postgresql
def test_a_configured_consumer_that_never_ran_holds_everything_back(
    demo_engine: sa.Engine,
) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    with demo_engine.connect() as conn:
        top = head(conn)
        conn.rollback()
        result = prune(conn, timedelta(hours=1), configured=["fresh"], now=later)
        assert (result.events, result.first_seq) == (0, None)
        assert result.limited_by == ["consumer fresh (offset 0)"]
        assert head(conn) == top
        conn.rollback()
