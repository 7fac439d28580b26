"""R5: poison events, a hung handler and a consumer that fails on everything.

One daemon runs four consumers over the same stream of 3,000 events of 100
builds, 1 % of them poison:

* ``healthy`` delivers everything: it must finish the stream, each event
  exactly once, whatever the others do;
* ``picky`` fails on poison events: each is parked with its error after its
  retries (or held, uncalled, behind an earlier parked event of its build),
  the build's later events are held behind it, every other event is
  delivered;
* ``hung`` hangs for good on one event: that call times out, the event is
  parked as timed out, everything else is delivered;
* ``broken`` raises on every event: every event is parked, and its offset
  still reaches the head.

Nothing is lost: every consumer has a final record (delivered or parked) for
every event, and the parked list holds exactly the events without a delivery.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from herald.consumers import Consumer, Daemon
from herald.outbox import LogEntry, NewEvent, append_many
from herald.schema import deliveries, parked
from tests.integration.helpers import read_all
from tests.integration.test_consumers import offset_of, reach

pytestmark = pytest.mark.slow

EVENTS = 3000
BUILDS = 100


def _stream(engine: sa.Engine) -> tuple[list[int], set[int]]:
    rng = random.Random(5)
    batch = [
        NewEvent("acme.tick", {"build_id": n % BUILDS, "n": n, "poison": rng.random() < 0.01})
        for n in range(EVENTS)
    ]
    with engine.begin() as conn:
        append_many(conn, batch)
    entries = read_all(engine)
    return [e.seq for e in entries], {e.seq for e in entries if e.payload["poison"]}


def _final(engine: sa.Engine, name: str) -> tuple[dict[int, str], dict[int, str | None]]:
    """Each seq's final outcome (delivered if any record says so, else parked if one
    does), and the parked list with its errors."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.seq, deliveries.c.outcome).where(deliveries.c.consumer == name)
        ).all()
        parked_rows = conn.execute(
            sa.select(parked.c.seq, parked.c.error).where(parked.c.consumer == name)
        ).all()
    outcomes: dict[int, set[str]] = {}
    for seq, outcome in rows:
        outcomes.setdefault(seq, set()).add(outcome)
    final = {
        seq: "delivered" if "delivered" in found else "parked"
        for seq, found in outcomes.items()
        if found & {"delivered", "parked"}
    }
    return final, {seq: error for seq, error in parked_rows}  # noqa: C416 - rows, not pairs


def test_poison_a_hung_handler_and_a_broken_consumer_leave_the_others_flowing(
    engine: sa.Engine,
) -> None:
    seqs, poison = _stream(engine)
    assert len(poison) >= 10
    release = threading.Event()
    calls: dict[str, Counter[int]] = {n: Counter() for n in ("healthy", "picky", "hung")}
    lock = threading.Lock()
    hang_at = seqs[EVENTS // 2]

    def counted(name: str, entry: LogEntry) -> None:
        with lock:
            calls[name][entry.seq] += 1

    def healthy(entry: LogEntry) -> None:
        counted("healthy", entry)

    def picky(entry: LogEntry) -> None:
        counted("picky", entry)
        if entry.payload["poison"]:
            raise ValueError(f"poison in event {entry.payload['n']}")

    def hung(entry: LogEntry) -> None:
        counted("hung", entry)
        if entry.seq == hang_at:
            release.wait()

    def broken(entry: LogEntry) -> None:
        raise RuntimeError("the receiver is down")

    fast: dict[str, Any] = {"retry_initial": 0.01, "retry_max": 0.02, "batch_size": 200}
    members = [
        Consumer(name="healthy", topics=["acme.*"], handler=healthy, concurrency=2, **fast),
        Consumer(name="picky", topics=["acme.*"], handler=picky, max_attempts=2, **fast),
        Consumer(name="hung", topics=["acme.*"], handler=hung, timeout=0.5, max_attempts=1, **fast),
        Consumer(name="broken", topics=["acme.*"], handler=broken, max_attempts=1, **fast),
    ]
    try:
        with Daemon(engine, members, poll_interval=0.05, claim_interval=0.1):
            reach(engine, "healthy", seqs[-1], timeout=120)
            for name in ("picky", "hung", "broken"):
                reach(engine, name, seqs[-1], timeout=120)
    finally:
        release.set()

    assert calls["healthy"] == Counter(dict.fromkeys(seqs, 1)), "healthy: lost or repeated"

    final, parked_list = _final(engine, "picky")
    assert set(final) == set(seqs), "picky: an event without a final record"
    own = {s for s in parked_list if "poison" in (parked_list[s] or "")}
    assert poison <= set(parked_list), "a poison event was not parked"
    assert own <= poison
    for seq in poison:
        # Parked with its own error after its retry budget, or held behind an
        # earlier parked event of its build (never delivered either way).
        if seq in own:
            assert calls["picky"][seq] == 2
        else:
            assert "held" in (parked_list[seq] or ""), parked_list[seq]
            assert calls["picky"][seq] == 0
    delivered = {s for s, outcome in final.items() if outcome == "delivered"}
    assert delivered | set(parked_list) == set(seqs)
    assert not delivered & set(parked_list)
    held = set(parked_list) - poison
    assert all("held" in (parked_list[s] or "") for s in held)

    final, parked_list = _final(engine, "hung")
    assert set(final) == set(seqs)
    assert "timed out" in (parked_list[hang_at] or "")
    later_same_build = {s for s in parked_list if s != hang_at}
    assert all("held" in (parked_list[s] or "") for s in later_same_build)
    assert {s for s, o in final.items() if o == "delivered"} == set(seqs) - set(parked_list)

    final, parked_list = _final(engine, "broken")
    assert set(parked_list) == set(seqs) == set(final)
    assert offset_of(engine, "broken") >= seqs[-1]
