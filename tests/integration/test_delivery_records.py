"""Delivery records as a commit writes them, read back from a real database.

A consumer's commit moves its offset and writes the page's records in one
transaction (on PostgreSQL the records through COPY). A record reads back as
it was written, in the order the attempts were made; a commit that lost its
claim writes none of them; and whatever a handler's error or detail holds
(NUL characters, NaN, datetimes), its record is written and the consumer
goes on.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa

from herald.consumers import Delivered, DeliveryFailed, store
from herald.errors import LostClaim
from herald.outbox import LogEntry
from herald.schema import deliveries
from tests.integration.helpers import claimed
from tests.integration.test_consumers import (
    consumer,
    daemon,
    emit,
    offset_of,
    parked_of,
    reach,
    records,
    tick,
)


def test_records_read_back_as_written_in_attempt_order(engine: sa.Engine) -> None:
    seqs = emit(engine, [tick(1, n) for n in range(3)])
    epoch = claimed(engine, "auditor")
    started = datetime(2026, 12, 5, 7, 30, 0, 123456, tzinfo=UTC)
    written = [
        store.Record(seqs[0], 1, "failed", started, 12.5, 'HTTP 502: "bad gateway" \\ retry',
                     502, {"url": "https://ci.example/x?a=1&b=2", "body": "ünïcödé ✓\nline 2"}),
        store.Record(seqs[0], 2, "delivered", started + timedelta(seconds=1), 0.25, None, 201,
                     {"nested": {"list": [1, 2.5, None, True], "empty": {}}}),
        store.Record(seqs[1], 1, "parked", started + timedelta(seconds=2), 30000.0,
                     "x" * 4000, None, None),
        store.Record(seqs[2], 1, "expired", started + timedelta(seconds=3), 0.0,
                     "not delivered: 3601 s old", None, {}, "live"),
    ]  # fmt: skip
    with engine.connect() as conn:
        assert store.commit_batch(conn, "auditor", "me", epoch, 0, seqs[2], written)
    assert offset_of(engine, "auditor") == seqs[2]
    rows = records(engine, "auditor")  # in id order: the order written
    read = [
        (r.seq, r.attempt, r.outcome, r.kind, r.duration_ms, r.error, r.http_status, r.detail)
        for r in rows
    ]
    assert read == [
        (w.seq, w.attempt, w.outcome, w.kind, w.duration_ms, w.error, w.http_status, w.detail)
        for w in written
    ]
    times = [r.started_at for r in rows]
    aware = [t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in times]
    assert aware == [w.started_at for w in written]


def test_a_commit_that_lost_its_claim_writes_no_record_and_moves_nothing(
    engine: sa.Engine,
) -> None:
    seqs = emit(engine, [tick(2, n) for n in range(2)])
    epoch = claimed(engine, "fenced")
    record = store.Record(seqs[0], 1, "delivered", store.now(), 1.0)
    with engine.connect() as conn, pytest.raises(LostClaim):
        store.commit_batch(conn, "fenced", "thief", epoch, 0, seqs[1], [record, record])
    assert records(engine, "fenced") == []
    assert offset_of(engine, "fenced") == 0
    # The rightful owner's commit goes through afterwards, on the same tables.
    with engine.connect() as conn:
        assert store.commit_batch(conn, "fenced", "me", epoch, 0, seqs[1], [record])
    assert [r.seq for r in records(engine, "fenced")] == [seqs[0]]


def test_a_commit_of_thousands_of_records_keeps_their_order(engine: sa.Engine) -> None:
    seqs = emit(engine, [tick(3, 0)])
    epoch = claimed(engine, "bulk")
    at = store.now()
    many = [store.Record(seqs[0], n, "failed", at, 1.0, f"attempt {n}") for n in range(1, 5001)]
    with engine.connect() as conn:
        assert store.commit_batch(conn, "bulk", "me", epoch, 0, seqs[0], many)
    with engine.connect() as conn:
        attempts = (
            conn.execute(
                sa.select(deliveries.c.attempt)
                .where(deliveries.c.consumer == "bulk")
                .order_by(deliveries.c.id)
            )
            .scalars()
            .all()
        )
    assert attempts == list(range(1, 5001))


WHEN = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def odd_handler(entry: LogEntry) -> Delivered | None:
    """Errors and details no database column takes as they are (NUL, NaN, datetimes)."""
    build = entry.payload["build_id"]
    if build == 1:
        raise RuntimeError("bad\x00byte")
    if build == 2:
        detail: dict[Any, Any] = {"at": WHEN, "id": ID, "nul": "a\x00b", 3: "an int key"}
        return Delivered(200, detail)
    if build == 3:
        return Delivered(200, {"ratio": math.nan})
    if build == 4:
        raise DeliveryFailed("gone\x00", retry=False, http_status=410, detail={"k\x00": ["\x00"]})
    if build == 6:
        return Delivered(200, MappingProxyType({"exit_code": 0}))  # a Mapping, not a dict
    return None


def test_what_a_handler_says_is_recorded_whatever_it_holds_and_the_consumer_goes_on(
    engine: sa.Engine,
) -> None:
    seqs = emit(engine, [tick(b) for b in (1, 2, 3, 4, 5, 6)])
    odd = consumer("odd", odd_handler, max_attempts=1)
    with daemon(engine, odd):
        reach(engine, "odd", seqs[-1], timeout=10)
    got = {r.seq: r for r in records(engine, "odd")}
    assert sorted(got) == seqs, "an event's record is missing"
    assert (got[seqs[0]].outcome, got[seqs[0]].error) == ("parked", "RuntimeError: bad\ufffdbyte")
    assert got[seqs[1]].outcome == "delivered"
    assert got[seqs[1]].detail == {
        "at": "2026-12-05 08:00:00+00:00",
        "id": "12345678-1234-5678-1234-567812345678",
        "nul": "a\ufffdb",
        "3": "an int key",
    }
    assert got[seqs[2]].outcome == "delivered"
    assert got[seqs[2]].detail["unstorable"].startswith("ValueError: Out of range float")
    assert "nan" in got[seqs[2]].detail["repr"]
    assert (got[seqs[3]].outcome, got[seqs[3]].error, got[seqs[3]].http_status) == (
        "parked",
        "gone\ufffd",
        410,
    )
    assert got[seqs[3]].detail == {"k\ufffd": ["\ufffd"]}
    assert got[seqs[4]].outcome == "delivered"
    assert (got[seqs[5]].outcome, got[seqs[5]].detail) == ("delivered", {"exit_code": 0})
    assert [(p.seq, p.error) for p in parked_of(engine, "odd")] == [
        (seqs[0], "RuntimeError: bad\ufffdbyte"),
        (seqs[3], "gone\ufffd"),
    ]
