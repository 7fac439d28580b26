"""The sequencer on PostgreSQL: no event skipped, none twice, none rolled back."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.outbox import LogEntry, LogReader, Sequencer, append, read_page, run_sequencer
from herald.schema import SEQUENCER_LOCK_KEY
from tests.integration.helpers import read_all

pytestmark = pytest.mark.postgresql


@pytest.fixture
def big_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(pg_url, pool_size=14, max_overflow=0)
    yield engine
    engine.dispose()


class Rollback(Exception):
    """Raised inside a writer's transaction to roll it back on purpose."""


def test_concurrent_writers_with_a_long_transaction(big_engine: sa.Engine) -> None:
    """8 writers, random delays, ~5 % rollbacks, one transaction open for 4 s.

    The reader receives every committed event exactly once and no rolled-back
    one, each writer's events in its commit order, and the events committed
    while the long transaction is open before it commits.
    """
    writers, per_writer = 8, 150
    committed: dict[int, list[int]] = defaultdict(list)
    rolled_back: set[tuple[int, int]] = set()
    long_open = threading.Event()
    long_committed_at: list[float] = []
    received: list[tuple[float, LogEntry]] = []
    writers_done = threading.Event()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        long_open.wait(5)
        try:
            for i in range(per_writer):
                try:
                    with big_engine.begin() as conn:
                        append(conn, "acme.load", {"w": w, "i": i})
                        time.sleep(rng.uniform(0, 0.004))
                        if rng.random() < 0.05:
                            raise Rollback
                    committed[w].append(i)
                except Rollback:
                    rolled_back.add((w, i))
        except BaseException as exc:
            errors.append(exc)

    def long_writer() -> None:
        try:
            with big_engine.begin() as conn:
                for i in range(5):
                    append(conn, "acme.long", {"i": i})
                long_open.set()
                time.sleep(4)
            long_committed_at.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        log_reader = LogReader(big_engine)
        after = 0
        try:
            while True:
                page = log_reader.read(after, 500)
                now = time.monotonic()
                received.extend((now, entry) for entry in page.entries)
                after = page.next_after
                if writers_done.is_set() and long_committed_at and page.at_head:
                    # One more read after everything committed, then stop.
                    page = log_reader.read(after, 10_000)
                    received.extend((time.monotonic(), e) for e in page.entries)
                    if page.at_head:
                        return
                time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    long_thread = threading.Thread(target=long_writer)
    reader_thread = threading.Thread(target=reader)
    long_thread.start()
    reader_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writers_done.set()
    long_thread.join()
    reader_thread.join(60)
    assert not errors, errors
    assert not reader_thread.is_alive()

    entries = [entry for _, entry in received]
    load = [(e.payload["w"], e.payload["i"]) for e in entries if e.topic == "acme.load"]
    expected = {(w, i) for w, items in committed.items() for i in items}
    assert len(load) == len(set(load)), "an event was received twice"
    assert set(load) == expected, "an event was lost"
    assert not set(load) & rolled_back, "a rolled-back event was received"
    assert rolled_back, "the test rolled nothing back: it proves less than it says"
    for w in range(writers):
        order = [i for ww, i in load if ww == w]
        assert order == sorted(order), f"writer {w}'s events out of commit order"
    seqs = [e.seq for e in entries]
    assert seqs == list(range(1, len(entries) + 1)), "seq is not dense"

    # The long transaction did not hold anyone back.
    long_commit = long_committed_at[0]
    before_commit = [e for t, e in received if t < long_commit and e.topic == "acme.load"]
    assert len(before_commit) > len(load) // 2, (
        f"only {len(before_commit)} of {len(load)} events were readable before the long "
        "transaction committed"
    )
    long_events = [e for e in entries if e.topic == "acme.long"]
    assert [e.payload["i"] for e in long_events] == [0, 1, 2, 3, 4]
    assert long_events[0].seq > before_commit[-1].seq


def test_idle_cycles_write_nothing(pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1})
    sequencer = Sequencer()
    state = sa.text("SELECT xmin::text, xmax::text, snapshot, last_seq FROM herald_sequencer")
    with pg_engine.connect() as conn:
        assert sequencer.cycle(conn) == 1
        assert sequencer.cycle(conn) == 0
        before = conn.execute(state).one()
        conn.rollback()
        statements = 0

        def count(*_args: Any) -> None:
            nonlocal statements
            statements += 1

        sa.event.listen(pg_engine, "before_cursor_execute", count)
        try:
            cycles = 50
            assert all(sequencer.cycle(conn) == 0 for _ in range(cycles))
        finally:
            sa.event.remove(pg_engine, "before_cursor_execute", count)
        after = conn.execute(state).one()
        conn.rollback()
    assert after == before, "an idle cycle wrote to the sequencer's state"
    # One snapshot read a cycle while nothing happens; a probe (a read) when
    # some other database on the server committed meanwhile.
    assert statements <= 3 * cycles


def test_a_new_sequencer_continues_exactly(pg_engine: sa.Engine) -> None:
    def add(n: int, start: int) -> None:
        with pg_engine.begin() as conn:
            for i in range(start, start + n):
                append(conn, "build_started", {"build_id": i})

    add(3, 1)
    with pg_engine.connect() as conn:
        assert Sequencer().cycle(conn) == 3
    add(2, 4)
    # A cycle that dies half-way (its connection killed before commit) orders nothing.
    victim = pg_engine.connect()
    pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    victim.execute(sa.text("SELECT * FROM herald_sequencer FOR UPDATE"))
    victim.execute(sa.text("SELECT 1 FROM herald_events"))
    with pg_engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    victim.invalidate()
    with pg_engine.connect() as conn:
        assert Sequencer().cycle(conn) == 2
        assert Sequencer().cycle(conn) == 0
        page = read_page(conn, 0)
    assert [(e.seq, e.payload["build_id"]) for e in page.entries] == [(i, i) for i in range(1, 6)]


def test_one_active_sequencer_and_takeover(pg_engine: sa.Engine) -> None:
    stop_a, stop_b = threading.Event(), threading.Event()
    active_a, active_b = threading.Event(), threading.Event()
    a = threading.Thread(
        target=run_sequencer,
        args=(pg_engine, stop_a),
        kwargs={"on_active": active_a, "standby_interval": 0.1},
    )
    b = threading.Thread(
        target=run_sequencer,
        args=(pg_engine, stop_b),
        kwargs={"on_active": active_b, "standby_interval": 0.1},
    )
    a.start()
    try:
        assert active_a.wait(5)
        b.start()
        time.sleep(0.5)
        assert not active_b.is_set(), "two sequencers active at once"
        with pg_engine.begin() as conn:
            append(conn, "build_started", {"build_id": 1})
        # A reader defers to the active sequencer (it cannot take the lock),
        # and the daemon orders the event promptly.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not read_all(pg_engine):
            time.sleep(0.01)
        assert [e.payload for e in read_all(pg_engine)] == [{"build_id": 1}]
        stop_a.set()
        a.join(5)
        assert active_b.wait(5), "the standby did not take over"
        with pg_engine.begin() as conn:
            append(conn, "build_started", {"build_id": 2})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(read_all(pg_engine)) < 2:
            time.sleep(0.01)
        assert [e.payload["build_id"] for e in read_all(pg_engine)] == [1, 2]
    finally:
        stop_a.set()
        stop_b.set()
        a.join(5)
        if b.is_alive() or b.ident is not None:
            b.join(5)


def test_a_read_sees_what_committed_before_it_whoever_holds_the_lock(
    pg_engine: sa.Engine,
) -> None:
    """A daemon that holds the election lock but is stuck does not hide events
    from readers: a read orders what committed before it, lock or no lock."""
    conninfo = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SEQUENCER_LOCK_KEY,))
        with pg_engine.begin() as conn:
            append(conn, "build_started", {"build_id": 1})
        assert [e.seq for e in LogReader(pg_engine).read().entries] == [1]


def test_a_read_waits_for_a_cycle_in_flight(pg_engine: sa.Engine) -> None:
    """Another process mid-cycle (the state row locked) makes a read wait, not skip."""
    with pg_engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1})
    conninfo = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    result: list[list[int]] = []
    with psycopg.connect(conninfo) as other:
        other.execute("SELECT * FROM herald_sequencer FOR UPDATE")
        reader = threading.Thread(
            target=lambda: result.append([e.seq for e in LogReader(pg_engine).read().entries])
        )
        reader.start()
        time.sleep(0.5)
        assert not result, "the read did not wait for the cycle in flight"
        other.rollback()
        reader.join(5)
    assert result == [[1]]


def test_savepoints(pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1})
        savepoint = conn.begin_nested()
        append(conn, "build_started", {"build_id": 2})
        savepoint.rollback()
        with conn.begin_nested():
            append(conn, "build_started", {"build_id": 3})
    assert [e.payload["build_id"] for e in read_all(pg_engine)] == [1, 3]


def test_a_cycle_commits_without_waiting_for_the_disk_and_only_itself(
    pg_engine: sa.Engine,
) -> None:
    """The cycle's transaction commits asynchronously (see migration 0005); the
    setting ends with it, so a pooled connection's next transaction (a writer's,
    say) waits for its flush as usual."""
    with pg_engine.begin() as conn:
        append(conn, "acme.tick", {"n": 1})
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        conn.rollback()
        ordered, _ = conn.exec_driver_sql("SELECT * FROM herald_sequence_v1()").one()
        assert ordered == 1
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
        conn.commit()
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        conn.rollback()
        # A look that finds nothing writes nothing and changes nothing.
        assert conn.exec_driver_sql("SELECT * FROM herald_sequence_v1()").one()[0] == 0
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        conn.rollback()
