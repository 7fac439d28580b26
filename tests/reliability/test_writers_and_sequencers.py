"""R4: 16 writers, random delays, 10 % rollbacks, one transaction open 30 s, two
sequencers fighting over the lock (and readers ordering for themselves).

Every committed event must be in the log exactly once, no rolled-back one,
each writer's events in its commit order, and the seqs dense and unique;
the events committed around the long transaction are ordered while it is
still open. Halfway, the active sequencer is stopped and the other takes over.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.outbox import LogReader, append, head, run_sequencer
from herald.schema import events, log_order

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

WRITERS = 16
LONG_OPEN = 30.0


class Rollback(Exception):
    """Raised inside a writer's transaction to roll it back on purpose."""


@pytest.fixture
def engines(pg_url: str) -> Iterator[list[sa.Engine]]:
    made = [create_engine(pg_url, pool_size=WRITERS + 4, max_overflow=0)]
    made += [create_engine(pg_url, pool_size=2, max_overflow=0) for _ in range(2)]
    yield made
    for engine in made:
        engine.dispose()


def test_every_committed_event_exactly_once_with_two_sequencers_and_a_long_transaction(
    engines: list[sa.Engine],
) -> None:
    writers_engine, *sequencer_engines = engines
    committed: dict[int, list[int]] = defaultdict(list)
    rolled_back: set[tuple[int, int]] = set()
    errors: list[BaseException] = []
    long_open = threading.Event()
    long_done = threading.Event()
    ordered_while_open: list[int] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        long_open.wait(10)
        i = 0
        try:
            while not long_done.is_set():
                try:
                    with writers_engine.begin() as conn:
                        for k in range(rng.randint(1, 3)):
                            append(conn, "acme.load", {"w": w, "i": i, "k": k})
                        time.sleep(rng.uniform(0, 0.02))
                        if rng.random() < 0.10:
                            raise Rollback
                    committed[w].append(i)
                except Rollback:
                    rolled_back.add((w, i))
                i += 1
        except BaseException as exc:
            errors.append(exc)

    def long_writer() -> None:
        try:
            with writers_engine.begin() as conn:
                append(conn, "acme.long", {"i": 0})
                long_open.set()
                time.sleep(LONG_OPEN / 2)
                with writers_engine.connect() as other:
                    ordered_while_open.append(head(other))
                time.sleep(LONG_OPEN / 2)
                append(conn, "acme.long", {"i": 1})
        except BaseException as exc:
            errors.append(exc)
        finally:
            long_done.set()

    def reader() -> None:
        # A reader orders for itself too (a third party in the fight for the state row).
        log_reader = LogReader(writers_engine)
        after = 0
        try:
            while not long_done.is_set():
                after = log_reader.read(after, 2000).next_after
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    stops = [threading.Event(), threading.Event()]
    sequencers = [
        threading.Thread(
            target=run_sequencer,
            args=(engine, stop),
            kwargs={"poll_interval": 0.01, "standby_interval": 0.05},
            daemon=True,
        )
        for engine, stop in zip(sequencer_engines, stops, strict=True)
    ]
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    threads += [threading.Thread(target=long_writer), threading.Thread(target=reader)]
    for thread in sequencers + threads:
        thread.start()
    time.sleep(LONG_OPEN * 0.6)
    stops[0].set()  # the first sequencer goes; whichever was active, the other goes on
    for thread in threads:
        thread.join(LONG_OPEN * 3)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # Everything committed is ordered by the sequencer still running.
    with writers_engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        conn.rollback()
    deadline = time.monotonic() + 30
    while True:
        with writers_engine.connect() as conn:
            ordered = conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar_one()
            conn.rollback()
        if ordered == total or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    stops[1].set()
    for thread in sequencers:
        thread.join(10)
    assert ordered == total, f"{total - ordered} committed events never got a seq"

    with writers_engine.connect() as conn:
        rows = conn.execute(
            sa.select(log_order.c.seq, events.c.topic, events.c.payload)
            .join_from(log_order, events, log_order.c.position == events.c.position)
            .order_by(log_order.c.seq)
        ).all()
    seqs = [r.seq for r in rows]
    assert seqs == list(range(1, len(rows) + 1)), "seq is not dense"
    load = [
        (r.payload["w"], r.payload["i"], r.payload["k"]) for r in rows if r.topic == "acme.load"
    ]
    assert len(load) == len(set(load)), "an event is in the log twice"
    got = {(w, i) for w, i, _ in load}
    expected = {(w, i) for w, items in committed.items() for i in items}
    assert got == expected, f"lost: {len(expected - got)}, invented: {len(got - expected)}"
    assert not got & rolled_back, "a rolled-back event is in the log"
    assert len(rolled_back) > 0.05 * (len(rolled_back) + len(expected))
    for w in range(WRITERS):
        order = [i for ww, i, _ in load if ww == w]
        assert order == sorted(order), f"writer {w}'s transactions out of commit order"
    long_seqs = [r.seq for r in rows if r.topic == "acme.long"]
    assert len(long_seqs) == 2
    assert long_seqs[1] == long_seqs[0] + 1
    # While the long transaction was open, the others were ordered (no stall).
    assert ordered_while_open, "the long transaction's check did not run"
    assert ordered_while_open[0] > 100, ordered_while_open
    assert ordered_while_open[0] < long_seqs[0]
    print(
        f"\nwriters: {WRITERS} writers, {len(expected)} transactions committed "
        f"({len(load)} events), {len(rolled_back)} rolled back, one open {LONG_OPEN:g} s "
        f"({ordered_while_open[0]} events ordered while it was open), seqs 1..{len(rows)} "
        "dense, 0 lost, 0 twice"
    )
