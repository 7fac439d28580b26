"""Resets and replays against real databases, with a daemon running the consumer.

A reset (``store.reset_offset``, what ``herald consumers reset --force``
does) while the daemon delivers must take effect at the next batch, and no
handler call may lose its record or get two. A replay delivers a range again
without touching the offset or the parked list.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from herald import operations
from herald.consumers import store
from herald.consumers.replay import replay
from herald.errors import LostClaim
from herald.outbox import LogEntry
from herald.schema import deliveries, parked
from tests.integration.helpers import claimed
from tests.integration.test_consumers import (
    Recorder,
    consumer,
    daemon,
    emit,
    head_of,
    offset_of,
    parked_of,
    reach,
    records,
    tick,
    until,
)


def live_records(engine: sa.Engine, name: str) -> Counter[int]:
    """Live handler-call records per seq (delivered or failed: one per handler call)."""
    return Counter(
        r.seq
        for r in records(engine, name)
        if r.kind == "live" and r.outcome in ("delivered", "failed")
    )


def test_a_forced_reset_takes_effect_at_the_next_batch_with_every_call_recorded_once(
    engine: sa.Engine,
) -> None:
    recorder = Recorder(sleep=0.002)
    seqs = emit(engine, [tick(b % 40, b) for b in range(600)])
    status = consumer("status", recorder, batch_size=100, concurrency=4)
    with daemon(engine, status):
        # Mid-stream: the daemon is inside some batch when the reset lands.
        until(lambda: offset_of(engine, "status") >= 200, 30, "the consumer under way")
        with engine.begin() as conn:
            before = store.reset_offset(conn, "status", 0)
        calls_at_reset = len(recorder.calls)
        assert before.offset >= 200
        reach(engine, "status", seqs[-1], timeout=60)
        # Every event was delivered again after the reset (the offset went back to 0).
        with recorder.lock:
            after_reset = Counter(recorder.calls[calls_at_reset:])
        missing = [s for s in seqs if after_reset[s] == 0]
        assert missing == [], f"{len(missing)} events not delivered again after the reset"
    # One record per handler call: none lost, none written twice.
    assert live_records(engine, "status") == Counter(recorder.calls)
    assert recorder.overlaps == []


def test_a_reset_forward_skips_and_a_commit_of_the_old_epoch_keeps_its_records(
    engine: sa.Engine,
) -> None:
    seqs = emit(engine, [tick(1, n) for n in range(10)])
    epoch = claimed(engine, "skipper")
    with engine.begin() as conn:
        store.reset_offset(conn, "skipper", seqs[5])
    record = store.Record(seqs[0], 1, "delivered", store.now(), 1.0)
    with engine.connect() as conn:
        moved = store.commit_batch(conn, "skipper", "me", epoch, 0, seqs[0], [record])
    assert moved is False
    assert offset_of(engine, "skipper") == seqs[5], "the old epoch's commit moved the offset"
    assert [r.seq for r in records(engine, "skipper")] == [seqs[0]], "its record was lost"
    newest = max(r.id for r in records(engine, "skipper"))
    with engine.connect() as conn:
        row = store.consumer_row(conn, "skipper")
        assert row is not None
        # The record is history for the new epoch, never "finished ahead".
        assert store.finished_ahead(conn, "skipper", 0, row.records_floor) == {}
        assert store.finished_ahead(conn, "skipper", 0) != {}
        conn.rollback()
    assert row.records_floor >= newest
    # Another owner's commit is still refused outright, whatever the epoch.
    with engine.connect() as conn, pytest.raises(LostClaim):
        store.commit_batch(conn, "skipper", "thief", row.epoch, seqs[5], seqs[6], [record])


def test_after_a_reset_back_parked_events_stay_parked_and_are_not_delivered_again(
    engine: sa.Engine,
) -> None:
    broken = threading.Event()
    broken.set()

    def build_7(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 7 and broken.is_set():
            raise RuntimeError("build 7 is broken")

    recorder = Recorder(build_7)
    seqs = emit(engine, [tick(7, 0), tick(8, 0), tick(7, 1), tick(9, 0)])
    status = consumer("status", recorder, max_attempts=2)
    with daemon(engine, status):
        reach(engine, "status", seqs[-1])
        assert [p.seq for p in parked_of(engine, "status")] == [seqs[0], seqs[2]]
        calls = len(recorder.calls)
        with engine.begin() as conn:
            store.reset_offset(conn, "status", 0)
        until(lambda: len(recorder.calls) >= calls + 2, 10, "builds 8 and 9 delivered again")
        reach(engine, "status", seqs[-1])
        time.sleep(0.3)
    with recorder.lock:
        again = recorder.calls[calls:]
    assert sorted(again) == [seqs[1], seqs[3]], "a parked event was delivered by the re-read"
    assert [p.seq for p in parked_of(engine, "status")] == [seqs[0], seqs[2]]


def test_a_replay_delivers_a_range_again_without_moving_the_offset_or_parking(
    engine: sa.Engine,
) -> None:
    def fail_build_3(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 3:
            raise RuntimeError("receiver rejects build 3")

    seqs = emit(engine, [tick(b, b) for b in range(1, 7)])
    first = consumer("hook", Recorder(), batch_size=2)
    with daemon(engine, first):
        reach(engine, "hook", seqs[-1])
    offset = offset_of(engine, "hook")
    recorder = Recorder(fail_build_3)
    again = consumer("hook", recorder, batch_size=2, max_attempts=2)
    result = replay(engine, again, seqs[1], seqs[4])
    assert sorted(recorder.delivered) == [seqs[1], seqs[3], seqs[4]]
    assert recorder.attempts[seqs[2]] == 2
    assert (result.events, result.delivered, result.failed, result.attempts) == (4, 3, 1, 5)
    assert result.interrupted is False
    assert offset_of(engine, "hook") == offset
    assert parked_of(engine, "hook") == []
    replayed = [(r.seq, r.outcome) for r in records(engine, "hook") if r.kind == "replay"]
    expected = [(seqs[1], "delivered"), (seqs[2], "failed"), (seqs[2], "failed")]
    expected += [(seqs[3], "delivered"), (seqs[4], "delivered")]
    assert sorted(replayed) == sorted(expected)


def test_an_interrupted_replay_says_where_to_resume(engine: sa.Engine) -> None:
    seqs = emit(engine, [tick(b, b) for b in range(40)])
    stop = threading.Event()
    recorder = Recorder(sleep=0.01)

    def handler(entry: LogEntry) -> Any:
        if len(recorder.calls) >= 10:
            stop.set()
        return recorder(entry)

    result = replay(engine, consumer("slow", handler, batch_size=5), seqs[0], seqs[-1], stop=stop)
    assert result.interrupted is True
    assert result.resume_from is not None
    assert seqs[0] < result.resume_from <= seqs[-1]
    assert all(s < result.resume_from for s in recorder.delivered)
    with engine.connect() as conn:
        written = conn.execute(
            sa.select(sa.func.count()).where(deliveries.c.consumer == "slow")
        ).scalar_one()
        assert conn.execute(sa.select(sa.func.count()).select_from(parked)).scalar_one() == 0
    assert written == result.attempts == len(recorder.calls)


def test_operations_are_recorded_with_who_and_what(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        op = operations.record(conn, "reset", "status", {"from": 5, "to": 0})
    with engine.connect() as conn:
        (found,) = operations.history(conn, consumer="status")
    assert found.id == op
    assert (found.action, found.detail) == ("reset", {"from": 5, "to": 0})
    assert "@" in found.actor
    assert (found.db_user is not None) == (engine.dialect.name == "postgresql")
    assert head_of(engine) == 0
