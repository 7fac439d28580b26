"""``herald run`` with consumers, for real: the daemon in a subprocess on PostgreSQL.

Consumers come from a ``herald.toml`` written into the test's directory;
Python handlers from a module written next to it (on the daemon's
PYTHONPATH), which reads control files there (``fixed``) so that a test can
mend a handler while the daemon runs. Events are written from the test
process (``herald.outbox.append_many`` on a psycopg connection, or the
``herald append`` command); the daemon is what is under test, and every
check reads what the handlers wrote and what the daemon left in the
database.

The test process talks to the database with ``application_name =
herald-test`` (and its writers with ``herald-test-writer``), so that
killing every connection named ``herald`` kills the daemon's and only its.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from herald.outbox import NewEvent, append_many

from .conftest import (
    Call,
    HeraldProcess,
    Processes,
    assert_ok,
    assert_one_line_error,
    describe,
    herald,
    herald_many,
    wait_until,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.postgresql]

TEST_APP = "herald-test"
WRITER_APP = "herald-test-writer"
HANDLER_MODULE = "herald_test_handlers"

#: The handlers the tests configure (``type = "python"``). Each appends one JSON
#: line per call to a file next to this module (the test's directory).
HANDLERS = '''
import json
import pathlib
import threading
import time

DIR = pathlib.Path(__file__).resolve().parent
_lock = threading.Lock()


def _write(name, record):
    line = json.dumps(record, sort_keys=True) + "\\n"
    with _lock, open(DIR / name, "a", encoding="utf-8") as out:
        out.write(line)


def flaky(entry):
    """Fails for n % 50 == 7 until the file `fixed` exists."""
    n = entry.payload["n"]
    if n % 50 == 7 and not (DIR / "fixed").exists():
        raise RuntimeError(f"boom for n={n}")
    _write("flaky.jsonl", {"seq": entry.seq, "n": n})


def hang(entry):
    """Hangs (an hour) for events with "hang": true."""
    if entry.payload.get("hang"):
        _write("hang-started.jsonl", {"seq": entry.seq, "at": time.time()})
        time.sleep(3600)
    _write("stuck.jsonl", {"seq": entry.seq, "n": entry.payload["n"]})


def fast(entry):
    """Records when it got each event (the payload's t is when it was appended)."""
    _write("fast.jsonl", {"seq": entry.seq, "sent": entry.payload["t"], "got": time.time()})


def slow(entry):
    """Takes half a second per event."""
    _write("slow-started.jsonl", {"seq": entry.seq})
    time.sleep(0.5)
    _write("slow-done.jsonl", {"seq": entry.seq})
'''


# -- set-up ------------------------------------------------------------------------------


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class Db:
    """The test's own connection (autocommit), for reading what the daemon wrote."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(
            conninfo(database_url), autocommit=True, application_name=TEST_APP
        )

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def head(self) -> int:
        return int(self.scalar("SELECT coalesce(max(seq), 0) FROM herald_log"))

    def offset(self, consumer: str) -> int:
        value = self.scalar("SELECT offset_seq FROM herald_consumers WHERE name = %s", (consumer,))
        return 0 if value is None else int(value)

    def owner(self, consumer: str) -> str | None:
        value = self.scalar("SELECT owner FROM herald_consumers WHERE name = %s", (consumer,))
        return None if value is None else str(value)

    def seq_of(self) -> dict[int, int]:
        """Each event's payload n → its seq."""
        rows = self.rows(
            "SELECT (e.payload->>'n')::int, l.seq FROM herald_log l "
            "JOIN herald_events e ON e.position = l.position"
        )
        return {int(n): int(seq) for n, seq in rows}

    def deliveries(self, consumer: str) -> dict[int, list[dict[str, Any]]]:
        """The consumer's delivery records by seq, in the order they were written."""
        rows = self.rows(
            "SELECT seq, attempt, outcome, kind, error, http_status, started_at, duration_ms "
            "FROM herald_deliveries WHERE consumer = %s ORDER BY id",
            (consumer,),
        )
        found: dict[int, list[dict[str, Any]]] = {}
        for seq, attempt, outcome, kind, error, status, started_at, duration in rows:
            found.setdefault(int(seq), []).append(
                {
                    "attempt": attempt,
                    "outcome": outcome,
                    "kind": kind,
                    "error": error,
                    "http_status": status,
                    "started_at": started_at,
                    "duration_ms": duration,
                }
            )
        return found

    def parked(self, consumer: str) -> dict[int, tuple[int, str]]:
        """The consumer's parked events: seq → (attempts, error)."""
        rows = self.rows(
            "SELECT seq, attempts, error FROM herald_parked WHERE consumer = %s", (consumer,)
        )
        return {int(seq): (int(attempts), str(error)) for seq, attempts, error in rows}

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db(pg_url: str) -> Iterator[Db]:
    database = Db(pg_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The handler module in the test's directory, on the daemons' PYTHONPATH."""
    (tmp_path / f"{HANDLER_MODULE}.py").write_text(HANDLERS, encoding="utf-8")
    # Subprocesses inherit the test's environment (less HERALD_*): see herald_env.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    return tmp_path


def write_config(directory: Path, text: str, name: str = "herald.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def start_daemon(
    processes: Processes,
    name: str,
    database_url: str,
    config: Path,
    consumers: tuple[str, ...] = (),
    *options: str,
) -> HeraldProcess:
    """Start ``herald run`` and wait until it runs the named consumers."""
    daemon = processes.start(name, database_url, *options, "run", "--config", str(config))
    for consumer in consumers:
        daemon.wait_for_stderr(f"consumer {consumer}: running", timeout=30)
    return daemon


def log_records(text: str) -> list[str]:
    """A daemon's stderr as log records (a record's traceback stays with it)."""
    records: list[str] = []
    for line in text.splitlines():
        if line[:2].isdigit() or not records:  # "2026-11-22 04:54:50,687 herald ..."
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def stop_daemon(daemon: HeraldProcess, timeout: float = 10.0) -> float:
    """SIGTERM; exit status 0 within ``timeout`` s, no traceback. Returns the seconds it took."""
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    status = daemon.wait(timeout)
    took = time.monotonic() - started
    assert status == 0, daemon.describe()
    tracebacks = [r for r in log_records(daemon.stderr()) if "Traceback" in r]
    assert not tracebacks, f"{tracebacks[0] if tracebacks else ''}{daemon.describe()}"
    return took


def append_events(
    database_url: str, payloads: list[dict[str, Any]], delivery: str = "at_least_once"
) -> None:
    """Append ``acme.tick`` events in one transaction."""
    with psycopg.connect(conninfo(database_url), application_name=WRITER_APP) as conn:
        append_many(conn, [NewEvent("acme.tick", p, delivery=delivery) for p in payloads])
        conn.commit()


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    *complete, _partial = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in complete]


def wait_caught_up(
    db: Db, consumers: tuple[str, ...], events: int, timeout: float, details: Any
) -> None:
    """Wait until every consumer's offset is the head, and the head is ``events``."""

    def done() -> bool:
        head = db.head()
        return head == events and all(db.offset(c) == head for c in consumers)

    wait_until(
        done,
        timeout,
        f"{', '.join(consumers)} caught up with {events} events",
        lambda: f"\nhead {db.head()}, offsets { {c: db.offset(c) for c in consumers} }{details()}",
    )


def consumers_json(database_url: str, config: Path) -> dict[str, dict[str, Any]]:
    result = herald(database_url, "consumers", "--json", env={"HERALD_CONFIG": str(config)})
    assert_ok(result)
    return {item["name"]: item for item in map(json.loads, result.stdout.splitlines())}


@dataclass
class Stream:
    """Appends ``acme.tick`` events {"n": 0, 1, ...} from a thread, in small transactions,
    until stopped and at least ``minimum`` are written."""

    database_url: str
    minimum: int = 0
    sizes: tuple[int, int] = (1, 40)
    pause: float = 0.05
    seed: int = 0
    written: int = 0
    #: how many were written when finish() was called
    written_at_stop: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True, name="stream")
        self.thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(self.seed)
        try:
            with psycopg.connect(conninfo(self.database_url), application_name=WRITER_APP) as conn:
                while True:
                    stopping = self.stop.is_set()
                    if stopping and self.written >= self.minimum:
                        return
                    # Behind the minimum when told to stop: the rest in larger transactions.
                    size = 500 if stopping else rng.randint(*self.sizes)
                    if stopping:
                        size = min(size, self.minimum - self.written)
                    batch = [
                        NewEvent("acme.tick", {"n": self.written + i}, delivery="at_least_once")
                        for i in range(size)
                    ]
                    append_many(conn, batch)
                    conn.commit()
                    self.written += size
                    if not stopping:
                        self.stop.wait(self.pause)
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> int:
        """Stop, wait for the thread; the number of events written in all."""
        self.written_at_stop = self.written
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), "the writer did not stop"
        assert not self.errors, self.errors
        return self.written


def parse_jsonl(path: Path, boundaries: list[int]) -> tuple[list[dict[str, Any]], int]:
    """The events of a jsonl consumer's file and the number of lines cut short.

    A line cut short by a kill -9 can only end at the file's end as it was when
    the daemon died (one of ``boundaries``); the next daemon's first line then
    follows it on the same line. Anything else unparseable fails the test.
    """
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file does not end with a whole line"
    entries: list[dict[str, Any]] = []
    cut = 0
    start = 0
    for line in data.split(b"\n")[:-1]:
        try:
            entries.append(json.loads(line))
        except ValueError:
            # Every line starts with the same key (sorted keys): find where the whole one starts.
            whole = line.rfind(b'{"aggregate_id":')
            assert whole > 0, f"an unparseable line at byte {start}: {line[:200]!r}"
            assert start + whole in boundaries, (
                f"a line cut short at byte {start + whole}, not where a daemon was killed "
                f"({boundaries}): {line[:200]!r}"
            )
            entries.append(json.loads(line[whole:]))
            cut += 1
        start += len(line) + 1
    return entries, cut


# -- 1. and 2. (kill -9 during a stream, killed connections) are the reliability
# suite's R1 and R2: tests/reliability/test_daemon_faults.py.


#: Loaded into the daemon by its python consumer: once, just after the runner has read a
#: batch, the connection it read through is killed (as pg_terminate_backend or a server
#: restart would, at that very moment), before the runner ends its read transaction.
FAULTS = """
import json
import os
import pathlib
import time

import psycopg

import herald.consumers.runner as runner

DIR = pathlib.Path(__file__).resolve().parent
_real_read_page = runner.read_page
_calls = 0


def _read_page(conn, *args, **kwargs):
    global _calls
    page = _real_read_page(conn, *args, **kwargs)
    _calls += 1
    if _calls == 2:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg.connect(os.environ["HERALD_DATABASE_URL"], autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while killer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()[0]:
                time.sleep(0.01)
        (DIR / "fault-injected").write_text(str(pid))
    return page


runner.read_page = _read_page


def deliver(entry):
    with open(DIR / "faulty.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"seq": entry.seq}) + "\\n")
"""


@pytest.mark.slow
def test_a_connection_killed_as_a_batch_is_read_does_not_crash_its_consumer(
    pg_url: str, db: Db, processes: Processes, handlers: Path
) -> None:
    (handlers / "herald_test_faults.py").write_text(FAULTS, encoding="utf-8")
    config = write_config(
        handlers,
        """
[consumers.faulty]
type = "python"
handler = "herald_test_faults:deliver"
topics = ["acme.*"]
batch_size = 5
""",
    )
    events = 20
    append_events(pg_url, [{"n": n} for n in range(events)])
    daemon = start_daemon(processes, "daemon", pg_url, config, ("faulty",))
    wait_caught_up(db, ("faulty",), events, 15, daemon.describe)
    assert (handlers / "fault-injected").exists(), "the fault was never injected"
    seqs = [int(line["seq"]) for line in read_lines(handlers / "faulty.jsonl")]
    assert sorted(set(seqs)) == list(range(1, events + 1))
    # A retried read, not a crash and a re-claim.
    assert "stopped on an error" not in daemon.stderr(), daemon.describe()
    assert "ended on an error" not in daemon.stderr(), daemon.describe()
    stop_daemon(daemon)


# -- 3. failing handlers: retried, parked, redelivered, discarded --------------------------


@pytest.mark.slow
def test_failing_events_are_retried_then_parked_and_redelivered_once_fixed(
    pg_url: str, db: Db, processes: Processes, handlers: Path
) -> None:
    config = write_config(
        handlers,
        f"""
[consumers.flaky]
type = "python"
handler = "{HANDLER_MODULE}:flaky"
topics = ["acme.*"]
max_attempts = 3
retry_initial = "20ms"
retry_max = "100ms"
""",
    )
    events = 200
    append_events(pg_url, [{"n": n} for n in range(events)])
    daemon = start_daemon(processes, "daemon", pg_url, config, ("flaky",))
    wait_caught_up(db, ("flaky",), events, 30, daemon.describe)

    seq_of = db.seq_of()
    failing = [n for n in range(events) if n % 50 == 7]
    parked_seqs = [seq_of[n] for n in failing]
    done = read_lines(handlers / "flaky.jsonl")
    assert sorted(int(d["n"]) for d in done) == [n for n in range(events) if n not in failing]

    listed = herald(pg_url, "parked", "list", "flaky", "--json")
    assert_ok(listed)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["seq"] for r in rows] == parked_seqs, describe(listed)
    for row, n in zip(rows, failing, strict=True):
        assert row["consumer"] == "flaky"
        assert row["topic"] == "acme.tick"
        assert row["attempts"] == 3
        assert f"boom for n={n}" in row["error"]
        assert row["redeliver_requested"] is False

    records = db.deliveries("flaky")
    for n in range(events):
        seq = seq_of[n]
        got = [(r["attempt"], r["outcome"], r["kind"]) for r in records[seq]]
        if n in failing:
            assert got == [(1, "failed", "live"), (2, "failed", "live"), (3, "parked", "live")]
            assert all(f"RuntimeError: boom for n={n}" in r["error"] for r in records[seq])
        else:
            assert got == [(1, "delivered", "live")]

    # Give one up; the operator's reason is recorded.
    discarded = parked_seqs[-1]
    reason = "obsolete: the build was deleted"
    result = herald(pg_url, "parked", "discard", "flaky", str(discarded), "--reason", reason)
    assert_ok(result)
    last = db.deliveries("flaky")[discarded][-1]
    assert (last["outcome"], last["error"], last["kind"]) == ("discarded", reason, "operator")
    assert set(db.parked("flaky")) == set(parked_seqs[:-1])

    # Redelivery's errors: one line each, exit status 2, nothing changed.
    delivered_seq = seq_of[0]
    cases = [
        (("nope", "--all"), ["unknown consumer", "nope"]),
        (("flaky", str(parked_seqs[0]), "--all"), ["SEQ", "--all"]),
        (("flaky", str(delivered_seq)), [f"seq {delivered_seq}", "not parked"]),
        (("flaky", str(discarded)), [f"seq {discarded}", "not parked"]),
    ]
    results = herald_many([Call(("parked", "redeliver", *args), pg_url) for args, _ in cases])
    for result, (_, mentions) in zip(results, cases, strict=True):
        assert_one_line_error(result, 2, mentions)
    assert set(db.parked("flaky")) == set(parked_seqs[:-1])

    # Mend the handler; redeliver the rest.
    (handlers / "fixed").touch()
    result = herald(pg_url, "parked", "redeliver", "flaky", "--all", "--wait", "30")
    assert_ok(result)
    assert "delivered: 3, parked again: 0" in result.stdout, describe(result)
    listed = herald(pg_url, "parked", "list", "flaky", "--json")
    assert_ok(listed)
    assert listed.stdout == "", describe(listed)
    records = db.deliveries("flaky")
    for seq in parked_seqs[:-1]:
        assert records[seq][-1]["outcome"] == "delivered"
        assert records[seq][-1]["kind"] == "redelivery"
    assert [r["outcome"] for r in records[discarded]] == ["failed", "failed", "parked", "discarded"]
    done = read_lines(handlers / "flaky.jsonl")
    assert sorted(int(d["n"]) for d in done) == [n for n in range(events) if n != failing[-1]]
    assert db.offset("flaky") == events
    stop_daemon(daemon)


# -- 4. a hung handler ---------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@pytest.mark.slow
def test_a_hung_handler_call_times_out_is_retried_and_parked(
    pg_url: str, db: Db, processes: Processes, handlers: Path
) -> None:
    config = write_config(
        handlers,
        f"""
[consumers.stuck]
type = "python"
handler = "{HANDLER_MODULE}:hang"
topics = ["acme.*"]
timeout = "500ms"
max_attempts = 3
retry_initial = "20ms"
retry_max = "50ms"
""",
    )
    count, hanging = 10, {3, 7}
    append_events(pg_url, [{"n": n, "t": 0.0, "hang": n in hanging} for n in range(count)])
    daemon = start_daemon(processes, "daemon", pg_url, config, ("stuck",))
    # Each hung event: 3 attempts of 0.5 s; everything is over within about 3.5 s.
    wait_caught_up(db, ("stuck",), count, 8, daemon.describe)

    seq_of = db.seq_of()
    hung = {seq_of[n] for n in hanging}
    records = db.deliveries("stuck")
    for seq in hung:
        got = records[seq]
        assert [(r["attempt"], r["outcome"]) for r in got] == [
            (1, "failed"),
            (2, "failed"),
            (3, "parked"),
        ]
        assert all("timed out" in r["error"] for r in got), got
    assert {seq: a for seq, (a, _) in db.parked("stuck").items()} == dict.fromkeys(hung, 3)
    for seq, got in records.items():
        if seq not in hung:
            assert [r["outcome"] for r in got] == ["delivered"]
    assert sorted(int(s["n"]) for s in read_lines(handlers / "stuck.jsonl")) == [
        n for n in range(count) if n not in hanging
    ]
    assert len(read_lines(handlers / "hang-started.jsonl")) == 3 * len(hanging)
    stop_daemon(daemon, timeout=5)


@pytest.mark.slow
def test_a_hung_handler_delays_no_other_consumer_and_does_not_hold_up_sigterm(
    pg_url: str, db: Db, processes: Processes, handlers: Path
) -> None:
    # stuck hangs on n = 3 for all its 20 attempts of 0.5 s (10 s and more): the whole
    # stream below goes by while it hangs.
    config = write_config(
        handlers,
        f"""
[consumers.stuck]
type = "python"
handler = "{HANDLER_MODULE}:hang"
topics = ["acme.*"]
timeout = "500ms"
max_attempts = 20
retry_initial = "20ms"
retry_max = "50ms"

[consumers.quick]
type = "python"
handler = "{HANDLER_MODULE}:fast"
topics = ["acme.*"]
""",
    )
    daemon = start_daemon(processes, "daemon", pg_url, config, ("stuck", "quick"))
    count = 40
    with psycopg.connect(conninfo(pg_url), application_name=WRITER_APP) as conn:
        for n in range(count):
            payload = {"n": n, "t": time.time(), "hang": n == 3}
            append_many(conn, [NewEvent("acme.tick", payload, delivery="at_least_once")])
            conn.commit()
            time.sleep(0.1)
    wait_caught_up(db, ("quick",), count, 10, daemon.describe)
    hang_started = read_lines(handlers / "hang-started.jsonl")
    assert hang_started, "stuck never called its handler for the hanging event"
    hung_at = float(hang_started[0]["at"])

    fast = read_lines(handlers / "fast.jsonl")
    assert sorted(int(f["seq"]) for f in fast) == list(range(1, count + 1))
    latencies = [float(f["got"]) - float(f["sent"]) for f in fast]
    during = [float(f["got"]) - float(f["sent"]) for f in fast if float(f["sent"]) > hung_at]
    assert len(during) >= 30, f"only {len(during)} events were appended while stuck hung"
    p99, p99_during = percentile(latencies, 0.99), percentile(during, 0.99)
    print(
        f"\nhung handler: quick's latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms; while stuck hung ({len(during)} events) "
        f"p99 {p99_during * 1000:.0f} ms, max {max(during) * 1000:.0f} ms"
    )
    assert p99_during < 1.0
    assert p99 < 1.0

    # Still hanging on n = 3 (well within its 20 attempts): a stop does not wait for it.
    seq = db.seq_of()[3]
    assert not db.parked("stuck"), "stuck gave n = 3 up already; the test proves little"
    took = stop_daemon(daemon, timeout=5)
    print(f"SIGTERM with a hung call: exit 0 after {took:.2f} s")
    # Neither delivered nor parked: the next run tries it again.
    assert db.offset("stuck") == seq - 1
    assert not db.parked("stuck")
    assert db.offset("quick") == count


# -- 5. stale ephemeral events -------------------------------------------------------------


@pytest.mark.slow
def test_a_stale_ephemeral_event_is_recorded_as_expired_not_delivered(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "blips.jsonl"
    config = write_config(
        tmp_path,
        f"""
[consumers.blips]
type = "jsonl"
topics = ["acme.*"]
staleness = "1s"
path = "{out}"
""",
    )
    old = herald(pg_url, "append", "acme.blip", "-p", '{"n": 1}', "--delivery", "ephemeral")
    assert_ok(old)
    appended = time.monotonic()
    append_events(pg_url, [{"n": 2}], delivery="at_least_once")  # old too, but not ephemeral
    time.sleep(max(0.0, 2.0 - (time.monotonic() - appended)))  # past the staleness limit

    daemon = start_daemon(processes, "daemon", pg_url, config, ("blips",))
    wait_caught_up(db, ("blips",), 2, 15, daemon.describe)
    assert [e["payload"]["n"] for e in read_lines(out)] == [2]
    seq_of = db.seq_of()
    records = db.deliveries("blips")
    (expired,) = records[seq_of[1]]
    assert expired["outcome"] == "expired", records
    assert "staleness" in expired["error"]
    assert [r["outcome"] for r in records[seq_of[2]]] == ["delivered"]

    append_events(pg_url, [{"n": 3}], delivery="ephemeral")  # fresh, while the daemon runs
    wait_until(
        lambda: [e["payload"]["n"] for e in read_lines(out)] == [2, 3],
        10,
        "the fresh ephemeral event was delivered",
        daemon.describe,
    )
    # The handler wrote the line before its delivery record commits: wait for the record.
    wait_until(
        lambda: db.seq_of()[3] in db.deliveries("blips"),
        10,
        "the fresh event's delivery record",
        daemon.describe,
    )
    assert [r["outcome"] for r in db.deliveries("blips")[db.seq_of()[3]]] == ["delivered"]
    stop_daemon(daemon)


# -- 6. webhooks -----------------------------------------------------------------------------


@dataclass
class Hook:
    """What the test's HTTP server received: one entry per request."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    tries: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def hook_server(hook: Hook) -> ThreadingHTTPServer:
    """A webhook receiver on 127.0.0.1 (any port) that answers by the payload's "case":

    ok → 200; flaky → 503 twice, then 200; reject → 422; slow → too late twice, then 200 at
    once; stuck → always too late.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            case = str(json.loads(body)["payload"]["case"])
            event_id = self.headers.get("Herald-Event-Id") or "?"
            with hook.lock:
                hook.tries[event_id] += 1
                attempt = hook.tries[event_id]
                hook.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body, "case": case}
                )
            status = 200
            if case == "flaky" and attempt <= 2:
                status = 503
            elif case == "reject":
                status = 422
            elif (case == "slow" and attempt <= 2) or case == "stuck":
                time.sleep(1.5)  # past the consumer's 1 s timeout
            answer = (
                b"nope, try later"
                if status == 503
                else b"unprocessable"
                if status == 422
                else b"ok"
            )
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:
                pass  # herald hung up (it timed out): expected for slow answers

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.mark.slow
def test_webhook_signs_retries_parks_and_times_out_without_leaking_its_secret(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"hook-{secrets.token_hex(16)}"
    monkeypatch.setenv("ACME_HOOK_SECRET", secret)
    hook = Hook()
    server = hook_server(hook)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        port = server.server_address[1]
        config = write_config(
            tmp_path,
            f"""
[consumers.hook]
type = "webhook"
topics = ["acme.*"]
url = "http://127.0.0.1:{port}/hooks/herald?token=abc"
secret_env = "ACME_HOOK_SECRET"
timeout = "1s"
max_attempts = 4
retry_initial = "50ms"
retry_max = "200ms"
concurrency = 2
""",
        )
        cases = ["ok", "flaky", "reject", "ok", "slow", "stuck", "ok"]
        append_events(pg_url, [{"n": n, "case": case} for n, case in enumerate(cases)])
        daemon = start_daemon(processes, "daemon", pg_url, config, ("hook",), "--debug")
        wait_caught_up(db, ("hook",), len(cases), 30, daemon.describe)
        stop_daemon(daemon)
    finally:
        server.shutdown()
        server.server_close()
        serving.join(5)

    # Every request: the event's id, and a signature of the exact body.
    for request in hook.requests:
        headers, body = request["headers"], request["body"]
        assert request["path"] == "/hooks/herald?token=abc"
        event = json.loads(body)
        assert headers["Herald-Event-Id"] == str(event["position"])
        assert headers["Herald-Seq"] == str(event["seq"])
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["Herald-Signature"] == f"sha256={expected}"
        assert headers["Content-Type"] == "application/json"

    seq_of = db.seq_of()
    records = db.deliveries("hook")

    def outcomes(n: int) -> list[tuple[int, str, int | None]]:
        return [(r["attempt"], r["outcome"], r["http_status"]) for r in records[seq_of[n]]]

    for n, case in enumerate(cases):
        if case == "ok":
            assert outcomes(n) == [(1, "delivered", 200)]
    assert outcomes(1) == [(1, "failed", 503), (2, "failed", 503), (3, "delivered", 200)]
    assert all("HTTP 503" in r["error"] for r in records[seq_of[1]][:2])
    assert outcomes(2) == [(1, "parked", 422)]
    assert "HTTP 422" in records[seq_of[2]][0]["error"]
    assert outcomes(4) == [(1, "failed", None), (2, "failed", None), (3, "delivered", 200)]
    assert all("timed out" in r["error"] for r in records[seq_of[4]][:2])
    assert outcomes(5) == [
        (1, "failed", None),
        (2, "failed", None),
        (3, "failed", None),
        (4, "parked", None),
    ]
    assert all("timed out" in r["error"] for r in records[seq_of[5]])
    assert db.parked("hook") == {
        seq_of[2]: (1, records[seq_of[2]][0]["error"]),
        seq_of[5]: (4, records[seq_of[5]][-1]["error"]),
    }
    by_case = Counter(r["case"] for r in hook.requests)
    assert by_case == {"ok": 3, "flaky": 3, "reject": 1, "slow": 3, "stuck": 4}

    # The secret is nowhere: not in the daemon's output, not in any record.
    assert secret not in daemon.stderr() + daemon.stdout()
    for table in ("herald_deliveries", "herald_parked", "herald_consumers"):
        assert secret not in repr(db.rows(f"SELECT * FROM {table}")), table


# -- 7. SIGTERM --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_the_delivery_in_flight_and_commits_it(
    pg_url: str, db: Db, processes: Processes, handlers: Path
) -> None:
    config = write_config(
        handlers,
        f"""
[consumers.slow]
type = "python"
handler = "{HANDLER_MODULE}:slow"
topics = ["acme.*"]
""",
    )
    events = 8
    append_events(pg_url, [{"n": n} for n in range(events)])
    daemon = start_daemon(processes, "daemon", pg_url, config, ("slow",))
    started = handlers / "slow-started.jsonl"
    finished = handlers / "slow-done.jsonl"
    wait_until(lambda: len(read_lines(started)) >= 3, 20, "the third call began", daemon.describe)
    in_flight = len(read_lines(finished)) < len(read_lines(started))
    took = stop_daemon(daemon, timeout=5)
    print(f"\nSIGTERM mid-batch: exit 0 after {took:.2f} s")
    begun = [int(s["seq"]) for s in read_lines(started)]
    done = [int(s["seq"]) for s in read_lines(finished)]
    assert in_flight, "no call was in flight at the SIGTERM"
    assert done == begun, "a call in flight was cut short"
    assert len(done) < events, "the stop came after the batch; the test proves little"
    assert db.offset("slow") == len(done), "the deliveries done were not committed"
    records = db.deliveries("slow")
    assert sorted(records) == done
    assert all([r["outcome"] for r in got] == ["delivered"] for got in records.values())

    again = start_daemon(processes, "daemon-2", pg_url, config, ("slow",))
    wait_caught_up(db, ("slow",), events, 20, again.describe)
    stop_daemon(again)
    done = [int(s["seq"]) for s in read_lines(finished)]
    duplicates = len(done) - len(set(done))
    assert duplicates == 0, (
        f"delivered twice: {sorted(s for s, c in Counter(done).items() if c > 1)}"
    )
    assert sorted(done) == list(range(1, events + 1))


# -- 8. two daemons --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_daemons_share_the_consumers_and_one_takes_over_when_the_other_dies(
    pg_url: str, db: Db, processes: Processes, tmp_path: Path
) -> None:
    batch_size = 100
    names = ("c1", "c2", "c3", "c4")

    def table(name: str) -> str:
        return f"""
[consumers.{name}]
type = "jsonl"
topics = ["acme.*"]
batch_size = {batch_size}
path = "{tmp_path / f"{name}.jsonl"}"
"""

    # A runs c1 and c2; B is configured with all four: it gets c3 and c4 (A holds the
    # others' claims) and stands by for c1 and c2.
    config_a = write_config(tmp_path, table("c1") + table("c2"), "a.toml")
    config_b = write_config(tmp_path, "".join(table(n) for n in names), "b.toml")
    stream = Stream(pg_url, sizes=(1, 10), pause=0.02, seed=1).start()
    try:
        a = start_daemon(processes, "daemon-a", pg_url, config_a, ("c1", "c2"))
        b = start_daemon(processes, "daemon-b", pg_url, config_b, ("c3", "c4"))
        time.sleep(1.5)  # B tries c1 and c2 again every second meanwhile
    finally:
        events = stream.finish()
    wait_caught_up(db, names, events, 30, lambda: a.describe() + b.describe())
    listing = consumers_json(pg_url, config_b)
    token_a, token_b = db.owner("c1"), db.owner("c3")
    assert token_a is not None
    assert token_b is not None
    assert f":{a.proc.pid}:" in token_a
    assert f":{b.proc.pid}:" in token_b
    run_by = {name: listing[name]["run_by"] for name in names}
    assert run_by == {"c1": token_a, "c2": token_a, "c3": token_b, "c4": token_b}, listing
    assert all(listing[name]["running"] for name in names)
    for name in ("c1", "c2"):
        assert f"consumer {name}: running" not in b.stderr(), b.describe()
    for name in names:  # a clean run: each event once
        seen = [int(e["seq"]) for e in read_lines(tmp_path / f"{name}.jsonl")]
        assert seen == list(range(1, events + 1)), name

    # kill -9 A mid-stream: B takes c1 and c2 over and finishes them.
    stream = Stream(pg_url, sizes=(5, 30), pause=0.02, seed=2, written=events).start()
    try:
        time.sleep(0.7)
        a.proc.kill()
        killed = time.monotonic()
        assert a.wait(10) == -signal.SIGKILL
        wait_until(
            lambda: db.owner("c1") == db.owner("c2") == token_b,
            10,
            "B took c1 and c2 over",
            b.describe,
        )
        takeover = time.monotonic() - killed
        time.sleep(0.5)
    finally:
        events = stream.finish()
    wait_caught_up(db, names, events, 30, b.describe)
    listing = consumers_json(pg_url, config_b)
    assert {name: listing[name]["run_by"] for name in names} == dict.fromkeys(names, token_b)
    duplicates = {}
    for name in names:
        seqs = Counter(int(e["seq"]) for e in read_lines(tmp_path / f"{name}.jsonl"))
        assert set(seqs) == set(range(1, events + 1)), name
        duplicates[name] = sum(seqs.values()) - len(seqs)
    assert duplicates["c3"] == duplicates["c4"] == 0
    assert duplicates["c1"] <= batch_size, duplicates
    assert duplicates["c2"] <= batch_size, duplicates
    print(
        f"\ntwo daemons: B took over in {takeover:.2f} s; {events} events; duplicates {duplicates}"
    )
    assert takeover < 5.0
    stop_daemon(b)
