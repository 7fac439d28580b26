"""R1–R3: the daemon killed, its connections terminated, the server restarted.

The real ``herald run`` (subprocesses) with a ``jsonl`` consumer, against a
stream of at_least_once events; after every fault the file and the delivery
records must hold every event (0 lost), duplicates only from the batch in
flight at each fault, and the daemon must recover by itself.

* R1: ``kill -9`` of ``herald run`` 20 times during a stream of at least
  50,000 events.
* R2: ``pg_terminate_backend`` of every herald connection every ~2 s; each
  time the consumer must move again within 5 s.
* R3: the PostgreSQL server restarted (``pg_ctlcluster ... restart``, or
  ``HERALD_TEST_PG_RESTART``, a command that restarts the test server) in
  the middle of the stream; the daemon reconnects by itself.

Each test prints its figures (``pytest -s``); BENCHMARKS.md's "Reliability"
section reports them.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from herald.errors import TransientDatabaseError
from herald.outbox import NewEvent, append_many
from tests.acceptance.conftest import Processes, processes, wait_until
from tests.acceptance.test_consumers_daemon import (
    WRITER_APP,
    Db,
    Stream,
    conninfo,
    consumers_json,
    db,
    parse_jsonl,
    read_lines,
    start_daemon,
    stop_daemon,
    wait_caught_up,
    write_config,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.postgresql, pytest.mark.slow]

__all__ = ["db", "processes"]  # fixtures, used by name

#: R1: kills, and the stream's size at least
KILLS = 20
STREAM_EVENTS = 50_000
#: R2: terminations, and the longest a recovery may take (seconds)
TERMINATIONS = 8
RECOVERY = 5.0


# -- R1: kill -9 during a stream ------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_stream_loses_nothing_and_repeats_only_the_batch_in_flight(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path
) -> None:
    kills, batch_size, minimum = KILLS, 200, STREAM_EVENTS
    out = tmp_path / "ticks.jsonl"
    config = write_config(
        tmp_path,
        f"""
[consumers.ticks]
type = "jsonl"
topics = ["acme.*"]
delivery = "at_least_once"
batch_size = {batch_size}
path = "{out}"
""",
    )
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    stream = Stream(pg_url, minimum=minimum, sizes=(1, 100), pause=0.03, seed=seed).start()
    boundaries: list[int] = []
    busy_kills = 0  # kills that hit a daemon with events still to deliver
    started = time.monotonic()
    try:
        for k in range(kills):
            daemon = start_daemon(processes, f"daemon-{k}", pg_url, config, ("ticks",))
            time.sleep(rng.uniform(0.05, 1.2))
            lag = db.head() - db.offset("ticks")
            daemon.proc.kill()  # SIGKILL: no cleanup of any kind
            assert daemon.wait(10) == -signal.SIGKILL, daemon.describe()
            assert "Traceback" not in daemon.stderr(), daemon.describe()
            boundaries.append(out.stat().st_size if out.exists() else 0)
            busy_kills += lag > 0
    finally:
        events = stream.finish()
    killing = time.monotonic() - started
    during = stream.written_at_stop
    assert events >= minimum
    assert boundaries[-1] > 0, "nothing was delivered between the kills"

    # A last, clean run catches up: `herald consumers` says lag 0, offset = head.
    final = start_daemon(processes, "daemon-final", pg_url, config, ("ticks",))

    def caught_up() -> bool:
        ticks = consumers_json(pg_url, config)["ticks"]
        return bool(ticks["lag"] == 0 and ticks["offset"] == ticks["head"] == events)

    wait_until(caught_up, 120, "the final run caught up", final.describe)
    stop_daemon(final)

    entries, cut = parse_jsonl(out, boundaries)
    seq_of = db.seq_of()
    assert len(seq_of) == events == db.head()
    seqs = Counter(int(e["seq"]) for e in entries)
    assert set(seqs) == set(range(1, events + 1)), (
        f"missing from the file: {sorted(set(range(1, events + 1)) - set(seqs))[:20]}"
    )
    assert {int(e["payload"]["n"]) for e in entries} == set(range(events))
    assert all(seq_of[int(e["payload"]["n"])] == int(e["seq"]) for e in entries)
    duplicates = len(entries) - len(seqs)
    assert cut <= kills
    assert duplicates <= kills * batch_size, (
        f"{duplicates} duplicates, more than {kills} kills × batch_size {batch_size}"
    )

    # The records: every seq delivered, each delivery recorded once with its offset.
    delivered = Counter(
        int(seq)
        for (seq,) in db.rows(
            "SELECT seq FROM herald_deliveries WHERE consumer = 'ticks' AND outcome = 'delivered'"
        )
    )
    assert set(delivered) == set(range(1, events + 1))
    assert max(delivered.values()) == 1, "a delivery was recorded twice"
    assert not db.rows("SELECT seq FROM herald_deliveries WHERE outcome <> 'delivered'")
    print(
        f"\nkill -9: {kills} kills ({busy_kills} with events pending) over {killing:.1f} s, "
        f"{events} events ({during} written while killing), "
        f"{duplicates} duplicates in the file (bound {kills * batch_size}), "
        f"{cut} lines cut short, seed {seed}"
    )


# -- R2: every herald connection terminated every ~2 s ------------------------------------


@pytest.mark.slow
def test_killed_connections_are_recovered_by_the_daemon_itself_without_losing_events(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "ticks.jsonl"
    config = write_config(
        tmp_path,
        f"""
[consumers.ticks]
type = "jsonl"
topics = ["acme.*"]
batch_size = 100
path = "{out}"
""",
    )
    daemon = start_daemon(processes, "daemon", pg_url, config, ("ticks",))
    stream = Stream(pg_url, sizes=(1, 10), pause=0.02).start()
    recoveries: list[float] = []
    terminated: list[int] = []
    try:
        wait_until(lambda: db.offset("ticks") > 0, 10, "the consumer delivered", daemon.describe)
        for _ in range(TERMINATIONS):
            time.sleep(2.0)
            killed = db.rows(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'herald' "
                "AND pid <> pg_backend_pid()"
            )
            when = time.monotonic()
            assert killed, "the daemon has no connection to kill"
            assert all(ok for _, ok in killed)
            terminated.append(len(killed))
            time.sleep(0.2)  # a commit the server was finishing lands now, or never
            offset = db.offset("ticks")

            def moved(offset: int = offset) -> bool:
                return db.offset("ticks") > offset

            wait_until(moved, RECOVERY, "the consumer's offset moved again", daemon.describe)
            recoveries.append(time.monotonic() - when)
            assert daemon.proc.poll() is None, f"the daemon died{daemon.describe()}"
    finally:
        events = stream.finish()

    wait_caught_up(db, ("ticks",), events, 30, daemon.describe)
    assert "reconnecting" in daemon.stderr(), f"the daemon never noticed{daemon.describe()}"
    crashes = daemon.stderr().count("stopped on an error")
    assert crashes == 0, f"a consumer crashed on a killed connection{daemon.describe()}"
    stop_daemon(daemon)

    entries = read_lines(out)
    seqs = Counter(int(e["seq"]) for e in entries)
    assert set(seqs) == set(range(1, events + 1)), (
        f"missing: {sorted(set(range(1, events + 1)) - set(seqs))[:20]}"
    )
    assert {int(e["payload"]["n"]) for e in entries} == set(range(events))
    delivered = {
        int(seq)
        for (seq,) in db.rows(
            "SELECT seq FROM herald_deliveries WHERE consumer = 'ticks' AND outcome = 'delivered'"
        )
    }
    assert delivered == set(range(1, events + 1))
    print(
        f"\npg_terminate_backend: {len(recoveries)} times ({terminated} connections), "
        f"recovery {', '.join(f'{r:.2f}' for r in recoveries)} s, {events} events, "
        f"{len(entries) - len(seqs)} duplicates, {crashes} consumer crashes"
    )
    assert max(recoveries) < RECOVERY, recoveries


# -- R3: the server restarted mid-stream -------------------------------------------------


def restart_command(db: Db) -> list[str]:
    """How to restart the test server: HERALD_TEST_PG_RESTART, else the local cluster
    that serves this database (pg_ctlcluster). A server herald cannot restart is a
    failure that says what to set, never a skip."""
    given = os.environ.get("HERALD_TEST_PG_RESTART", "").strip()
    if given:
        return shlex.split(given)
    data_directory = str(db.scalar("SHOW data_directory"))
    if shutil.which("pg_lsclusters") and shutil.which("pg_ctlcluster"):
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
        )
        for line in listing.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[5] == data_directory:
                return ["pg_ctlcluster", "--skip-systemctl-redirect", parts[0], parts[1],
                        "restart", "-m", "fast"]  # fmt: skip
    pytest.fail(
        f"cannot restart the PostgreSQL server of {data_directory}: set "
        "HERALD_TEST_PG_RESTART to a command that restarts the server the tests use",
        pytrace=False,
    )


@dataclass
class ResilientStream:
    """Appends ``acme.tick`` {"n": ...} with dedupe keys, reconnecting through a server
    restart: a transaction whose COMMIT was in doubt is sent again (a no-op if it had
    committed), so the log ends with every n exactly once."""

    database_url: str
    written: int = 0
    reconnects: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> ResilientStream:
        self.thread = threading.Thread(target=self._run, daemon=True, name="stream")
        self.thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(3)
        conn: psycopg.Connection[object] | None = None
        try:
            while not self.stop.is_set():
                size = rng.randint(1, 40)
                batch = [
                    NewEvent("acme.tick", {"n": n}, delivery="at_least_once", dedupe_key=f"t{n}")
                    for n in range(self.written, self.written + size)
                ]
                try:
                    if conn is None:
                        conn = psycopg.connect(
                            conninfo(self.database_url), application_name=WRITER_APP
                        )
                    append_many(conn, batch)
                    conn.commit()
                except (psycopg.OperationalError, TransientDatabaseError):
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.reconnects += 1
                    self.stop.wait(0.2)
                    continue
                self.written += size
                self.stop.wait(0.02)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def finish(self) -> int:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)
        assert not self.errors, self.errors
        return self.written


def test_a_server_restart_mid_stream_loses_nothing_and_the_daemon_resumes_by_itself(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path
) -> None:
    command = restart_command(db)
    out = tmp_path / "ticks.jsonl"
    config = write_config(
        tmp_path,
        f"""
[consumers.ticks]
type = "jsonl"
topics = ["acme.*"]
batch_size = 100
path = "{out}"
""",
    )
    daemon = start_daemon(processes, "daemon", pg_url, config, ("ticks",))
    stream = ResilientStream(pg_url).start()
    try:
        wait_until(lambda: db.offset("ticks") > 500, 30, "the consumer under way", daemon.describe)
        db.close()
        started = time.monotonic()
        restarted = subprocess.run(command, capture_output=True, text=True, check=False)
        assert restarted.returncode == 0, f"{command}: {restarted.stderr}"
        down = time.monotonic() - started
        time.sleep(2.0)
    finally:
        events = stream.finish()
    fresh = Db(pg_url)
    try:
        recovered = time.monotonic()
        wait_caught_up(fresh, ("ticks",), events, 60, daemon.describe)
        recovery = time.monotonic() - recovered
        assert daemon.proc.poll() is None, f"the daemon died{daemon.describe()}"
        assert "reconnecting" in daemon.stderr() or "retrying" in daemon.stderr(), (
            f"the daemon never noticed the restart{daemon.describe()}"
        )
        stop_daemon(daemon)
        seq_of = fresh.seq_of()
        assert sorted(seq_of) == list(range(events)), "the log lost or repeated an event"
        entries = read_lines(out)
        seqs = Counter(int(e["seq"]) for e in entries)
        assert set(seqs) == set(seq_of.values()), "the consumer lost an event"
        delivered = Counter(
            int(seq)
            for (seq,) in fresh.rows(
                "SELECT seq FROM herald_deliveries WHERE consumer = 'ticks' "
                "AND outcome = 'delivered'"
            )
        )
        assert set(delivered) == set(seq_of.values())
        assert max(delivered.values()) == 1, "a delivery was recorded twice"
    finally:
        fresh.close()
    print(
        f"\nserver restart: down {down:.2f} s, {events} events, writer reconnects "
        f"{stream.reconnects}, caught up {recovery:.2f} s after, "
        f"{len(entries) - len(seqs)} duplicates in the file"
    )
