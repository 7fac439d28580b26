"""The consumer daemon against real databases: delivery, order, parking, claims, recovery.

Every test runs an in-process :class:`herald.consumers.Daemon` (or one
:class:`~herald.consumers.runner.Runner`) with Python handlers, on SQLite and
on PostgreSQL unless marked PostgreSQL-only.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa

from herald.config import create_engine, database_url
from herald.consumers import (
    Consumer,
    Daemon,
    Delivered,
    DeliveryFailed,
    Subscriptions,
    store,
    wait_for,
)
from herald.consumers.model import build_key
from herald.consumers.runner import Runner
from herald.errors import LostClaim, NotParked, WaitTimeout
from herald.outbox import LogEntry, append
from herald.outbox.reader import head
from herald.schema import consumers, deliveries
from tests.integration.helpers import read_all

FAST: dict[str, Any] = {"retry_initial": 0.01, "retry_max": 0.05}

#: (topic, payload, delivery)
Event = tuple[str, dict[str, Any], str | None]


# -- helpers -------------------------------------------------------------------------------


def tick(build: int | None, n: int = 0, delivery: str | None = "at_least_once") -> Event:
    payload: dict[str, Any] = {"n": n}
    if build is not None:
        payload["build_id"] = build
    return ("acme.tick", payload, delivery)


def noise(n: int = 0) -> Event:
    return ("other.noise", {"n": n}, None)


def emit(engine: sa.Engine, events: Sequence[Event]) -> list[int]:
    """Append ``events`` in one transaction; their seqs (sequencing them on PostgreSQL)."""
    with engine.begin() as conn:
        positions = [append(conn, topic, payload, delivery=d) for topic, payload, d in events]
    seqs = {e.position: e.seq for e in read_all(engine)}
    return [seqs[p] for p in positions]


def daemon(engine: sa.Engine, *members: Consumer, **options: Any) -> Daemon:
    settings: dict[str, Any] = {"poll_interval": 0.05, "claim_interval": 0.1}
    settings.update(options)
    return Daemon(engine, members, **settings)


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def offset_of(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        row = store.consumer_row(conn, name)
        conn.rollback()
    return row.offset if row is not None else 0


def owner_of(engine: sa.Engine, name: str) -> str | None:
    with engine.connect() as conn:
        row = store.consumer_row(conn, name)
        conn.rollback()
    return row.owner if row is not None else None


def head_of(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        value = head(conn)
        conn.rollback()
    return value


def reach(engine: sa.Engine, name: str, seq: int, timeout: float = 5.0) -> None:
    until(lambda: offset_of(engine, name) >= seq, timeout, f"{name}'s offset reaching {seq}")


def records(engine: sa.Engine, name: str) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(deliveries).where(deliveries.c.consumer == name).order_by(deliveries.c.id)
        ).all()
        conn.rollback()
    return list(rows)


def records_of(engine: sa.Engine, name: str, seq: int) -> list[tuple[str, int, str]]:
    return [(r.outcome, r.attempt, r.kind) for r in records(engine, name) if r.seq == seq]


def parked_of(engine: sa.Engine, name: str) -> list[store.ParkedRow]:
    with engine.connect() as conn:
        rows = store.parked_rows(conn, name)
        conn.rollback()
    return rows


class Recorder:
    """A handler that records every call, per build, and any overlap of one build's calls."""

    def __init__(
        self,
        behaviour: Callable[[LogEntry, int], None] | None = None,
        sleep: float = 0.0,
    ) -> None:
        self.behaviour = behaviour
        self.sleep = sleep
        self.lock = threading.Lock()
        self.calls: list[int] = []
        self.delivered: list[int] = []
        self.attempts: Counter[int] = Counter()
        self.by_key: dict[str | None, list[int]] = defaultdict(list)
        self.in_flight: Counter[str] = Counter()
        self.overlaps: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0
        self.finished_at: dict[int, float] = {}

    def __call__(self, entry: LogEntry) -> Delivered | None:
        key = build_key(entry)
        with self.lock:
            self.calls.append(entry.seq)
            self.attempts[entry.seq] += 1
            attempt = self.attempts[entry.seq]
            self.by_key[key].append(entry.seq)
            if key is not None:
                if self.in_flight[key]:
                    self.overlaps.append((key, entry.seq))
                self.in_flight[key] += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.sleep:
                time.sleep(self.sleep)
            if self.behaviour is not None:
                self.behaviour(entry, attempt)
            with self.lock:
                self.delivered.append(entry.seq)
                self.finished_at[entry.seq] = time.monotonic()
            return None
        finally:
            with self.lock:
                if key is not None:
                    self.in_flight[key] -= 1
                self.active -= 1

    def delivered_of(self, build: int) -> list[int]:
        with self.lock:
            return [s for s in self.delivered if s in self.by_key.get(f"build:{build}", [])]


def consumer(
    name: str, handler: Callable[[LogEntry], Delivered | None], **settings: Any
) -> Consumer:
    merged: dict[str, Any] = dict(FAST)
    merged.update(settings)
    return Consumer(name=name, topics=merged.pop("topics", ["acme.*"]), handler=handler, **merged)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown: lets handlers that hang on it return."""
    event = threading.Event()
    yield event
    event.set()


# -- 1. delivery, order, offsets -------------------------------------------------------------


def test_every_matching_event_is_delivered_once_in_seq_order(engine: sa.Engine) -> None:
    seen: list[LogEntry] = []
    audit = consumer("audit", seen.append, topics=["acme.*", "build_finished"], batch_size=7)
    events: list[Event] = []
    for i in range(30):
        events.append(tick(i % 4, i))
        if i % 3 == 0:
            events.append(noise(i))
        if i % 10 == 0:
            events.append(("build_finished", {"build_id": 100 + i, "dependent_ids": []}, None))
    events += [noise(100), noise(101)]  # the log ends outside the topics
    seqs = emit(engine, events)
    matching = [s for s, e in zip(seqs, events, strict=True) if e[0] != "other.noise"]
    outside = [s for s, e in zip(seqs, events, strict=True) if e[0] == "other.noise"]

    with daemon(engine, audit) as d:
        assert d.ready.wait(5)
        reach(engine, "audit", seqs[-1])
        assert [e.seq for e in seen] == matching
        more = emit(engine, [noise(200), tick(1, 200), noise(201)])
        reach(engine, "audit", more[-1])

    assert [e.seq for e in seen] == [*matching, more[1]]
    assert offset_of(engine, "audit") == head_of(engine) == more[-1]
    rows = records(engine, "audit")
    assert [r.seq for r in rows] == [*matching, more[1]]
    assert {(r.outcome, r.attempt, r.kind) for r in rows} == {("delivered", 1, "live")}
    assert not {r.seq for r in rows} & {*outside, more[0], more[2]}
    assert seen[0].topic == "acme.tick"
    assert seen[0].payload == {"n": 0, "build_id": 0}


def _daemon_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "herald-daemon" and t.is_alive())


def test_subscriptions_run_as_documented_starts_one_daemon(engine: sa.Engine) -> None:
    """`with hub.run():` (run() starts it, and so does __enter__) runs one daemon thread."""
    hub = Subscriptions(engine, poll_interval=0.05, claim_interval=0.1)
    seen: list[int] = []

    @hub.subscribe("acme.*", batch_size=3)
    def github_status(entry: LogEntry) -> None:
        seen.append(entry.seq)

    seqs = emit(engine, [tick(i % 2, i) for i in range(12)])
    before = _daemon_threads()
    with hub.run() as d:
        assert d.ready.wait(5)
        assert _daemon_threads() - before == 1, "more than one daemon thread"
        reach(engine, "github_status", seqs[-1])
    assert d.running == []
    assert seen == seqs, "delivered twice or out of order"


def test_a_consumer_with_only_other_topics_moves_past_them(engine: sa.Engine) -> None:
    seqs = emit(engine, [noise(i) for i in range(5)])
    recorder = Recorder()
    with daemon(engine, consumer("quiet", recorder)) as d:
        assert d.ready.wait(5)
        reach(engine, "quiet", seqs[-1])
    assert recorder.calls == []
    assert records(engine, "quiet") == []
    assert offset_of(engine, "quiet") == seqs[-1]


# -- 2. restart ----------------------------------------------------------------------------


def test_a_restarted_daemon_continues_from_the_offset(engine: sa.Engine) -> None:
    recorder = Recorder(sleep=0.01)
    first = emit(engine, [tick(i % 3, i) for i in range(40)])
    d = daemon(engine, consumer("resume", recorder)).start()
    try:
        until(lambda: len(recorder.delivered) >= 10, 5, "ten deliveries")
    finally:
        d.stop()
    stopped_at = offset_of(engine, "resume")
    assert 10 <= stopped_at < first[-1], "stop the daemon midway"
    assert recorder.delivered == first[: len(recorder.delivered)]
    assert stopped_at == recorder.delivered[-1], "a clean stop commits what it delivered"
    assert owner_of(engine, "resume") is None, "a clean stop releases the claim"

    second = emit(engine, [tick(i % 3, 100 + i) for i in range(10)])
    with daemon(engine, consumer("resume", recorder)):
        reach(engine, "resume", second[-1])
    assert recorder.delivered == first + second
    assert Counter(r.seq for r in records(engine, "resume")) == Counter(first + second)


def test_a_clean_stop_during_a_retry_wait_delivers_nothing_twice(engine: sa.Engine) -> None:
    def first_attempt_fails(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 1 and attempt == 1:
            raise RuntimeError("not yet")

    recorder = Recorder(first_attempt_fails)
    seqs = emit(engine, [tick(1), tick(2), tick(3), tick(4)])
    slow_retry = {"retry_initial": 3.0, "retry_max": 3.0}
    d = daemon(engine, consumer("patient", recorder, **slow_retry)).start()
    try:
        until(lambda: sorted(recorder.delivered) == seqs[1:], 5, "the other builds delivered")
    finally:
        d.stop()
    with daemon(engine, consumer("patient", recorder)):
        reach(engine, "patient", seqs[-1])
    assert Counter(recorder.delivered) == Counter(seqs), "delivered twice after a clean stop"


def test_a_clean_stop_keeps_what_finished_beyond_the_offset(engine: sa.Engine) -> None:
    """Parked and held events after a retrying one survive a clean stop and a restart."""
    fixed = threading.Event()

    def rules(entry: LogEntry, attempt: int) -> None:
        build = entry.payload["build_id"]
        if fixed.is_set():
            return
        if build == 1 and attempt == 1:
            raise RuntimeError("not yet")
        if build == 2:
            raise DeliveryFailed("refused", retry=False)
        if build == 3 and attempt == 1:
            raise RuntimeError("flaky")

    recorder = Recorder(rules)
    seqs = emit(engine, [tick(1), tick(2, 0), tick(2, 1), tick(3), tick(4)])
    slow_retry = {"retry_initial": 3.0, "retry_max": 3.0, "max_attempts": 3}
    d = daemon(engine, consumer("keeper", recorder, **slow_retry)).start()
    try:
        until(lambda: seqs[4] in recorder.delivered, 5, "build 4 delivered")
        until(lambda: recorder.attempts[seqs[3]] == 1, 5, "build 3 tried once")
    finally:
        d.stop()
    assert offset_of(engine, "keeper") < seqs[0]
    fixed.set()
    with daemon(engine, consumer("keeper", recorder, **slow_retry)):
        reach(engine, "keeper", seqs[-1])
    assert Counter(recorder.delivered) == Counter([seqs[0], seqs[3], seqs[4]])
    assert recorder.attempts[seqs[1]] == 1, "a parked event was tried again"
    assert recorder.attempts[seqs[2]] == 0, "a held event was delivered"
    rows = parked_of(engine, "keeper")
    assert [(p.seq, p.held_by) for p in rows] == [(seqs[1], None), (seqs[2], seqs[1])]
    # Attempts go on counting across the stop.
    assert [(o, a) for o, a, _ in records_of(engine, "keeper", seqs[3])] == [
        ("failed", 1), ("delivered", 2),
    ]  # fmt: skip
    assert Counter(r.seq for r in records(engine, "keeper"))[seqs[4]] == 1


# -- 3. at_least_once: retries and parking -------------------------------------------------


def test_a_failing_handler_is_retried_until_delivered(engine: sa.Engine) -> None:
    def twice(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 1 and attempt <= 2:
            raise RuntimeError(f"flaky {attempt}")

    recorder = Recorder(twice)
    seqs = emit(engine, [tick(1), tick(2)])
    with daemon(engine, consumer("retry", recorder, max_attempts=5)):
        reach(engine, "retry", seqs[-1])
    rows = [r for r in records(engine, "retry") if r.seq == seqs[0]]
    assert [(r.outcome, r.attempt) for r in rows] == [
        ("failed", 1),
        ("failed", 2),
        ("delivered", 3),
    ]
    assert [r.error for r in rows] == ["RuntimeError: flaky 1", "RuntimeError: flaky 2", None]
    assert records_of(engine, "retry", seqs[1]) == [("delivered", 1, "live")]
    assert parked_of(engine, "retry") == []


def test_an_always_failing_event_is_parked_and_other_builds_flow(engine: sa.Engine) -> None:
    def build_2_down(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 2:
            raise RuntimeError(f"down {attempt}")

    recorder = Recorder(build_2_down)
    seqs = emit(engine, [tick(1), tick(2), tick(3), tick(4)])
    with daemon(engine, consumer("parker", recorder, max_attempts=3)):
        reach(engine, "parker", seqs[-1])
    rows = [r for r in records(engine, "parker") if r.seq == seqs[1]]
    assert [(r.outcome, r.attempt) for r in rows] == [("failed", 1), ("failed", 2), ("parked", 3)]
    assert rows[-1].error == "RuntimeError: down 3"
    assert recorder.attempts[seqs[1]] == 3
    (row,) = parked_of(engine, "parker")
    assert (row.seq, row.key, row.held_by, row.attempts) == (seqs[1], "build:2", None, 3)
    assert row.error == "RuntimeError: down 3"
    assert row.topic == "acme.tick"
    assert sorted(recorder.delivered) == [seqs[0], seqs[2], seqs[3]]


def test_delivery_failed_without_retry_parks_after_one_attempt(engine: sa.Engine) -> None:
    def refuse(entry: LogEntry, attempt: int) -> None:
        raise DeliveryFailed("422 Unprocessable", retry=False, http_status=422)

    recorder = Recorder(refuse)
    (seq,) = emit(engine, [tick(5)])
    with daemon(engine, consumer("refused", recorder, max_attempts=5)):
        reach(engine, "refused", seq)
    (row,) = records(engine, "refused")
    assert (row.outcome, row.attempt, row.http_status, row.error) == (
        "parked", 1, 422, "422 Unprocessable",
    )  # fmt: skip
    assert recorder.attempts[seq] == 1
    assert [p.seq for p in parked_of(engine, "refused")] == [seq]


# -- 4. order per build under concurrency ----------------------------------------------------


def test_one_build_at_a_time_in_order_while_builds_overlap(engine: sa.Engine) -> None:
    recorder = Recorder(sleep=0.004)
    builds = range(1, 13)
    events = [tick(build, n) for n in range(5) for build in builds]
    seqs = emit(engine, events)
    with daemon(engine, consumer("parallel", recorder, concurrency=8, batch_size=25)):
        reach(engine, "parallel", seqs[-1], timeout=10)
    assert recorder.overlaps == [], "two events of one build were delivered at once"
    for build in builds:
        expected = [s for s, e in zip(seqs, events, strict=True) if e[1]["build_id"] == build]
        assert recorder.by_key[f"build:{build}"] == expected
    assert sorted(recorder.delivered) == seqs
    assert recorder.max_active > 1, "different builds never overlapped"
    assert recorder.max_active <= 8


# -- 5. held events, redelivery, discarding ---------------------------------------------------


def test_a_parked_build_holds_its_later_events_until_redelivered(engine: sa.Engine) -> None:
    broken = threading.Event()
    broken.set()

    def build_7(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 7 and broken.is_set():
            raise RuntimeError("build 7 is broken")

    recorder = Recorder(build_7)
    events = [tick(7, 0), tick(8, 0), tick(7, 1), tick(9, 0), tick(7, 2)]
    seqs = emit(engine, events)
    head7, held = seqs[0], [seqs[2], seqs[4]]
    status = consumer("status", recorder, max_attempts=2, concurrency=2)
    with daemon(engine, status):
        reach(engine, "status", seqs[-1])
        assert records_of(engine, "status", head7) == [
            ("failed", 1, "live"), ("parked", 2, "live"),
        ]  # fmt: skip
        for seq in held:
            (row,) = [r for r in records(engine, "status") if r.seq == seq]
            assert (row.outcome, row.attempt) == ("parked", 0)
            assert "held" in row.error
            assert str(head7) in row.error
        assert recorder.attempts[head7] == 2
        assert all(recorder.attempts[s] == 0 for s in held), "a held event was delivered"
        assert sorted(recorder.delivered) == [seqs[1], seqs[3]]
        rows = parked_of(engine, "status")
        assert [(p.seq, p.held_by, p.attempts) for p in rows] == [
            (head7, None, 2), (held[0], head7, 0), (held[1], head7, 0),
        ]  # fmt: skip

        with pytest.raises(NotParked, match=rf"behind seq {head7}\b"), engine.begin() as conn:
            store.request_redelivery(conn, "status", held[0])
        with pytest.raises(NotParked), engine.begin() as conn:
            store.request_redelivery(conn, "status", seqs[1])  # delivered, never parked

        broken.clear()
        with engine.begin() as conn:
            assert store.request_redelivery(conn, "status", None) == [head7, *held]
        until(lambda: parked_of(engine, "status") == [], 5, "the parked events redelivered")
        assert recorder.delivered_of(7) == [head7, *held], "redelivered out of order"
        for seq in (head7, *held):
            assert records_of(engine, "status", seq)[-1][0::2] == ("delivered", "redelivery")

        (later,) = emit(engine, [tick(7, 3)])
        record = wait_for(engine, "status", later, timeout=5)
        assert record is not None
        assert (record.outcome, record.kind) == ("delivered", "live")
    assert recorder.delivered_of(7) == [head7, *held, later]
    assert recorder.overlaps == []


def test_redelivering_only_the_head_keeps_the_build_held(engine: sa.Engine) -> None:
    broken = threading.Event()
    broken.set()

    def build_7(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 7 and broken.is_set():
            raise DeliveryFailed("broken", retry=False)

    recorder = Recorder(build_7)
    first, second = emit(engine, [tick(7, 0), tick(7, 1)])
    with daemon(engine, consumer("partial", recorder)):
        reach(engine, "partial", second)
        assert [p.seq for p in parked_of(engine, "partial")] == [first, second]
        broken.clear()
        with engine.begin() as conn:
            assert store.request_redelivery(conn, "partial", first) == [first]
        until(
            lambda: [p.seq for p in parked_of(engine, "partial")] == [second],
            5,
            "the first event redelivered",
        )
        (third,) = emit(engine, [tick(7, 2)])
        reach(engine, "partial", third)
        # seq `second` is still parked: build 7's later event must wait behind it.
        assert third not in recorder.delivered, "delivered while an earlier event is parked"
        assert [p.seq for p in parked_of(engine, "partial")] == [second, third]


def test_a_redelivery_requested_while_stopped_is_done_at_the_next_start(
    engine: sa.Engine,
) -> None:
    broken = threading.Event()
    broken.set()

    def build_4(entry: LogEntry, attempt: int) -> None:
        if broken.is_set():
            raise DeliveryFailed("broken", retry=False)

    recorder = Recorder(build_4)
    first, second = emit(engine, [tick(4, 0), tick(4, 1)])
    with daemon(engine, consumer("offline", recorder)):
        reach(engine, "offline", second)
    assert [p.seq for p in parked_of(engine, "offline")] == [first, second]
    broken.clear()
    with engine.begin() as conn:
        assert store.request_redelivery(conn, "offline", None) == [first, second]
    with daemon(engine, consumer("offline", recorder)):
        until(lambda: parked_of(engine, "offline") == [], 3, "the requested redelivery")
    assert recorder.delivered == [first, second]


def test_a_redelivery_that_fails_again_parks_again(engine: sa.Engine) -> None:
    def always(entry: LogEntry, attempt: int) -> None:
        raise RuntimeError(f"down {attempt}")

    recorder = Recorder(always)
    first, second = emit(engine, [tick(5, 0), tick(5, 1)])
    with daemon(engine, consumer("stubborn", recorder, max_attempts=2)):
        reach(engine, "stubborn", second)
        with engine.begin() as conn:
            assert store.request_redelivery(conn, "stubborn", None) == [first, second]

        def redelivered() -> bool:
            rows = parked_of(engine, "stubborn")
            return len(rows) == 2 and not any(r.redeliver for r in rows)

        until(redelivered, 5, "the redelivery parked again")
    head_row, held_row = parked_of(engine, "stubborn")
    assert head_row.seq == first
    assert head_row.held_by is None
    assert head_row.error == f"RuntimeError: down {recorder.attempts[first]}"
    # A redelivery gets a fresh retry budget: two more attempts, numbered on.
    assert recorder.attempts[first] == 4, "a redelivery's attempts"
    assert (held_row.seq, held_row.held_by) == (second, first)
    assert recorder.attempts[second] == 0, "a held event was delivered behind a parked one"
    kinds = [(r.attempt, r.outcome, r.kind) for r in records(engine, "stubborn") if r.seq == first]
    assert kinds == [
        (1, "failed", "live"),
        (2, "parked", "live"),
        (3, "failed", "redelivery"),
        (4, "parked", "redelivery"),
    ]


def test_discarding_a_parked_event_records_the_reason(engine: sa.Engine) -> None:
    def build_3(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 3 and entry.payload["n"] == 0:
            raise DeliveryFailed("gone", retry=False)

    recorder = Recorder(build_3)
    first, second = emit(engine, [tick(3, 0), tick(3, 1)])
    with daemon(engine, consumer("discarder", recorder)):
        reach(engine, "discarder", second)
        with engine.begin() as conn:
            row = store.discard_parked(conn, "discarder", first, "the build was deleted")
        assert (row.seq, row.attempts) == (first, 1)
        with pytest.raises(NotParked), engine.begin() as conn:
            store.discard_parked(conn, "discarder", first, "again")
        discarded = [r for r in records(engine, "discarder") if r.outcome == "discarded"]
        assert [(r.seq, r.attempt, r.kind, r.error) for r in discarded] == [
            (first, 1, "operator", "the build was deleted"),
        ]
        assert [p.seq for p in parked_of(engine, "discarder")] == [second]
        # The held event no longer waits behind anything: it may be redelivered alone.
        with engine.begin() as conn:
            assert store.request_redelivery(conn, "discarder", second) == [second]
        until(lambda: parked_of(engine, "discarder") == [], 5, "the held event redelivered")
    assert recorder.delivered == [second]
    assert records_of(engine, "discarder", second)[-1] == ("delivered", 1, "redelivery")


# -- 6. ephemeral ----------------------------------------------------------------------------


def test_a_failed_ephemeral_event_is_one_attempt(engine: sa.Engine) -> None:
    def fail(entry: LogEntry, attempt: int) -> None:
        raise RuntimeError("nobody listens")

    recorder = Recorder(fail)
    seqs = emit(engine, [tick(1, 0, "ephemeral"), tick(1, 1, "ephemeral")])
    with daemon(engine, consumer("hints", recorder, max_attempts=5)):
        reach(engine, "hints", seqs[-1])
    for seq in seqs:
        assert records_of(engine, "hints", seq) == [("failed", 1, "live")]
        assert recorder.attempts[seq] == 1
    assert parked_of(engine, "hints") == []


def test_a_stale_ephemeral_event_expires(engine: sa.Engine) -> None:
    recorder = Recorder()
    old_ephemeral, old_durable = emit(engine, [tick(1, 0, "ephemeral"), tick(2, 0)])
    time.sleep(1.1)  # older than the staleness limit below
    with daemon(engine, consumer("fresh", recorder, staleness=1.0)) as d:
        assert d.ready.wait(5)
        reach(engine, "fresh", old_durable)
        (new_ephemeral,) = emit(engine, [tick(3, 0, "ephemeral")])
        reach(engine, "fresh", new_ephemeral)
    (expired,) = [r for r in records(engine, "fresh") if r.seq == old_ephemeral]
    assert expired.outcome == "expired"
    assert "staleness" in expired.error
    assert recorder.attempts[old_ephemeral] == 0
    assert records_of(engine, "fresh", old_durable) == [("delivered", 1, "live")]
    assert records_of(engine, "fresh", new_ephemeral) == [("delivered", 1, "live")]


# -- 7. timeouts ------------------------------------------------------------------------------


def test_a_hung_consumer_does_not_delay_another(
    engine: sa.Engine, release: threading.Event
) -> None:
    def hang(entry: LogEntry, attempt: int) -> None:
        release.wait(30)

    hung = Recorder(hang)
    quick = Recorder()
    members = [
        consumer("hung", hung, timeout=0.3, max_attempts=2),
        consumer("quick", quick),
    ]
    with daemon(engine, *members) as d:
        assert d.ready.wait(5)
        for n in range(5):
            appended = time.monotonic()
            (seq,) = emit(engine, [tick(n, n)])
            until(partial(operator.contains, quick.delivered, seq), 3, f"quick gets {seq}")
            assert quick.finished_at[seq] - appended < 1.0
            time.sleep(0.1)
        assert hung.delivered == []
        release.set()


def test_a_hung_build_times_out_is_parked_and_other_builds_flow(
    engine: sa.Engine, release: threading.Event
) -> None:
    def hang_build_1(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 1:
            release.wait(30)

    recorder = Recorder(hang_build_1)
    (stuck,) = emit(engine, [tick(1)])
    member = consumer("timeouts", recorder, timeout=0.3, max_attempts=3, concurrency=2)
    with daemon(engine, member) as d:
        assert d.ready.wait(5)
        others: list[int] = []
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:  # other builds keep coming while build 1 hangs
            (seq,) = emit(engine, [tick(100 + len(others))])
            others.append(seq)
            time.sleep(0.1)
        until(lambda: set(others) <= set(recorder.delivered), 2, "the other builds delivered")
        reach(engine, "timeouts", others[-1], timeout=2)
        rows = [r for r in records(engine, "timeouts") if r.seq == stuck]
        assert [(r.outcome, r.attempt) for r in rows] == [
            ("failed", 1), ("failed", 2), ("parked", 3),
        ]  # fmt: skip
        assert all(r.error == "timed out after 0.3 s" for r in rows)
        assert [p.seq for p in parked_of(engine, "timeouts")] == [stuck]
        release.set()


# -- 8. two daemons ----------------------------------------------------------------------------


def _shared_consumers(label: str, log: list[tuple[str, str, int]]) -> list[Consumer]:
    lock = threading.Lock()

    def handler_for(name: str) -> Callable[[LogEntry], None]:
        def handle(entry: LogEntry) -> None:
            with lock:
                log.append((label, name, entry.seq))

        return handle

    return [consumer(name, handler_for(name)) for name in ("c1", "c2", "c3", "c4")]


def test_two_daemons_share_the_consumers_and_take_over(engine: sa.Engine) -> None:
    log: list[tuple[str, str, int]] = []
    names = ["c1", "c2", "c3", "c4"]
    first = emit(engine, [tick(i % 5, i) for i in range(30)])
    a = daemon(engine, *_shared_consumers("a", log), lease=1.0)
    b = daemon(engine, *_shared_consumers("b", log), lease=1.0)
    a.start()
    b.start()
    try:
        assert a.ready.wait(5)
        assert b.ready.wait(5)
        for name in names:
            reach(engine, name, first[-1])
        assert set(a.running).isdisjoint(b.running)
        assert sorted([*a.running, *b.running]) == names
        for name in names:
            by_a = [s for who, n, s in log if n == name and who == "a"]
            by_b = [s for who, n, s in log if n == name and who == "b"]
            assert not set(by_a) & set(by_b), f"{name} was run by both daemons"
            assert sorted(by_a + by_b) == first

        a.stop()
        second = emit(engine, [tick(i % 5, 100 + i) for i in range(10)])
        until(lambda: b.running == names, 3, "b taking over a's consumers")
        for name in names:
            reach(engine, name, second[-1])
    finally:
        a.stop()
        b.stop()
    for name in names:
        got = Counter(s for _, n, s in log if n == name)
        assert got == Counter(first + second), f"{name}: lost or duplicated events"


def test_an_expired_lease_is_taken_over(engine: sa.Engine) -> None:
    """A daemon that died without releasing (SQLite: its lease runs out; PostgreSQL: no lock)."""
    (seq,) = emit(engine, [tick(1)])
    with engine.begin() as conn:
        store.set_owner(conn, "orphan", "dead-host:1:0", -1.0)  # a lease that has run out
    recorder = Recorder()
    with daemon(engine, consumer("orphan", recorder)) as d:
        assert d.ready.wait(5)
        reach(engine, "orphan", seq)
        assert d.running == ["orphan"]
        assert owner_of(engine, "orphan") == d.token
    assert recorder.delivered == [seq]


@pytest.mark.sqlite
def test_a_live_lease_is_respected(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        (seq,) = emit(engine, [tick(1)])
        with engine.begin() as conn:
            store.set_owner(conn, "leased", "other-host:1:0", 60.0)
        recorder = Recorder()
        with daemon(engine, consumer("leased", recorder)) as d:
            assert d.ready.wait(5)
            time.sleep(0.3)
            assert d.running == []
        assert recorder.calls == []
        assert offset_of(engine, "leased") == 0 < seq
    finally:
        engine.dispose()


# -- 9. wait_for -------------------------------------------------------------------------------


def test_wait_for_returns_the_last_record(engine: sa.Engine) -> None:
    def build_2(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 2:
            raise DeliveryFailed("no", retry=False)

    ok, bad, outside = emit(engine, [tick(1), tick(2), noise()])
    with daemon(engine, consumer("waiter", Recorder(build_2))):
        delivered = wait_for(engine, "waiter", ok, timeout=5)
        assert delivered is not None
        assert (delivered.seq, delivered.outcome, delivered.attempt) == (ok, "delivered", 1)
        parked_record = wait_for(engine, "waiter", bad, timeout=5)
        assert parked_record is not None
        assert (parked_record.outcome, parked_record.error) == ("parked", "no")
        assert wait_for(engine, "waiter", outside, timeout=5) is None
    (later,) = emit(engine, [tick(3)])
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as raised:
        wait_for(engine, "waiter", later, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert (raised.value.seq, raised.value.offset) == (later, outside)


# -- 10. the fence -----------------------------------------------------------------------------


def test_a_runner_whose_claim_was_taken_commits_nothing(engine: sa.Engine) -> None:
    entered = threading.Event()
    go = threading.Event()
    seqs = emit(engine, [tick(i) for i in range(6)])

    def block_at_third(entry: LogEntry, attempt: int) -> None:
        if entry.seq == seqs[2]:
            entered.set()
            go.wait(10)

    recorder = Recorder(block_at_third)
    token = "fenced-host:1:abc"
    with engine.begin() as conn:
        store.set_owner(conn, "fenced", token, 60.0)
    runner = Runner(
        consumer("fenced", recorder),
        engine,
        token,
        wake=threading.Event(),
        poll_interval=0.05,
        commit_interval=0.05,
    )
    runner.start()
    try:
        assert entered.wait(5)
        reach(engine, "fenced", seqs[1])  # the prefix before the blocked call is committed
        with engine.begin() as conn:
            conn.execute(
                consumers.update().where(consumers.c.name == "fenced").values(owner="someone-else")
            )
        before = offset_of(engine, "fenced")
    finally:
        go.set()
        runner.join(5)
    assert not runner.is_alive()
    assert isinstance(runner.error, LostClaim)
    assert seqs[2] in recorder.delivered  # it delivered, but could not commit
    more = emit(engine, [tick(9)])
    time.sleep(0.2)
    assert offset_of(engine, "fenced") == before == seqs[1]
    assert owner_of(engine, "fenced") == "someone-else"
    assert {r.seq for r in records(engine, "fenced")} == set(seqs[:2])
    assert more[0] not in recorder.calls


def _stop_with_notify(engine: sa.Engine, d: Daemon) -> None:
    """Stop ``d``, sending NOTIFYs until it has (its session waits a whole poll otherwise)."""
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    while stopper.is_alive():
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_notify('herald_log', '')"))
        stopper.join(0.05)


@pytest.mark.postgresql
def test_a_notify_wakes_the_consumers_between_polls(pg_engine: sa.Engine) -> None:
    recorder = Recorder()
    d = daemon(pg_engine, consumer("woken", recorder), poll_interval=30.0, claim_interval=30.0)
    d.start()
    try:
        assert d.ready.wait(5)
        time.sleep(0.2)  # the runner now waits for a wake-up
        for n in range(3):
            appended = time.monotonic()
            (seq,) = emit(pg_engine, [tick(n, n)])
            until(partial(operator.contains, recorder.delivered, seq), 2, f"seq {seq} delivered")
            assert recorder.finished_at[seq] - appended < 1.0
    finally:
        _stop_with_notify(pg_engine, d)


@pytest.mark.postgresql
def test_stop_is_prompt_whatever_the_poll_interval(pg_engine: sa.Engine) -> None:
    recorder = Recorder()
    d = daemon(pg_engine, consumer("stoppable", recorder), poll_interval=3.0, claim_interval=3.0)
    d.start()
    try:
        assert d.ready.wait(5)
        time.sleep(0.2)
        started = time.monotonic()
    finally:
        d.stop()
    assert time.monotonic() - started < 1.0, "stop() waited for the poll interval"


# -- 11. PostgreSQL: killed connections ---------------------------------------------------------


def _observer(pg_url: str) -> sa.Engine:
    """An engine whose connections are never pooled: killing idle ones cannot hit it."""
    return sa.create_engine(database_url(pg_url), poolclass=sa.pool.NullPool)


def _terminate(conn: sa.Connection, where: str = "TRUE") -> int:
    with conn.begin():
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND " + where
            )
        ).scalar_one()
    return int(killed)


@pytest.mark.postgresql
def test_the_daemon_recovers_from_killed_connections(pg_engine: sa.Engine, pg_url: str) -> None:
    observer = _observer(pg_url)
    recorder = Recorder(sleep=0.001)
    total = 0
    try:
        with observer.connect() as mine:
            with daemon(pg_engine, consumer("survivor", recorder, concurrency=4)) as d:
                assert d.ready.wait(5)
                kills = 0
                for burst in range(5):
                    for _ in range(4):
                        with mine.begin():
                            for i in range(10):
                                append(mine, "acme.tick", {"build_id": i, "n": burst})
                        total += 10
                        time.sleep(0.02)
                    kills += _terminate(mine)
                    time.sleep(0.15)
                assert kills >= 5
                reach(observer, "survivor", total, timeout=20)
            assert head_of(observer) == total
            delivered = {r.seq for r in records(observer, "survivor") if r.outcome == "delivered"}
            assert delivered == set(range(1, total + 1)), "events lost"
            assert set(recorder.delivered) == set(range(1, total + 1))
    finally:
        observer.dispose()


@pytest.mark.postgresql
def test_a_failed_commit_never_runs_one_build_twice_at_once(
    pg_engine: sa.Engine, pg_url: str
) -> None:
    slow_started = threading.Event()

    def slow_first(entry: LogEntry, attempt: int) -> None:
        if entry.payload["build_id"] == 1 and attempt == 1:
            slow_started.set()
            time.sleep(1.5)

    recorder = Recorder(slow_first)
    observer = _observer(pg_url)
    try:
        with daemon(pg_engine, consumer("careful", recorder, concurrency=2)) as d:
            assert d.ready.wait(5)
            seqs = emit(observer, [tick(2), tick(1, 0), tick(1, 1), tick(3)])
            assert slow_started.wait(5)
            with observer.connect() as mine:
                # The pool's idle connections, not the daemon's session or the sequencer's.
                killed = _terminate(
                    mine,
                    "pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid IS NOT NULL)",
                )
            assert killed >= 1
            reach(observer, "careful", seqs[-1], timeout=10)
    finally:
        observer.dispose()
    assert recorder.overlaps == [], "one build's events were delivered concurrently"
    assert recorder.by_key["build:1"] == sorted(recorder.by_key["build:1"])
