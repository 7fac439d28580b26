"""The delivery rules of one batch, without a database: `herald.consumers.runner.deliver_batch`.

Retries with exponential backoff, parking, held events, the ephemeral single
attempt, expiry, timeouts and the per-build order under concurrency.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest

from herald.consumers import Consumer, Delivered, DeliveryFailed
from herald.consumers.model import build_key
from herald.consumers.runner import Runner, deliver_batch
from herald.consumers.store import Record
from herald.outbox import LogEntry

FAST: dict[str, Any] = {"retry_initial": 0.01, "retry_max": 0.05}

Handler = Callable[[LogEntry], Delivered | None]


def entry(
    seq: int,
    build: int | None = None,
    *,
    delivery: str = "at_least_once",
    age: float = 0.0,
    aggregate_id: str | None = None,
    topic: str = "acme.tick",
) -> LogEntry:
    recorded = datetime.now(UTC) - timedelta(seconds=age)
    payload: dict[str, Any] = {"n": seq}
    if build is not None:
        payload["build_id"] = build
    return LogEntry(
        seq=seq,
        position=1000 + seq,
        topic=topic,
        payload=payload,
        delivery=delivery,
        dedupe_key=None,
        aggregate_id=aggregate_id,
        aggregate_version=None,
        trace_id=None,
        occurred_at=recorded,
        recorded_at=recorded,
    )


def consumer(handler: Handler, **settings: Any) -> Consumer:
    return Consumer(name="rules", topics=["acme.*"], handler=handler, **settings)


@contextlib.contextmanager
def _watched_runners() -> Iterator[list[Runner]]:
    """Record deliver_batch's runner, so that a stalled batch can be stopped."""
    runners: list[Runner] = []
    original_start = Runner._start_workers

    def start_workers(self: Runner) -> None:
        runners.append(self)
        original_start(self)

    with mock.patch.object(Runner, "_start_workers", start_workers):
        yield runners


def deliver(
    c: Consumer, entries: Sequence[LogEntry], limit: float = 10.0
) -> dict[int, list[Record]]:
    """deliver_batch, failing the test (instead of hanging) if the batch never ends."""
    result: dict[int, list[Record]] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.update(deliver_batch(c, entries))
        except BaseException as exc:
            errors.append(exc)

    with _watched_runners() as runners:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            for runner in runners:
                runner.stop()  # unstick the batch so that no thread spins after the test
            thread.join(5)
            pytest.fail(f"deliver_batch did not finish within {limit} s (the batch stalled)")
    if errors:
        raise errors[0]
    return result


def summary(records: list[Record]) -> list[tuple[str, int]]:
    return [(r.outcome, r.attempt) for r in records]


class Calls:
    """A handler's calls: when, which seq, how many at once, per build."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.lock = threading.Lock()
        self.started: list[tuple[float, int]] = []
        self.ended: dict[int, list[float]] = defaultdict(list)
        self.count: Counter[int] = Counter()
        self.by_key: dict[str | None, list[int]] = defaultdict(list)
        self.in_flight: Counter[str] = Counter()
        self.overlaps: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0

    def enter(self, e: LogEntry) -> int:
        key = build_key(e)
        with self.lock:
            self.started.append((time.monotonic(), e.seq))
            self.count[e.seq] += 1
            self.by_key[key].append(e.seq)
            if key is not None:
                if self.in_flight[key]:
                    self.overlaps.append((key, e.seq))
                self.in_flight[key] += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            return self.count[e.seq]

    def leave(self, e: LogEntry) -> None:
        key = build_key(e)
        with self.lock:
            self.ended[e.seq].append(time.monotonic())
            if key is not None:
                self.in_flight[key] -= 1
            self.active -= 1

    def handler(self, behaviour: Callable[[LogEntry, int], None] | None = None) -> Handler:
        def handle(e: LogEntry) -> None:
            attempt = self.enter(e)
            try:
                if self.sleep:
                    time.sleep(self.sleep)
                if behaviour is not None:
                    behaviour(e, attempt)
            finally:
                self.leave(e)

        return handle


# -- at_least_once: retries, backoff, parking ----------------------------------------------


def test_a_failing_handler_is_retried_until_it_succeeds() -> None:
    calls = Calls()

    def flaky(e: LogEntry, attempt: int) -> None:
        if attempt <= 2:
            raise RuntimeError(f"attempt {attempt} failed")

    result = deliver(consumer(calls.handler(flaky), **FAST), [entry(1, 1)])
    records = result[1]
    assert summary(records) == [("failed", 1), ("failed", 2), ("delivered", 3)]
    assert [r.error for r in records] == [
        "RuntimeError: attempt 1 failed",
        "RuntimeError: attempt 2 failed",
        None,
    ]
    assert {r.kind for r in records} == {"live"}
    assert calls.count[1] == 3


def test_retries_back_off_exponentially() -> None:
    calls = Calls()

    def flaky(e: LogEntry, attempt: int) -> None:
        if attempt <= 3:
            raise RuntimeError("not yet")

    c = consumer(calls.handler(flaky), retry_initial=0.08, retry_max=10.0, max_attempts=5)
    result = deliver(c, [entry(1, 1)])
    assert summary(result[1]) == [("failed", 1), ("failed", 2), ("failed", 3), ("delivered", 4)]
    starts = [t for t, _ in calls.started]
    ends = calls.ended[1]
    gaps = [starts[i + 1] - ends[i] for i in range(3)]
    # 0.08, 0.16, 0.32 s: each wait at least the backoff, and growing.
    for gap, expected in zip(gaps, (0.08, 0.16, 0.32), strict=True):
        assert gap >= expected * 0.95, gaps
        assert gap < expected + 0.5, gaps


def test_backoff_is_capped_by_retry_max() -> None:
    calls = Calls()

    def always(e: LogEntry, attempt: int) -> None:
        raise RuntimeError("down")

    c = consumer(calls.handler(always), retry_initial=0.05, retry_max=0.06, max_attempts=6)
    result = deliver(c, [entry(1, 1)])
    assert [r.outcome for r in result[1]] == ["failed"] * 5 + ["parked"]
    starts = [t for t, _ in calls.started]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.045, gaps
    # Uncapped, the waits would be 0.05, 0.1, 0.2, 0.4 and 0.8 s: the last two
    # are past any capped wait plus a scheduling delay.
    assert max(gaps) < 0.35, gaps


def test_an_event_is_parked_after_max_attempts_with_the_last_error() -> None:
    calls = Calls()

    def always(e: LogEntry, attempt: int) -> None:
        if e.payload["build_id"] == 2:
            raise RuntimeError(f"refused, attempt {attempt}")

    c = consumer(calls.handler(always), max_attempts=3, **FAST)
    result = deliver(c, [entry(1, 1), entry(2, 2), entry(3, 3)])
    assert summary(result[2]) == [("failed", 1), ("failed", 2), ("parked", 3)]
    assert result[2][-1].error == "RuntimeError: refused, attempt 3"
    assert summary(result[1]) == [("delivered", 1)]
    assert summary(result[3]) == [("delivered", 1)]
    assert calls.count[2] == 3


def test_delivery_failed_without_retry_parks_at_once_with_its_details() -> None:
    calls = Calls()

    def gone(e: LogEntry, attempt: int) -> None:
        raise DeliveryFailed("410 Gone", retry=False, http_status=410, detail={"url": "x"})

    result = deliver(consumer(calls.handler(gone), max_attempts=5, **FAST), [entry(1, 1)])
    (record,) = result[1]
    assert (record.outcome, record.attempt) == ("parked", 1)
    assert record.error == "410 Gone"
    assert record.http_status == 410
    assert record.detail == {"url": "x"}
    assert calls.count[1] == 1


def test_delivery_failed_with_retry_is_retried() -> None:
    calls = Calls()

    def busy(e: LogEntry, attempt: int) -> None:
        if attempt == 1:
            raise DeliveryFailed("503", http_status=503)

    result = deliver(consumer(calls.handler(busy), **FAST), [entry(1, 1)])
    assert summary(result[1]) == [("failed", 1), ("delivered", 2)]
    assert result[1][0].http_status == 503


def test_delivered_details_are_recorded() -> None:
    def ok(e: LogEntry) -> Delivered:
        return Delivered(http_status=201, detail={"id": e.seq})

    result = deliver(consumer(ok), [entry(1, 1)])
    (record,) = result[1]
    assert (record.outcome, record.http_status, record.detail) == ("delivered", 201, {"id": 1})
    assert record.error is None
    assert record.duration_ms >= 0


def test_a_retry_wait_does_not_hold_up_other_builds() -> None:
    calls = Calls()

    def first_fails(e: LogEntry, attempt: int) -> None:
        if e.seq == 1 and attempt == 1:
            raise RuntimeError("once")

    c = consumer(calls.handler(first_fails), retry_initial=0.3, retry_max=0.3, concurrency=1)
    result = deliver(c, [entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 3)])
    order = [seq for _, seq in calls.started]
    # Build 1 waits for its retry; builds 2 and 3 go meanwhile; build 1's second
    # event comes after its first.
    assert order == [1, 3, 4, 1, 2]
    assert summary(result[1]) == [("failed", 1), ("delivered", 2)]
    assert all(summary(result[s]) == [("delivered", 1)] for s in (2, 3, 4))


# -- held events ------------------------------------------------------------------------


def test_later_events_of_a_parked_build_are_held() -> None:
    calls = Calls()

    def build_7_broken(e: LogEntry, attempt: int) -> None:
        if e.payload["build_id"] == 7:
            raise RuntimeError("broken")

    entries = [entry(1, 7), entry(2, 8), entry(3, 7), entry(4, 9), entry(5, 7)]
    c = consumer(calls.handler(build_7_broken), max_attempts=2, concurrency=3, **FAST)
    result = deliver(c, entries)
    assert summary(result[1]) == [("failed", 1), ("parked", 2)]
    for seq in (3, 5):
        (record,) = result[seq]
        assert (record.outcome, record.attempt) == ("parked", 0)
        assert record.error is not None
        assert "held" in record.error
        assert "seq 1" in record.error
        assert calls.count[seq] == 0
    assert summary(result[2]) == summary(result[4]) == [("delivered", 1)]


def test_events_without_a_build_are_never_held() -> None:
    calls = Calls()

    def broken(e: LogEntry, attempt: int) -> None:
        if e.seq == 1:
            raise DeliveryFailed("no", retry=False)

    result = deliver(consumer(calls.handler(broken)), [entry(1), entry(2), entry(3)])
    assert summary(result[1]) == [("parked", 1)]
    assert summary(result[2]) == summary(result[3]) == [("delivered", 1)]


def test_an_aggregate_key_holds_like_a_build() -> None:
    calls = Calls()

    def broken(e: LogEntry, attempt: int) -> None:
        if e.seq == 1:
            raise DeliveryFailed("no", retry=False)

    entries = [entry(1, aggregate_id="eval-1"), entry(2, aggregate_id="eval-2")]
    entries.append(entry(3, aggregate_id="eval-1"))
    result = deliver(consumer(calls.handler(broken)), entries)
    assert summary(result[3]) == [("parked", 0)]
    assert summary(result[2]) == [("delivered", 1)]


# -- ephemeral ---------------------------------------------------------------------------


def test_an_ephemeral_event_gets_one_attempt() -> None:
    calls = Calls()

    def always(e: LogEntry, attempt: int) -> None:
        raise RuntimeError("nobody listens")

    c = consumer(calls.handler(always), max_attempts=5, **FAST)
    result = deliver(c, [entry(1, 1, delivery="ephemeral"), entry(2, 1, delivery="ephemeral")])
    for seq in (1, 2):
        assert summary(result[seq]) == [("failed", 1)]
        assert result[seq][0].error == "RuntimeError: nobody listens"
        assert calls.count[seq] == 1


def test_a_failed_ephemeral_event_does_not_hold_its_build() -> None:
    calls = Calls()

    def first(e: LogEntry, attempt: int) -> None:
        if e.seq == 1:
            raise RuntimeError("missed")

    entries = [entry(1, 1, delivery="ephemeral"), entry(2, 1)]
    result = deliver(consumer(calls.handler(first)), entries)
    assert summary(result[1]) == [("failed", 1)]
    assert summary(result[2]) == [("delivered", 1)]


def test_a_stale_ephemeral_event_expires_without_a_call() -> None:
    calls = Calls()
    entries = [
        entry(1, 1, delivery="ephemeral", age=10),
        entry(2, 2, delivery="at_least_once", age=10),
        entry(3, 3, delivery="ephemeral", age=0),
    ]
    result = deliver(consumer(calls.handler(), staleness=5.0), entries)
    (expired,) = result[1]
    assert expired.outcome == "expired"
    assert expired.error is not None
    assert "staleness" in expired.error
    assert calls.count[1] == 0
    assert summary(result[2]) == [("delivered", 1)]
    assert summary(result[3]) == [("delivered", 1)]


def test_the_consumer_policy_overrides_the_event_rule() -> None:
    calls = Calls()
    old_at_least_once = entry(1, 1, delivery="at_least_once", age=10)
    old_ephemeral = entry(2, 2, delivery="ephemeral", age=10)
    as_ephemeral = consumer(calls.handler(), delivery="ephemeral", staleness=5.0)
    result = deliver(as_ephemeral, [old_at_least_once, old_ephemeral])
    assert [r.outcome for r in result[1]] == ["expired"]
    assert [r.outcome for r in result[2]] == ["expired"]

    def always(e: LogEntry, attempt: int) -> None:
        if attempt == 1:
            raise RuntimeError("first")

    forced = consumer(calls.handler(always), delivery="at_least_once", staleness=5.0, **FAST)
    result = deliver(forced, [entry(3, 3, delivery="ephemeral", age=10)])
    assert summary(result[3]) == [("failed", 1), ("delivered", 2)]


# -- timeouts ----------------------------------------------------------------------------


def test_an_ephemeral_call_past_its_timeout_is_one_failed_attempt() -> None:
    release = threading.Event()
    calls = Calls()

    def hang(e: LogEntry, attempt: int) -> None:
        if e.seq == 1:
            release.wait(10)

    entries = [entry(1, 1, delivery="ephemeral"), entry(2, 2), entry(3, 3)]
    c = consumer(calls.handler(hang), timeout=0.2, concurrency=2, **FAST)
    try:
        started = time.monotonic()
        result = deliver(c, entries)
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
    (record,) = result[1]
    assert (record.outcome, record.attempt) == ("failed", 1)
    assert record.error == "timed out after 0.2 s"
    assert record.duration_ms >= 190
    assert calls.count[1] == 1
    assert summary(result[2]) == summary(result[3]) == [("delivered", 1)]


def test_a_call_past_its_timeout_is_retried_by_a_fresh_worker() -> None:
    release = threading.Event()
    calls = Calls()

    def hang_once(e: LogEntry, attempt: int) -> None:
        if e.seq == 1 and attempt == 1:
            release.wait(1.0)

    c = consumer(calls.handler(hang_once), timeout=0.2, concurrency=1, **FAST)
    try:
        result = deliver(c, [entry(1, 1), entry(2, 2)], limit=2.0)
    finally:
        release.set()
    assert summary(result[1]) == [("failed", 1), ("delivered", 2)]
    assert result[1][0].error == "timed out after 0.2 s"
    assert summary(result[2]) == [("delivered", 1)]


def test_a_hung_build_is_parked_after_its_timeouts_while_other_builds_flow() -> None:
    release = threading.Event()
    calls = Calls()

    def hang(e: LogEntry, attempt: int) -> None:
        if e.payload["build_id"] == 1:
            release.wait(10)
        else:
            time.sleep(0.01)

    entries = [entry(1, 1), *(entry(seq, seq) for seq in range(2, 60))]
    c = consumer(calls.handler(hang), timeout=0.2, concurrency=2, max_attempts=3, **FAST)
    try:
        result = deliver(c, entries, limit=2.5)
    finally:
        release.set()
    assert summary(result[1]) == [("failed", 1), ("failed", 2), ("parked", 3)]
    assert all(r.error == "timed out after 0.2 s" for r in result[1])
    assert all(summary(result[s]) == [("delivered", 1)] for s in range(2, 60))


# -- order and concurrency -----------------------------------------------------------------


def test_one_build_at_a_time_in_seq_order_while_builds_overlap() -> None:
    calls = Calls(sleep=0.005)
    builds = range(1, 13)
    entries = []
    seq = 0
    for _round in range(5):
        for build in builds:
            seq += 1
            entries.append(entry(seq, build))
    result = deliver(consumer(calls.handler(), concurrency=8), entries)
    assert all(summary(result[e.seq]) == [("delivered", 1)] for e in entries)
    assert calls.overlaps == []
    for build in builds:
        expected = [e.seq for e in entries if e.payload["build_id"] == build]
        assert calls.by_key[f"build:{build}"] == expected
    assert calls.max_active > 1, "no two builds were ever delivered at once"
    assert calls.max_active <= 8


def test_events_without_a_key_go_in_parallel() -> None:
    calls = Calls(sleep=0.05)
    entries = [entry(seq) for seq in range(1, 9)]
    result = deliver(consumer(calls.handler(), concurrency=4), entries)
    # Four calls were in the handler at once (each sleeps 50 ms): they ran in parallel.
    assert calls.max_active == 4
    assert all(summary(result[s]) == [("delivered", 1)] for s in range(1, 9))


def test_concurrency_one_delivers_in_seq_order() -> None:
    calls = Calls()
    entries = [entry(seq, seq % 3) for seq in range(1, 31)]
    deliver(consumer(calls.handler(), concurrency=1), entries)
    assert [seq for _, seq in calls.started] == list(range(1, 31))
    assert calls.max_active == 1


# -- deliver_batch itself ------------------------------------------------------------------


def test_deliver_batch_returns_promptly() -> None:
    c = consumer(lambda e: None, concurrency=2)
    started = time.monotonic()
    result = deliver_batch(c, [entry(1, 1), entry(2, 2)])
    took = time.monotonic() - started
    assert summary(result[1]) == [("delivered", 1)]
    assert took < 0.5, f"deliver_batch took {took:.2f} s for two events"
