"""Wake-ups and query plans: what keeps the sequencer and readers fast on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from herald.outbox import LogEntry, LogReader, NewEvent, Waker, append, append_many, run_sequencer
from herald.outbox.sequencer import _bounds
from herald.schema.queries import QUERIES

pytestmark = pytest.mark.postgresql


def test_waker_returns_on_notify_and_on_timeout(pg_engine: sa.Engine) -> None:
    waker = Waker(pg_engine)
    try:
        started = time.monotonic()
        assert waker.wait(0.2) is False
        assert 0.15 < time.monotonic() - started < 2

        def notify() -> None:
            time.sleep(0.2)
            with pg_engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_notify('herald_log', 'not trusted')"))

        notifier = threading.Thread(target=notify)
        notifier.start()
        started = time.monotonic()
        assert waker.wait(10) is True
        assert time.monotonic() - started < 2, "woken by the timeout, not by the NOTIFY"
        notifier.join(5)
    finally:
        waker.close()


def test_follow_is_woken_by_the_sequencer(pg_engine: sa.Engine) -> None:
    """With a 30 s poll, only the sequencer's NOTIFY can deliver within a second."""
    stop = threading.Event()
    active = threading.Event()
    daemon = threading.Thread(
        target=run_sequencer, args=(pg_engine, stop), kwargs={"on_active": active}
    )
    daemon.start()
    received: list[tuple[float, LogEntry]] = []

    def follow() -> None:
        received.extend(
            (time.monotonic(), entry)
            for entry in LogReader(pg_engine).follow(0, poll_interval=30, stop=stop)
        )

    follower = threading.Thread(target=follow)
    try:
        assert active.wait(5)
        follower.start()
        time.sleep(0.5)  # the follower is now waiting on its NOTIFY
        committed: list[float] = []
        for i in range(5):
            with pg_engine.begin() as conn:
                append(conn, "build_started", {"build_id": i})
            committed.append(time.monotonic())
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while len(received) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        daemon.join(5)
        # The follower leaves its wait within its 30 s poll; a notification ends it sooner.
        with pg_engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_notify('herald_log', '')"))
        if follower.ident is not None:
            follower.join(35)
    assert [e.payload["build_id"] for _, e in received] == [0, 1, 2, 3, 4]
    delays = [got - sent for (got, _), sent in zip(received, committed, strict=True)]
    assert max(delays) < 1.0, f"delays {delays}: the follower was not woken by NOTIFY"


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


@pytest.mark.parametrize("name", ["sequencer_pending", "sequence_new_events"])
def test_sequencer_queries_use_the_tx_index(pg_engine: sa.Engine, name: str) -> None:
    """A cycle's cost follows the new events, not the size of the log."""
    with pg_engine.begin() as conn:
        append_many(conn, [NewEvent("build_queued", {"build_id": i}) for i in range(20_000)])
    LogReader(pg_engine).read(0, 1)
    with pg_engine.begin() as conn:
        conn.execute(sa.text("ANALYZE herald_events"))
    with pg_engine.connect() as conn:
        prev, last_seq = conn.execute(sa.text(QUERIES["sequencer_state"])).one()
        now = conn.execute(sa.text(QUERIES["current_snapshot"])).scalar_one()
        xmin, xmax, _ = prev.split(":")
        # A realistic prev: a few transactions were in progress when it was taken.
        prev = f"{int(xmin) - 50}:{xmax}:{int(xmin) - 50},{int(xmin) - 10}"
        plan = conn.execute(
            sa.text("EXPLAIN (FORMAT JSON) " + QUERIES[name]),
            {**_bounds(prev, now), "last_seq": last_seq},
        ).scalar_one()
        conn.rollback()
    if isinstance(plan, str):
        plan = json.loads(plan)
    nodes = _plan_nodes(plan[0]["Plan"])
    scans = [n for n in nodes if n.get("Relation Name") == "herald_events"]
    assert scans, "the plan reads no herald_events: the test inspects the wrong thing"
    assert all(n["Node Type"] != "Seq Scan" for n in scans), [n["Node Type"] for n in scans]
