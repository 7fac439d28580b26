"""``herald run`` (the sequencer daemon) and ``herald log --follow``, run for real on PostgreSQL.

Events are written in-process (``herald.outbox.append``, one transaction
each) while the herald commands run as subprocesses; every check reads the
log order table directly.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.outbox import LogReader, append

from .conftest import (
    HeraldProcess,
    Processes,
    assert_ok,
    connect,
    describe,
    event_rows,
    herald,
    log_order_rows,
    poll,
    row_counts,
    wait_until,
)

pytestmark = pytest.mark.acceptance

ACTIVE = "sequencer active"


def append_events(database_url: str, payloads: list[dict[str, Any]]) -> list[int]:
    """Append ``acme.test`` events, one transaction each; returns their positions."""
    engine = create_engine(database_url)
    try:
        positions = []
        for payload in payloads:
            with engine.begin() as conn:
                positions.append(append(conn, "acme.test", payload))
        return positions
    finally:
        engine.dispose()


def advisory_locks(database_url: str) -> int:
    """Advisory locks held in the test's database (the sequencer's election)."""
    with connect(database_url) as conn:
        count = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).scalar_one()
    return int(count)


def assert_clean_exit(process: HeraldProcess, timeout: float = 5.0) -> None:
    """Exit status 0 within ``timeout`` s, no traceback."""
    assert process.wait(timeout) == 0, process.describe()
    assert "Traceback" not in process.stderr(), process.describe()


@pytest.mark.postgresql
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_sequences_events_and_stops_on_a_signal(
    pg_url: str, processes: Processes, sig: signal.Signals
) -> None:
    daemon = processes.start("daemon", pg_url, "run")
    daemon.wait_for_stderr(ACTIVE, timeout=10)

    # Nothing but the daemon sequences here: no `herald log` runs.
    positions = append_events(pg_url, [{"n": n} for n in range(5)])
    wait_until(lambda: len(log_order_rows(pg_url)) == 5, 5, "the daemon sequenced", daemon.describe)
    assert log_order_rows(pg_url) == list(enumerate(positions, 1))
    more = append_events(pg_url, [{"n": 5}])
    wait_until(lambda: len(log_order_rows(pg_url)) == 6, 5, "one more sequenced", daemon.describe)
    assert log_order_rows(pg_url)[-1] == (6, more[0])
    assert advisory_locks(pg_url) == 1, "the active sequencer holds the election lock"

    daemon.send(sig)
    assert_clean_exit(daemon)
    assert f"{sig.name} received" in daemon.stderr(), daemon.describe()
    assert advisory_locks(pg_url) == 0, "the lock outlived the daemon"


@dataclass
class Writers:
    """Threads appending events, one transaction each, some rolled back on purpose."""

    database_url: str
    count: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    #: per writer, the positions it committed, in commit order
    committed: dict[int, list[int]] = field(default_factory=dict)
    rolled_back: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = create_engine(self.database_url, pool_size=self.count)

    def start(self) -> None:
        for writer in range(self.count):
            self.committed[writer] = []
            thread = threading.Thread(target=self._write, args=(writer,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _write(self, writer: int) -> None:
        rng = random.Random(writer)
        n = 0
        try:
            while not self.stop.is_set():
                with self.engine.connect() as conn:
                    tx = conn.begin()
                    positions = []
                    for _ in range(rng.choice((1, 1, 1, 3))):
                        n += 1
                        payload = {"writer": writer, "n": n}
                        positions.append(append(conn, "acme.failover", payload))
                    if rng.random() < 0.03:
                        time.sleep(0.3)  # a long transaction: others commit around it
                    else:
                        time.sleep(rng.random() * 0.004)
                    if rng.random() < 0.1:
                        tx.rollback()
                        self.rolled_back.extend(positions)
                    else:
                        tx.commit()
                        self.committed[writer].extend(positions)
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        self.engine.dispose()

    def all_committed(self) -> set[int]:
        return {p for positions in self.committed.values() for p in positions}


@pytest.mark.postgresql
def test_sequencer_fails_over_to_a_standby_without_losing_or_repeating_events(
    pg_url: str, processes: Processes
) -> None:
    a = processes.start("daemon-a", pg_url, "run")
    a.wait_for_stderr(ACTIVE, timeout=10)
    b = processes.start("daemon-b", pg_url, "run")
    b.wait_for_stderr("electing the sequencer", timeout=10)

    writers = Writers(pg_url)
    writers.start()
    try:
        time.sleep(1.5)
        assert ACTIVE not in b.stderr(), f"B became active while A lives{b.describe()}"
        assert log_order_rows(pg_url), f"A sequenced nothing{a.describe()}"
        a.proc.kill()  # SIGKILL, mid-stream: no cleanup of any kind
        killed = time.monotonic()
        took_over = b.wait_for_stderr(ACTIVE, timeout=3)
        assert time.monotonic() - killed < 3.5, f"takeover took {took_over:.1f} s"
        time.sleep(1.0)
    finally:
        writers.finish()
    assert a.wait(5) == -signal.SIGKILL
    assert not writers.errors, writers.errors
    committed = writers.all_committed()
    assert len(committed) > 100, "the writers hardly wrote; the test proves little"
    assert writers.rolled_back, "no transaction was rolled back; the test proves little"

    # Wait for B to catch up (the assertions below say what is missing if it never does).
    poll(lambda: len(log_order_rows(pg_url)) >= len(committed), 10)
    time.sleep(0.2)  # anything sequenced twice would show up now
    rows = log_order_rows(pg_url)
    seqs = [seq for seq, _ in rows]
    positions = [position for _, position in rows]
    assert seqs == list(range(1, len(rows) + 1)), "seq is not dense from 1"
    assert len(set(positions)) == len(positions), "an event is in the log twice"
    assert set(positions) == committed, (
        f"missing from the log: {sorted(committed - set(positions))[:20]}; "
        f"in the log but not committed: {sorted(set(positions) - committed)[:20]}"
    )
    assert not set(writers.rolled_back) & set(positions), "a rolled-back event is in the log"
    assert {row.position for row in event_rows(pg_url)} == committed
    # One writer's transactions commit one after the other, so its events keep that order.
    seq_of = {position: seq for seq, position in rows}
    for writer, in_commit_order in writers.committed.items():
        order = [seq_of[p] for p in in_commit_order]
        assert order == sorted(order), f"writer {writer}'s events are out of commit order"

    b.send(signal.SIGTERM)
    assert_clean_exit(b)
    assert "Traceback" not in a.stderr(), a.describe()


@pytest.mark.postgresql
@pytest.mark.parametrize("with_daemon", [False, True], ids=["alone", "with-daemon"])
def test_log_follow_prints_new_events_and_stops_on_sigint(
    pg_url: str, processes: Processes, with_daemon: bool
) -> None:
    if with_daemon:
        daemon = processes.start("daemon", pg_url, "run")
        daemon.wait_for_stderr(ACTIVE, timeout=10)
    first = append_events(pg_url, [{"n": 1}])
    follow = processes.start("follow", pg_url, "log", "--follow", "--json")

    def printed() -> list[dict[str, Any]]:
        *complete, _partial = follow.stdout().split("\n")
        return [json.loads(line) for line in complete]

    wait_until(lambda: len(printed()) == 1, 10, "follow printed the first event", follow.describe)
    later = append_events(pg_url, [{"n": 2}, {"n": 3}])
    wait_until(lambda: len(printed()) == 3, 5, "follow printed the new events", follow.describe)
    entries = printed()
    assert [(e["seq"], e["position"], e["payload"]) for e in entries] == [
        (1, first[0], {"n": 1}),
        (2, later[0], {"n": 2}),
        (3, later[1], {"n": 3}),
    ]
    assert log_order_rows(pg_url) == [(1, first[0]), (2, later[0]), (3, later[1])]

    follow.send(signal.SIGINT)
    assert_clean_exit(follow)
    assert row_counts(pg_url) == (3, 3)
    assert len(printed()) == 3


@pytest.mark.postgresql
def test_log_shows_events_committed_before_it_started_while_another_reader_sequences(
    pg_url: str, tmp_path: Path
) -> None:
    """Without a daemon every read runs a sequencer cycle, "so events committed a moment
    ago are readable with or without `herald run`" (LogReader). Another reader's cycle
    may be in flight at that moment (here: its commit is slow); `herald log` must then
    still print the event that committed before it started, not a stale, shorter log."""
    (position,) = append_events(pg_url, [{"n": 1}])
    engine = create_engine(pg_url)
    committing = threading.Event()

    def slow_commit(_conn: sa.Connection) -> None:
        committing.set()
        time.sleep(2.5)

    sa.event.listen(engine, "commit", slow_commit)
    other_reader = threading.Thread(target=lambda: LogReader(engine).read(0))
    other_reader.start()
    try:
        assert committing.wait(5), "the other reader never reached its commit"
        result = herald(pg_url, "log", "--json", cwd=tmp_path)
    finally:
        other_reader.join(10)
        engine.dispose()
    assert_ok(result)
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert log_order_rows(pg_url) == [(1, position)]
    assert [(e["seq"], e["position"]) for e in printed] == [(1, position)], describe(result)
