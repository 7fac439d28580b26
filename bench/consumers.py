"""B3: the consumer daemon: no-op throughput, and commit → handler latency (issue #4).

Run with ``.venv/bin/python -m bench.consumers`` (``--quick`` for a smoke run
of a few seconds that leaves ``BENCHMARKS.md`` alone).

The script measures, in one run, on PostgreSQL (a scratch database,
``herald_bench_consumers``, dropped first and at the end) and on SQLite (a
file in a temporary directory, deleted at the end), both migrated as
``herald db upgrade`` does:

1. **No-op consumer throughput** (events/s). ``--events`` ``build_finished``
   events (at_least_once) are appended with :func:`herald.outbox.append_many`
   in transactions of ``--prefill-chunk``, then ordered (PostgreSQL: a
   :class:`herald.outbox.Sequencer` cycles until nothing is left; SQLite
   orders them as they are written). The same rows are then read three ways:

   * ``raw``: the driver alone (psycopg 3; the stdlib ``sqlite3`` plus
     ``json.loads`` of each payload, which psycopg does for jsonb), pages of
     ``--batch-size`` by seq: ``herald_log JOIN herald_events``, every column
     the daemon reads;
   * ``read_page``: herald's reader, :func:`herald.outbox.read_page` with the
     consumer's topic filter, pages of ``--batch-size``, nothing delivered;
   * ``daemon``: a :class:`herald.consumers.Daemon` with one consumer whose
     handler does nothing, once per batch size of ``--daemon-batch-sizes``
     (500, ``Consumer``'s default, 1,000 and 5,000; every other setting the
     default), in ``--rounds`` mirrored rounds (500, 1000, 5000, then 5000,
     1000, 500, ...) so that a drift of the machine falls on every batch size
     alike. Each pass is a fresh consumer (its own name, offset 0) over the
     same log, timed from ``start()`` until :func:`herald.consumers.wait_for`
     says the last seq is finished; this includes what the daemon does per
     event (a delivery record, written with the offset in one transaction per
     page of half a batch) and its start-up (claiming the consumer). Each pass
     is checked afterwards (handler calls, delivery records, distinct seqs
     delivered, final offset), then its records and consumer row are deleted
     (PostgreSQL: and the two tables vacuumed): every pass starts on the same
     tables.

   The raw read runs before the first pass and after the last; the ratios use
   the faster. A consumer's batch size bounds what a kill repeats, so the
   table shows what each bound costs in throughput.

2. **Commit → handler latency** on PostgreSQL, at each of ``--rates``
   (1,000 and 200 events/s) for ``--latency-seconds`` (after
   ``--latency-warmup`` s not counted). ``--writers`` processes (2: one
   writer's own ceiling here is close to 1,000 transactions/s) share one
   schedule: each appends one ``build_finished`` per transaction (psycopg 3
   and :func:`herald.outbox.append`), event *i* due at start + *i*/rate (an
   absolute schedule: a late writer does not sleep), and notes each event's
   position and the wall-clock time right after its ``COMMIT`` returned. In
   this process a :class:`~herald.consumers.Daemon` with the defaults of
   ``herald run`` (the sequencer, and one consumer with ``Consumer``'s
   defaults, started at the head of the log) runs a handler that notes
   ``(position, seq, time.time())``. Latency = handler time − commit time
   (one clock: one machine). A third process LISTENs on the sequencer's
   channel and notes when each NOTIFY arrives, which splits the latency into
   commit → ordered and announced (the sequencer) and announced → handler
   (the daemon's wake-up, read and dispatch); the round trips the daemon's
   engine makes are counted by thread, and one round trip is timed, to say
   what the two halves are made of. Before the latency runs, the writers
   run alone for 5 s at the highest rate (no daemon): what they can do.

3. **Commit → handler latency on SQLite** (B9: reported, no target), the
   same measurement on the SQLite file of part 1, afterwards, at each of
   ``--sqlite-rates`` (1,000 and 200 events/s), with ``--sqlite-writers``
   processes (1) appending through an engine from
   :func:`herald.config.create_engine` (``with engine.begin()`` and
   :func:`herald.outbox.append`: SQLite's one writer at a time, and the event
   ordered in its own transaction). No sequencer, no NOTIFY: the daemon's
   consumer polls. The writers alone first, as on PostgreSQL.

It prints tables, rewrites its own section of ``BENCHMARKS.md`` (between the
``bench.consumers`` markers; the rest of the file is kept), keeps every
latency round's per-event samples (commit time, commit → handler) in
``--samples``/``b5.json`` for ``python -m bench.plot``, and removes its
databases.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import multiprocessing as mp
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench.append_throughput import (
    DEFAULT_URL,
    REPO,
    URL_SETTING,
    Channel,
    Machine,
    conninfo,
    describe_machine,
    git_revision,
    md_table,
    percentile,
    source_digest,
    text_table,
)
from bench.common import filesystem_of, markers, run_script, write_section
from bench.plot import SAMPLES, machine_facts, write_samples
from bench.unit_of_work import host_machine, scratch_postgresql, scratch_sqlite
from herald.config import create_engine
from herald.consumers import Consumer, Daemon, tune_interpreter, wait_for
from herald.outbox import LogEntry, NewEvent, Sequencer, TopicFilter, append, append_many, head
from herald.outbox import read_page as herald_read_page
from herald.schema import NOTIFY_CHANNEL

BEGIN_MARK, END_MARK = markers("bench.consumers")
TITLE: Final = "## B3 — the consumer daemon: throughput and commit → handler latency (issue #4)"
BACKEND_LABELS: Final = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
TOPIC: Final = "build_finished"
#: the design's prototype (insert → consumer), as B1 quotes it
PROTOTYPE_P50_MS: Final = 7.0
PROTOTYPE_P99_MS: Final = 18.0
#: % of one core used by other processes above which a measurement is marked disturbed
DISTURBED: Final = 10.0
#: the kernel's thread-spawning thread: the parent of every kernel thread
KTHREADD: Final = 2
#: build ids of the latency run's events, clear of the pre-filled ones
LATENCY_IDS_FROM: Final = 1_000_000_000

RAW_PAGE: Final = (
    "SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.dedupe_key, e.aggregate_id, "
    "e.aggregate_version, e.trace_id, e.occurred_at, e.recorded_at "
    "FROM herald_log l JOIN herald_events e ON e.position = l.position "
    "WHERE l.seq > {p} ORDER BY l.seq LIMIT {p}"
)


# -- the machine ------------------------------------------------------------------------


def _boot_seconds() -> float:
    with open("/proc/uptime", encoding="ascii") as uptime:
        return float(uptime.read().split()[0])


class Others:
    """CPU used by processes that are not this benchmark's, sampled every second (``/proc``).

    This benchmark's own: this process, its children (the writers, the
    listener) and the PostgreSQL backends of ``database``. The server's
    background processes (WAL writer, checkpointer, ...) are counted apart, as
    *server*, and so are kernel threads, as *kernel*. Anything else (another
    program, another database's backends) is *other*: a run with much of it
    was disturbed. A process that ends between two samples loses at most a
    second of its CPU time.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.seconds = {"other": 0.0, "server": 0.0, "kernel": 0.0}
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._me = os.getpid()
        self._since = _boot_seconds()
        self._prev = self._snapshot()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-others", daemon=True)
        self._thread.start()

    def _kind(self, pid: int, comm: str, ppid: int) -> str:
        if self._me in (pid, ppid):
            return "ours"
        if KTHREADD in (pid, ppid):
            # Kernel threads: mostly softirq work for the loopback traffic and the
            # disk, i.e. for this benchmark as much as for anything else.
            return "kernel"
        if comm != "postgres":
            return "other"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                line = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if f" {self.database} " in line:
            return "ours"
        # A client backend's title names its client, "host(port)"; the rest are the server's.
        return "other" if "(" in line else "server"

    def _snapshot(self) -> dict[int, tuple[float, float, str]]:
        """pid → (CPU seconds, start in seconds since boot, kind)."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                    text = stat.read()
            except OSError:
                continue
            comm = text[text.find("(") + 1 : text.rfind(")")]
            fields = text[text.rfind(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._ticks
            start = int(fields[19]) / self._ticks
            found[pid] = (cpu, start, self._kind(pid, comm, int(fields[1])))
        return found

    def _sample(self) -> None:
        now, current = _boot_seconds(), self._snapshot()
        for pid, (cpu, start, kind) in current.items():
            if kind == "ours":
                continue
            if pid in self._prev:
                self.seconds[kind] += max(0.0, cpu - self._prev[pid][0])
            elif start >= self._since:
                self.seconds[kind] += cpu  # started since the last sample
        self._prev, self._since = current, now

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def close(self) -> dict[str, float]:
        """Stop; % of one core that other processes and the server's background used."""
        self._stop.set()
        self._thread.join(5.0)
        self._sample()
        elapsed = time.monotonic() - self._started
        return {kind: 100 * cpu / elapsed for kind, cpu in self.seconds.items()}


# -- throughput -----------------------------------------------------------------------


@dataclass(slots=True)
class Pass:
    """One way of going through the pre-filled log."""

    label: str
    events: int
    seconds: float
    #: this process's CPU time (all threads) during the pass
    cpu: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def cpu_share(self) -> float:
        """This process's CPU, in % of one core."""
        return 100 * self.cpu / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class DaemonPass:
    """One daemon pass: a fresh no-op consumer from offset 0 to the last seq."""

    batch_size: int
    #: the mirrored round it belongs to (1-based), and its place among all passes
    round: int
    number: int
    #: events in the log, and the last seq (what the offset must reach)
    events: int
    last_seq: int
    time: Pass
    #: what the database says afterwards (a consistency check)
    handler_calls: int = 0
    records: int = 0
    delivered_seqs: int = 0
    offset: int = 0
    #: transactions the daemon's engine committed during the pass
    commits: int = 0
    #: % of one core other processes ("other") and the server's background used meanwhile
    others: dict[str, float] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        n = self.events
        return (
            self.handler_calls == n
            and self.records == n
            and self.delivered_seqs == n
            and self.offset == self.last_seq
        )


@dataclass(slots=True)
class ThroughputRun:
    """One backend's part 1."""

    backend: str
    events: int
    #: the raw and ``read_page`` reads' page size (``--batch-size``)
    page_size: int
    prefill_seconds: float = 0.0
    sequence_seconds: float = 0.0
    raw: list[Pass] = field(default_factory=list)
    reader: Pass | None = None
    #: the daemon's passes, in the order they ran
    passes: list[DaemonPass] = field(default_factory=list)
    last_seq: int = 0

    @property
    def best_raw(self) -> Pass:
        return max(self.raw, key=lambda p: p.rate)

    def by_batch_size(self) -> dict[int, list[DaemonPass]]:
        """The passes by batch size (in the order first run), each size's in run order."""
        found: dict[int, list[DaemonPass]] = {}
        for one in self.passes:
            found.setdefault(one.batch_size, []).append(one)
        return found


def pooled(passes: Sequence[DaemonPass]) -> Pass:
    """One batch size's passes as one: events, seconds and CPU summed."""
    return Pass(
        "daemon",
        sum(p.time.events for p in passes),
        sum(p.time.seconds for p in passes),
        sum(p.time.cpu for p in passes),
    )


def _timed(label: str, events: int, work: Callable[[], int]) -> Pass:
    cpu0, t0 = time.process_time(), time.perf_counter()
    found = work()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if found != events:
        raise RuntimeError(f"{label}: read {found} events, expected {events}")
    return Pass(label, events, seconds, cpu)


def prefill(engine: sa.Engine, count: int, chunk: int) -> tuple[float, float, int]:
    """Append ``count`` events and order them; (append s, ordering s, the last seq)."""
    started = time.perf_counter()
    for first in range(0, count, chunk):
        events = [
            NewEvent(TOPIC, {"build_id": i + 1, "dependent_ids": []})
            for i in range(first, min(count, first + chunk))
        ]
        with engine.begin() as conn:
            append_many(conn, events)
    appended = time.perf_counter()
    with engine.connect() as conn:
        sequencer = Sequencer()
        while sequencer.cycle(conn):
            pass
        if conn.dialect.name == "postgresql":
            # What autovacuum does within a minute of such a load: without
            # statistics, the page query is planned for empty tables.
            conn.execute(sa.text("ANALYZE herald_events, herald_log"))
            conn.commit()
        last = head(conn)
        conn.rollback()
    return appended - started, time.perf_counter() - appended, last


def raw_read_postgresql(url: str, batch: int) -> int:
    """Read the whole log with psycopg alone, page by page; how many entries."""
    count, after = 0, 0
    with psycopg.connect(conninfo(make_url(url))) as conn, conn.cursor() as cur:
        sql = RAW_PAGE.format(p="%s")
        while True:
            rows = cur.execute(sql, (after, batch)).fetchall()
            conn.rollback()
            if not rows:
                return count
            count += len(rows)
            after = rows[-1][0]


def raw_read_sqlite(url: str, batch: int) -> int:
    """Read the whole log with the stdlib's sqlite3 alone, page by page; how many entries."""
    count, after = 0, 0
    path = make_url(url).database or ""
    conn = sqlite3.connect(path)
    try:
        sql = RAW_PAGE.format(p="?")
        while True:
            rows = conn.execute(sql, (after, batch)).fetchall()
            if not rows:
                return count
            for row in rows:
                json.loads(row[3])  # psycopg parses jsonb; do the same work
            count += len(rows)
            after = rows[-1][0]
    finally:
        conn.close()


def herald_read(engine: sa.Engine, batch: int) -> int:
    """Read the whole log with herald's ``read_page`` (as the runner does); how many entries."""
    count, after = 0, 0
    topics = TopicFilter([TOPIC])
    with engine.connect() as conn:
        while True:
            page = herald_read_page(conn, after, batch, topics)
            conn.rollback()
            count += len(page.entries)
            after = page.next_after
            if page.at_head:
                return count


def run_daemon(
    engine: sa.Engine, run: ThroughputRun, batch_size: int, round_: int, number: int
) -> DaemonPass:
    """A fresh no-op consumer from offset 0 to the last seq, in a Daemon; checked afterwards.

    Its delivery records and consumer row are then deleted (and, on
    PostgreSQL, the two tables vacuumed), so that the next pass starts on the
    same tables as this one did.
    """
    name = f"bench-noop-{batch_size}-{round_}"
    calls = 0

    def noop(_entry: LogEntry) -> None:
        nonlocal calls
        calls += 1  # one worker thread: no lock needed

    commits = 0

    def on_commit(_conn: sa.Connection) -> None:
        nonlocal commits
        commits += 1

    consumer = Consumer(name, [TOPIC], noop, batch_size=batch_size)
    sa.event.listen(engine, "commit", on_commit)
    others = Others(engine.url.database or "")
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        daemon = Daemon(engine, [consumer]).start()
        try:
            wait_for(engine, name, run.last_seq, timeout=900)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            daemon.stop()
    finally:
        seen_others = others.close()
        sa.event.remove(engine, "commit", on_commit)
    one = DaemonPass(
        batch_size,
        round_,
        number,
        run.events,
        run.last_seq,
        Pass("daemon", run.events, seconds, cpu),
        handler_calls=calls,
        commits=commits,
        others=seen_others,
    )
    with engine.begin() as conn:
        one.records, one.delivered_seqs = conn.execute(
            sa.text(
                "SELECT count(*), count(DISTINCT seq) FILTER (WHERE outcome = 'delivered') "
                "FROM herald_deliveries WHERE consumer = :name"
            ),
            {"name": name},
        ).one()
        one.offset = conn.execute(
            sa.text("SELECT offset_seq FROM herald_consumers WHERE name = :name"), {"name": name}
        ).scalar_one()
        conn.execute(
            sa.text("DELETE FROM herald_deliveries WHERE consumer = :name"), {"name": name}
        )
        conn.execute(sa.text("DELETE FROM herald_consumers WHERE name = :name"), {"name": name})
    if engine.dialect.name == "postgresql":
        with psycopg.connect(conninfo(engine.url), autocommit=True) as admin:
            admin.execute("VACUUM (ANALYZE) herald_deliveries, herald_consumers")
    return one


def _batch_order(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(round, batch size) of each daemon pass, in the order run: 500, 1000, 5000, 5000, ..."""
    order: list[tuple[int, int]] = []
    for number in range(args.rounds):
        sizes = args.daemon_batch_sizes if number % 2 == 0 else reversed(args.daemon_batch_sizes)
        order += [(number + 1, size) for size in sizes]
    return order


def measure_throughput(
    backend: str, url: str, events: int, args: argparse.Namespace, log: Callable[[str], None]
) -> ThroughputRun:
    run = ThroughputRun(backend, events, args.batch_size)
    engine = create_engine(url)
    raw_read = raw_read_postgresql if backend == "postgresql" else raw_read_sqlite
    try:
        run.prefill_seconds, run.sequence_seconds, run.last_seq = prefill(
            engine, events, args.prefill_chunk
        )
        log(
            f"  {events:,} events appended in {run.prefill_seconds:.1f} s, ordered in "
            f"{run.sequence_seconds:.1f} s (last seq {run.last_seq:,})"
        )
        run.raw.append(_timed("raw", events, lambda: raw_read(url, args.batch_size)))
        log(f"  raw read: {run.raw[-1].rate:,.0f} events/s")
        run.reader = _timed("read_page", events, lambda: herald_read(engine, args.batch_size))
        log(f"  herald read_page: {run.reader.rate:,.0f} events/s")
        for number, (round_, size) in enumerate(_batch_order(args), 1):
            one = run_daemon(engine, run, size, round_, number)
            run.passes.append(one)
            log(
                f"  daemon, no-op consumer, batch size {size:,} (round {round_}): "
                f"{one.time.rate:,.0f} events/s ({one.time.seconds:.1f} s; "
                f"{'consistent' if one.consistent else 'INCONSISTENT'})"
            )
        run.raw.append(_timed("raw", events, lambda: raw_read(url, args.batch_size)))
        log(f"  raw read again: {run.raw[-1].rate:,.0f} events/s")
    finally:
        engine.dispose()
    return run


# -- latency ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commit:
    """One event the latency writers committed."""

    #: its place in the schedule: due at start + number / rate
    number: int
    position: int
    #: time.time() right after COMMIT returned
    committed: float
    #: seconds from its due time to COMMIT returning (the writer's lateness)
    late: float


@dataclass(frozen=True, slots=True)
class WriterResult:
    commits: list[Commit]
    error: str | None = None


def _on_schedule(
    commit_one: Callable[[dict[str, Any]], int],
    rate: float,
    count: int,
    start_at: float,
    index: int,
    writers: int,
    commits: list[Commit],
) -> None:
    """Commit events ``index``, ``index + writers``, ... of ``count``, one per transaction.

    Event *i* is due at ``start_at + i / rate`` (CLOCK_MONOTONIC is system-wide):
    an absolute schedule, so a late commit does not shift the ones after it.
    ``commit_one`` appends one event, commits and returns its position.
    """
    for number in range(index, count, writers):
        due = start_at + number / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        payload = {"build_id": LATENCY_IDS_FROM + number, "dependent_ids": []}
        position = commit_one(payload)
        committed = time.time()
        commits.append(Commit(number, position, committed, time.monotonic() - due))


def latency_writer_main(
    dsn: str,
    rate: float,
    count: int,
    start_at: float,
    index: int,
    writers: int,
    results: Channel[WriterResult],
) -> None:
    """PostgreSQL: psycopg 3 and :func:`herald.outbox.append` on one connection."""
    commits: list[Commit] = []
    try:
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT 1")
            conn.rollback()

            def commit_one(payload: dict[str, Any]) -> int:
                position = append(conn, TOPIC, payload)
                conn.commit()
                return position

            _on_schedule(commit_one, rate, count, start_at, index, writers, commits)
    except Exception as exc:
        results.put(WriterResult(commits, repr(exc)))
        return
    results.put(WriterResult(commits))


def sqlite_writer_main(
    url: str,
    rate: float,
    count: int,
    start_at: float,
    index: int,
    writers: int,
    results: Channel[WriterResult],
) -> None:
    """SQLite: :func:`herald.outbox.append` through an engine, as an application writes.

    Each transaction is ``BEGIN IMMEDIATE``: it takes the file's one write lock
    (other writers, the daemon's commits included, wait for it, up to the
    engine's busy timeout), and the append writes the event's ``herald_log``
    row too: on SQLite a committed event is ordered.
    """
    commits: list[Commit] = []
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.rollback()

        def commit_one(payload: dict[str, Any]) -> int:
            with engine.begin() as conn:
                return append(conn, TOPIC, payload)

        _on_schedule(commit_one, rate, count, start_at, index, writers, commits)
    except Exception as exc:
        results.put(WriterResult(commits, repr(exc)))
        return
    finally:
        engine.dispose()
    results.put(WriterResult(commits))


@dataclass(frozen=True, slots=True)
class ListenerResult:
    #: (time.time() it arrived, its payload: the newest seq) of every NOTIFY
    notes: list[tuple[float, int]]
    error: str | None = None


def listener_main(dsn: str, ready: Any, stop: Any, results: Channel[ListenerResult]) -> None:
    """Note every NOTIFY on the sequencer's channel until ``stop`` is set."""
    notes: list[tuple[float, int]] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            ready.set()
            while not stop.is_set():
                notes.extend((time.time(), int(n.payload)) for n in conn.notifies(timeout=0.2))
    except Exception as exc:
        results.put(ListenerResult(notes, repr(exc)))
        return
    results.put(ListenerResult(notes))


class Listener:
    """A process that LISTENs on the sequencer's channel and notes every NOTIFY."""

    def __init__(self, dsn: str) -> None:
        ctx = mp.get_context("spawn")
        self._results: Channel[ListenerResult] = ctx.Queue()
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._process = ctx.Process(
            target=listener_main,
            args=(dsn, self._ready, self._stop, self._results),
            name="bench-listener",
            daemon=True,
        )
        self._process.start()
        if not self._ready.wait(60):
            self._process.kill()
            raise RuntimeError("the NOTIFY listener did not start")

    def close(self) -> list[tuple[float, int]]:
        """Stop; (arrival time, newest seq) of every NOTIFY, in arrival order."""
        self._stop.set()
        got = self._results.get(timeout=30)
        self._process.join(timeout=10)
        if got.error:
            raise RuntimeError(f"listener: {got.error}")
        return got.notes


def cpu_times() -> tuple[float, float]:
    """The machine's (busy, total) CPU seconds so far, all cores (``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


@dataclass(slots=True)
class LatencyRun:
    """One rate's commit → handler latency run."""

    rate: float
    seconds: float
    warmup: float
    writers: int
    backend: str = "postgresql"
    sent: int = 0
    measured: int = 0
    achieved_rate: float = 0.0
    missing: int = 0
    duplicates: int = 0
    #: commit → handler, seconds, measured events
    handler: list[float] = field(default_factory=list)
    #: (time.time() the COMMIT returned, commit → handler) of each measured event handled
    samples: list[tuple[float, float]] = field(default_factory=list)
    #: time.time() at the end of the warm-up (the measured window's start)
    started: float = 0.0
    #: commit → the first NOTIFY covering the event's seq
    notified: list[float] = field(default_factory=list)
    #: that NOTIFY → handler
    after_notify: list[float] = field(default_factory=list)
    #: COMMIT returned − the event's due time
    lateness: list[float] = field(default_factory=list)
    #: this process (the daemon's threads) while measured, % of one core
    daemon_cpu: float = 0.0
    #: the whole machine while measured, % of all cores
    machine_busy: float = 0.0
    log_before: int = 0
    notifies: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    #: the measured window (s), and the NOTIFYs received in it
    window: float = 0.0
    window_notifies: int = 0
    #: round trips the daemon's engine made in the window, by thread (sequencer, consumer)
    round_trips: dict[str, int] = field(default_factory=dict)
    #: the consumer's commits in the window (one per batch delivered)
    batches: int = 0
    #: % of one core other processes ("other") and the server's background used meanwhile
    others: dict[str, float] = field(default_factory=dict)

    #: each round's own figures (a merged run's), in the order run
    rounds: list[LatencyRun] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        """Did the writers keep up with the rate (within 2 %)?"""
        return self.achieved_rate >= 0.98 * self.rate

    @classmethod
    def merge(cls, rounds: Sequence[LatencyRun]) -> LatencyRun:
        """One rate's rounds as one run: samples pooled, counts summed, shares weighted."""
        first = rounds[0]
        window = sum(r.window for r in rounds)

        def weighted(get: Callable[[LatencyRun], float]) -> float:
            return sum(get(r) * r.window for r in rounds) / window if window else 0.0

        merged = cls(
            first.rate,
            sum(r.seconds for r in rounds),
            first.warmup,
            first.writers,
            first.backend,
            log_before=first.log_before,
            settings=first.settings,
            rounds=list(rounds),
        )
        for r in rounds:
            merged.handler += r.handler
            merged.notified += r.notified
            merged.after_notify += r.after_notify
            merged.lateness += r.lateness
            merged.sent += r.sent
            merged.measured += r.measured
            merged.missing += r.missing
            merged.duplicates += r.duplicates
            merged.notifies += r.notifies
            merged.window_notifies += r.window_notifies
            merged.batches += r.batches
            for group, count in r.round_trips.items():
                merged.round_trips[group] = merged.round_trips.get(group, 0) + count
        merged.window = window
        merged.achieved_rate = weighted(lambda r: r.achieved_rate)
        merged.daemon_cpu = weighted(lambda r: r.daemon_cpu)
        merged.machine_busy = weighted(lambda r: r.machine_busy)
        kinds = {kind for r in rounds for kind in r.others}
        merged.others = {kind: weighted(_share(kind)) for kind in kinds}
        return merged


def _share(kind: str) -> Callable[[LatencyRun], float]:
    return lambda run: run.others.get(kind, 0.0)


def run_writers(
    dsn: str,
    rate: float,
    writers: int,
    warmup: float,
    seconds: float,
    on_start: Callable[[], None] = lambda: None,
    target: Callable[..., None] = latency_writer_main,
) -> list[Commit]:
    """``writers`` processes appending at ``rate`` from 3 s from now, by number.

    ``on_start`` is called when the warm-up ends. ``target`` is the writer
    (:func:`latency_writer_main` with a psycopg conninfo as ``dsn``, or
    :func:`sqlite_writer_main` with the database URL).
    """
    ctx = mp.get_context("spawn")
    results: Channel[WriterResult] = ctx.Queue()
    count = round(rate * (warmup + seconds))
    start_at = time.monotonic() + 3.0  # the spawned writers import herald first
    processes = [
        ctx.Process(
            target=target,
            args=(dsn, rate, count, start_at, index, writers, results),
            name=f"bench-latency-writer-{index}",
            daemon=True,
        )
        for index in range(writers)
    ]
    for process in processes:
        process.start()
    time.sleep(max(0.0, start_at + warmup - time.monotonic()))
    on_start()
    done: list[WriterResult] = []
    deadline = start_at + warmup + seconds + 300
    while len(done) < len(processes):
        try:
            done.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for process in processes:
                    process.kill()
                raise RuntimeError(f"latency writers failed or hung: {dead}") from None
    for process in processes:
        process.join(timeout=10)
    errors = [r.error for r in done if r.error]
    if errors:
        raise RuntimeError(f"latency writer: {'; '.join(errors)}")
    return sorted((c for r in done for c in r.commits), key=lambda c: c.number)


def achieved(commits: Sequence[Commit], skip: int) -> float:
    """Events/s committed after the first ``skip`` (the warm-up)."""
    measured = [c.committed for c in commits if c.number >= skip]
    if len(measured) < 2:
        return 0.0
    return (len(measured) - 1) / (max(measured) - min(measured))


def _writers_for(url: str, args: argparse.Namespace) -> tuple[str, Callable[..., None], int]:
    """The latency writers of ``url``'s backend: (what they connect to, the writer, how many)."""
    if make_url(url).get_backend_name() == "sqlite":
        return url, sqlite_writer_main, args.sqlite_writers
    return conninfo(make_url(url)), latency_writer_main, args.writers


def writers_alone(url: str, rate: float, args: argparse.Namespace) -> float:
    """Events/s the writers achieve at ``rate`` with no daemon running (5 s at most)."""
    where, target, writers = _writers_for(url, args)
    commits = run_writers(
        where,
        rate,
        writers,
        args.latency_warmup,
        min(5.0, args.latency_seconds),
        target=target,
    )
    # Order what they wrote now, so that the latency run's consumer starts after it.
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            sequencer = Sequencer()
            while sequencer.cycle(conn):
                pass
    finally:
        engine.dispose()
    return achieved(commits, round(rate * args.latency_warmup))


class RoundTrips:
    """What the daemon's engine sends to the server, by thread, while counting is on.

    A statement is one round trip, and so are a transaction's BEGIN (psycopg 3
    sends it before the first statement and waits for it) and its COMMIT or
    ROLLBACK: the latency paths are chains of them.
    """

    #: the consumer's threads: its runner, and its commits thread (its worker sends nothing)
    GROUPS: Final = {
        "herald-sequencer": "sequencer",
        "herald-consumer-": "consumer",
        "herald-bench-latency-": "consumer",
    }

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.on = False
        self.counts: Counter[str] = Counter()
        self.commits: Counter[str] = Counter()
        self._events: list[tuple[str, Callable[..., None]]] = [
            ("before_cursor_execute", self._statement),
            ("begin", self._bracket),
            ("commit", self._commit),
            ("rollback", self._bracket),
        ]
        for name, function in self._events:
            sa.event.listen(engine, name, function)

    def _group(self) -> str:
        name = threading.current_thread().name
        return next((g for p, g in self.GROUPS.items() if name.startswith(p)), "other")

    def _statement(self, *_args: Any) -> None:
        if self.on:
            self.counts[self._group()] += 1

    def _bracket(self, *_args: Any) -> None:
        if self.on:
            self.counts[self._group()] += 1

    def _commit(self, *_args: Any) -> None:
        if self.on:
            group = self._group()
            self.counts[group] += 1
            self.commits[group] += 1

    def close(self) -> None:
        for name, function in self._events:
            sa.event.remove(self.engine, name, function)


def round_trip(dsn: str, count: int = 1000) -> float:
    """The median time of ``SELECT 1`` on a psycopg connection (autocommit), seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - started)
    return percentile(times, 0.5)


def measure_latency(url: str, rate: float, seconds: float, args: argparse.Namespace) -> LatencyRun:
    """A daemon with a recording handler here; writers and a LISTEN in other processes.

    On SQLite there is nothing to LISTEN to: the consumer polls.
    """
    where, target, writers = _writers_for(url, args)
    backend = make_url(url).get_backend_name()
    result = LatencyRun(rate, seconds, args.latency_warmup, writers, backend)
    engine = create_engine(url)
    handled: list[tuple[int, int, float]] = []  # (position, seq, time.time())

    def handler(entry: LogEntry) -> None:
        handled.append((entry.position, entry.seq, time.time()))

    # Everything as `herald run` has it: the Daemon's and the Consumer's defaults.
    consumer = Consumer(f"bench-latency-{rate:g}-{uuid.uuid4().hex[:6]}", [TOPIC], handler)
    daemon = Daemon(engine, [consumer])
    result.settings = {
        "poll_interval": daemon.poll_interval,
        # the longest pause of the sequencer's adaptive poll (`herald run --poll-interval`)
        "sequencer_poll": getattr(daemon, "_sequencer_poll", 0.05),
        "batch_size": consumer.batch_size,
        "concurrency": consumer.concurrency,
    }
    marks: list[float] = []
    trips = RoundTrips(engine)

    watch: list[Others] = []

    def mark() -> None:
        trips.on = not trips.on  # on at the end of the warm-up, off when the writers are done
        marks.extend((time.process_time(), time.monotonic(), time.time(), *cpu_times()))
        if watch:
            result.others = watch.pop().close()
        else:
            watch.append(Others(make_url(url).database or ""))

    try:
        with engine.begin() as conn:
            # Start at the head (what an operator's reset to the head does): the
            # events already in the log are not this consumer's business.
            result.log_before = head(conn)
            conn.execute(
                sa.text("INSERT INTO herald_consumers (name, offset_seq) VALUES (:n, :o)"),
                {"n": consumer.name, "o": result.log_before},
            )
        listener = Listener(where) if backend == "postgresql" else None
        try:
            daemon.start()
            if not daemon.ready.wait(30) or consumer.name not in daemon.running:
                raise RuntimeError("the daemon did not claim its consumer")
            commits = run_writers(
                where, rate, writers, args.latency_warmup, seconds, mark, target=target
            )
            mark()
            deadline = time.monotonic() + 30
            while len(handled) < len(commits) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            daemon.stop()
            notes = listener.close() if listener is not None else []
    finally:
        for left in watch:  # the run failed between the marks
            left.close()
        trips.close()
        engine.dispose()
    cpu0, t0, wall0, busy0, total0, cpu1, t1, wall1, busy1, total1 = marks
    result.daemon_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
    result.machine_busy = 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    result.window = t1 - t0
    result.started = wall0
    result.window_notifies = sum(1 for at, _ in notes if wall0 <= at <= wall1)
    result.round_trips = dict(trips.counts)
    result.batches = trips.commits["consumer"]
    summarize(result, commits, handled, notes, round(rate * args.latency_warmup))
    return result


def _rounds_order(args: argparse.Namespace, rates: Sequence[float] | None = None) -> list[float]:
    """The rates in the order the rounds run them: 1000, 200, then 200, 1000, ..."""
    rates = args.rates if rates is None else rates
    order: list[float] = []
    for number in range(args.rounds):
        order += rates if number % 2 == 0 else reversed(rates)
    return order


def measure_latencies(
    url: str, args: argparse.Namespace, log: Callable[[str], None]
) -> list[LatencyRun]:
    """Every rate in ``--rounds`` mirrored rounds, merged by rate.

    The rates are ``--rates`` on PostgreSQL, ``--sqlite-rates`` on SQLite.
    """
    seconds = args.latency_seconds / args.rounds
    sqlite = make_url(url).get_backend_name() == "sqlite"
    rates = args.sqlite_rates if sqlite else args.rates
    by_rate: dict[float, list[LatencyRun]] = {rate: [] for rate in rates}
    for rate in _rounds_order(args, rates):
        log(
            f"latency{' (SQLite)' if sqlite else ''}: {rate:g} events/s, "
            f"{args.latency_warmup:g} + {seconds:g} s"
        )
        lat = measure_latency(url, rate, seconds, args)
        by_rate[rate].append(lat)
        log(
            f"  commit → handler p50 {_ms(percentile(lat.handler, 0.5))} ms, "
            f"p99 {_ms(percentile(lat.handler, 0.99))} ms; "
            f"{lat.achieved_rate:,.0f} events/s achieved"
        )
    return [LatencyRun.merge(rounds) for rounds in by_rate.values()]


def summarize(
    result: LatencyRun,
    commits: Sequence[Commit],
    handled: Sequence[tuple[int, int, float]],
    notes: Sequence[tuple[float, int]],
    skip: int,
) -> None:
    """Match commits, handler calls and NOTIFYs; fill in ``result``'s figures."""
    result.notifies = len(notes)
    payloads = [payload for _, payload in notes]  # one sequencer: they only grow
    by_position: dict[int, tuple[int, float]] = {}
    for position, seq, at in handled:
        if position in by_position:
            result.duplicates += 1
        else:
            by_position[position] = (seq, at)
    result.sent = len(commits)
    result.missing = sum(1 for c in commits if c.position not in by_position)
    measured = [c for c in commits if c.number >= skip]
    result.measured = len(measured)
    result.achieved_rate = achieved(commits, skip)
    for commit in measured:
        result.lateness.append(commit.late)
        if commit.position not in by_position:
            continue
        seq, at = by_position[commit.position]
        result.handler.append(at - commit.committed)
        result.samples.append((commit.committed, at - commit.committed))
        i = bisect.bisect_left(payloads, seq)
        if i < len(notes):
            result.notified.append(notes[i][0] - commit.committed)
            result.after_notify.append(at - notes[i][0])


# -- the report -------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    args: argparse.Namespace
    machine: Machine
    runs: list[ThroughputRun]
    latencies: list[LatencyRun]
    #: events/s the latency writers achieved with no daemon, at the highest rate
    alone: tuple[float, float] | None = None
    #: SELECT 1's round trip on this machine (p50, s), measured before the latency runs
    round_trip: float | None = None
    #: the commit → handler runs on SQLite (B9: reported, no target)
    sqlite_latencies: list[LatencyRun] = field(default_factory=list)
    #: events/s the SQLite writers achieved with no daemon, at the highest SQLite rate
    sqlite_alone: tuple[float, float] | None = None
    sqlite_version: str = sqlite3.sqlite_version
    sqlite_filesystem: str = "?"
    revision: str = "?"
    digests: tuple[str, str] = ("?", "?")
    load_after: float = 0.0
    other_sessions_after: int | None = None
    elapsed: float = 0.0


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _us(one: Pass) -> str:
    return f"{1e6 / one.rate:,.0f} µs" if one.rate else "-"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


THROUGHPUT_HEADER: Final = [
    "backend",
    "events",
    "batch size",
    "raw read ev/s (before / after)",
    "herald read_page ev/s",
    "daemon, no-op consumer ev/s",
    "daemon / raw",
    "daemon / read_page",
    "daemon s a pass (its process's CPU)",
    "µs of CPU an event",
]

#: B3's target, events/s, and the batch size a consumer has unless configured
B3_TARGET: Final = 50_000
DEFAULT_BATCH_SIZE: Final = Consumer("default", [TOPIC], lambda _entry: None).batch_size


def _daemon_rate(passes: Sequence[DaemonPass]) -> str:
    """The passes' pooled events/s, then each pass's in parentheses (in run order)."""
    whole = _rate(pooled(passes).rate)
    if len(passes) < 2:
        return whole
    return f"{whole} ({', '.join(_rate(p.time.rate) for p in passes)})"


def _best_size(run: ThroughputRun) -> int:
    sizes = run.by_batch_size()
    return max(sizes, key=lambda size: pooled(sizes[size]).rate)


def throughput_rows(report: Report) -> list[list[str]]:
    rows = []
    for run in report.runs:
        assert run.reader is not None
        best = _best_size(run)
        for size, passes in run.by_batch_size().items():
            daemon = pooled(passes)
            rate = _daemon_rate(passes)
            rows.append(
                [
                    BACKEND_LABELS[run.backend],
                    f"{run.events:,}",
                    f"{size:,}" + (" (default)" if size == DEFAULT_BATCH_SIZE else ""),
                    " / ".join(_rate(p.rate) for p in run.raw),
                    _rate(run.reader.rate),
                    f"**{rate}**" if size == best else rate,
                    f"{daemon.rate / run.best_raw.rate:.2f}",
                    f"{daemon.rate / run.reader.rate:.2f}",
                    f"{daemon.seconds / len(passes):.1f} ({daemon.cpu_share:.0f} % of a core)",
                    f"{daemon.cpu * 1e6 / daemon.events:,.1f}",
                ]
            )
    return rows


def throughput_verdict(report: Report) -> str | None:
    """B3's verdict on PostgreSQL against the target, and what the batch size costs."""
    run = next((r for r in report.runs if r.backend == "postgresql"), None)
    if run is None:
        return None
    sizes = {size: pooled(passes).rate for size, passes in run.by_batch_size().items()}
    best = _best_size(run)

    def said(size: int) -> str:
        rate = f"{_rate(sizes[size])} events/s"
        return f"**{rate}**" if size == best else rate

    met = [size for size, rate in sizes.items() if rate >= B3_TARGET]
    if met:
        where = ", ".join(f"{size:,} ({said(size)})" for size in met)
        verdict = f"met at batch size{'s' if len(met) > 1 else ''} {where}"
    else:
        verdict = f"not met at any batch size measured (the best: {best:,}, {said(best)})"
    if DEFAULT_BATCH_SIZE in sizes:
        default = (
            f"at the default {DEFAULT_BATCH_SIZE:,}: {said(DEFAULT_BATCH_SIZE)} "
            f"({sizes[DEFAULT_BATCH_SIZE] / B3_TARGET:.2f}× the target)"
        )
    else:
        default = f"the default {DEFAULT_BATCH_SIZE:,} was not measured"
    inconsistent = [p for p in run.passes if not p.consistent]
    warning = (
        f" **{len(inconsistent)} pass(es) inconsistent**, see the notes." if inconsistent else ""
    )
    return (
        f"**Verdict (B3, PostgreSQL, {run.events:,} events), ≥ {B3_TARGET:,} events/s:** "
        f"{verdict}; {default}.{warning} The batch size is also the bound on duplicates "
        "after a kill: a kill repeats at most `batch_size` events (those delivered whose "
        "records and offset were not yet committed), so a larger batch buys its throughput "
        "with more events delivered twice after a crash."
    )


def throughput_notes(report: Report) -> list[str]:
    notes = []
    for run in report.runs:
        assert run.reader is not None
        label = BACKEND_LABELS[run.backend]
        ordered = (
            f", ordered by the sequencer in {run.sequence_seconds:.1f} s"
            if run.backend == "postgresql"
            else " (SQLite: ordered by the writer)"
        )
        notes.append(
            f"{label}: {run.events:,} events appended in {run.prefill_seconds:.1f} s{ordered}. "
            f"Per event, in wall time, pages of {run.page_size:,}: the raw read "
            f"{_us(run.best_raw)}, herald's `read_page` {_us(run.reader)}."
        )
        for one in run.passes:
            check = (
                "consistent"
                if one.consistent
                else f"**inconsistent** (expected {one.events:,} of each and offset "
                f"{one.last_seq:,})"
            )
            per_commit = one.events / one.commits if one.commits else float("nan")
            # What the figures include is said once, at a backend's first pass.
            first = one is run.passes[0]
            notes.append(
                f"{label}, batch size {one.batch_size:,}, round {one.round} (pass "
                f"{one.number} of {len(run.passes)}): {one.time.rate:,.0f} events/s, "
                f"{one.time.seconds:.1f} s{' (start-up included)' if first else ''}, "
                f"{one.commits:,} transactions committed through its engine (about "
                f"{per_commit:,.0f} events each), then {one.handler_calls:,} handler calls, "
                f"{one.records:,} delivery records, {one.delivered_seqs:,} seqs delivered, "
                f"offset {one.offset:,} of {one.last_seq:,}: {check}. Its process used "
                f"{one.time.cpu_share:.0f} % of one core meanwhile "
                f"({one.time.cpu * 1e6 / one.events:,.1f} µs of CPU an event"
                + ("; the database's work is not in it" if first else "")
                + f"); in wall time the daemon took {_us(one.time)} an event"
                + (
                    " (reading, calling the handler, recording and committing, partly at the "
                    "same time on its threads)"
                    if first
                    else ""
                )
                + "."
                + _others(one.others)
            )
    return notes


LATENCY_HEADER: Final = [
    "events/s asked (achieved)",
    "path",
    "events",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
]


_PATHS: Final = {
    "commit → the sequencer's NOTIFY": "notified",
    "NOTIFY → the handler is called": "after_notify",
    "**commit → the handler is called**": "handler",
}


def _with_rounds(lat: LatencyRun, path: str, values: Sequence[float], q: float) -> str:
    """The percentile over all rounds, then each round's in parentheses."""
    return _by_round(lat, _PATHS[path], values, q)


def _by_round(lat: LatencyRun, attribute: str, values: Sequence[float], q: float) -> str:
    """``values``' percentile, then that of each round's ``attribute`` in parentheses."""
    whole = _ms(percentile(values, q))
    if len(lat.rounds) < 2:
        return whole
    each = ", ".join(_ms(percentile(getattr(r, attribute), q)) for r in lat.rounds)
    return f"{whole} ({each})"


def latency_rows(report: Report) -> list[list[str]]:
    rows = []
    for lat in report.latencies:
        rate = f"{lat.rate:,.0f} ({lat.achieved_rate:,.0f})"
        for path, values in (
            ("commit → the sequencer's NOTIFY", lat.notified),
            ("NOTIFY → the handler is called", lat.after_notify),
            ("**commit → the handler is called**", lat.handler),
        ):
            rows.append(
                [
                    rate,
                    path,
                    f"{len(values):,}",
                    _with_rounds(lat, path, values, 0.5),
                    _ms(percentile(values, 0.9)),
                    _with_rounds(lat, path, values, 0.99),
                    _ms(max(values)) if values else "-",
                ]
            )
    return rows


def _others(others: dict[str, float]) -> str:
    """What else ran on the machine, as a sentence."""
    if not others:
        return ""
    other, server = others.get("other", 0.0), others.get("server", 0.0)
    verdict = " — **the run was disturbed**" if other >= DISTURBED else ""
    return (
        f" Other processes on the machine used {other:.0f} % of one core meanwhile{verdict} "
        f"(besides PostgreSQL's background processes, {server:.0f} %, and kernel threads, "
        f"{others.get('kernel', 0.0):.0f} %)."
    )


def _per(count: float, per: float) -> str:
    return f"{count / per:.1f}" if per else "-"


def latency_notes(report: Report) -> list[str]:
    notes = []
    for lat in report.latencies:
        kept = "kept up with the rate (within 2 %" if lat.kept else "**fell behind** (by over 2 %"
        trips = lat.round_trips
        sequencer, consumer = trips.get("sequencer", 0), trips.get("consumer", 0)
        notifies = lat.window_notifies
        events = lat.rate * lat.window
        notes.append(
            f"{lat.rate:,.0f} events/s asked: {lat.achieved_rate:,.0f} achieved over the "
            f"{lat.measured:,} measured events; the {lat.writers} writers {kept}; a COMMIT "
            f"returned p50 {_ms(percentile(lat.lateness, 0.5))} ms, p99 "
            f"{_ms(percentile(lat.lateness, 0.99))} ms after the event's due time). "
            f"{lat.missing} missing, {lat.duplicates} duplicate(s) at the handler. The machine "
            f"was {lat.machine_busy:.0f} % busy (both cores, `/proc/stat`), the daemon's "
            f"process used {lat.daemon_cpu:.0f} % of one core "
            f"({lat.daemon_cpu * 10 / lat.rate:.1f} ms of CPU per event). In the measured "
            f"{lat.window:.0f} s: {notifies:,} NOTIFYs ({_per(events, notifies)} events "
            f"each) and {lat.batches:,} batches delivered ({_per(events, lat.batches)} events "
            f"each); the daemon's engine made {sequencer / lat.window:,.0f} round trips/s for "
            f"the sequencer ({_per(sequencer, notifies)} per NOTIFY, idle polls included) and "
            f"{consumer / lat.window:,.0f}/s for the consumer ({_per(consumer, lat.batches)} "
            "per batch: read ahead, then commit records and offset)." + _others(lat.others)
        )
    return notes


def _latency_sentence(lat: LatencyRun, cores: int) -> str:
    said = (
        f"at {lat.rate:,.0f} events/s the handler is called p50 "
        f"{_ms(percentile(lat.handler, 0.5))} ms, p99 {_ms(percentile(lat.handler, 0.99))} ms "
        f"after the COMMIT (sequencer's part p50 {_ms(percentile(lat.notified, 0.5))} ms, "
        f"daemon's p50 {_ms(percentile(lat.after_notify, 0.5))} ms)"
    )
    if lat.kept:
        return said
    return (
        f"{said}, but the writers achieved only {lat.achieved_rate:,.0f} events/s next to "
        f"the daemon, on a machine {lat.machine_busy:.0f} % busy: the figures of a "
        "saturated machine, where the writers, their PostgreSQL backends, the sequencer's "
        f"backend and the daemon's threads all queue for {cores} cores"
    )


def latency_reading(report: Report) -> str:
    """What the latency figures mean (written from this run's figures)."""
    said = "; ".join(_latency_sentence(lat, report.machine.cores) for lat in report.latencies)
    parts = [f"**What dominates.** In short: {said}."]
    if report.alone is not None:
        rate, alone = report.alone
        parts.append(
            f"(The same writers with no daemon running, nothing ordering or consuming, "
            f"achieved {alone:,.0f} of {rate:,.0f} events/s for "
            f"{min(5.0, report.args.latency_seconds):g} s.)"
        )
    first = report.latencies[0]
    poll = float(first.settings.get("poll_interval", 1.0))
    worst = max((max(lat.after_notify, default=0.0) for lat in report.latencies), default=0.0)
    fallback = (
        f" Every event came through a NOTIFY wake-up: the daemon's part never came near the "
        f"consumers' poll fallback ({poll:g} s; its maximum was {_ms(worst)} ms)."
        if worst < poll / 2
        else ""
    )
    # The slowest rate the writers kept: its figures are the least disturbed by queueing.
    calm = min(report.latencies, key=lambda lat: lat.rate)
    seq_trips = _trips(calm.round_trips.get("sequencer", 0), calm.window_notifies)
    con_trips = _trips(calm.round_trips.get("consumer", 0), calm.batches)
    chains = ""
    if report.round_trip is not None and seq_trips and con_trips:
        rtt = report.round_trip
        chains = (
            f" At {calm.rate:,.0f} events/s the sequencer made {seq_trips:.1f} round trips "
            f"per NOTIFY and the consumer {con_trips:.1f} per batch; one round trip (`SELECT "
            f"1` on a psycopg connection over loopback, p50) takes {_ms(rtt)} ms on this "
            f"machine, so the chains alone cost about {_ms(seq_trips * rtt)} + "
            f"{_ms(con_trips * rtt)} ms, against the measured p50 "
            f"{_ms(percentile(calm.notified, 0.5))} + {_ms(percentile(calm.after_notify, 0.5))} "
            f"ms. The rest is waiting: for a CPU (the machine was {calm.machine_busy:.0f} % "
            f"busy, the daemon's process {calm.daemon_cpu:.0f} % of a core, its five threads — "
            "sequencer, listener, consumer, worker, commits — sharing one Python interpreter), "
            "for the WAL flushes, and for the sequencer's next poll."
        )
    # The slowest event: if, in the same run, writers that were otherwise on time had a
    # commit as late, the whole machine or server stalled, not the daemon alone.
    worst_run = max(report.latencies, key=lambda lat: max(lat.handler, default=0.0))
    slowest = max(worst_run.handler, default=0.0)
    late = max(worst_run.lateness, default=0.0)
    on_time = percentile(worst_run.lateness, 0.5) < 0.05
    stalls = (
        f" The slowest event ({_ms(slowest)} ms, at {worst_run.rate:,.0f} events/s) is not "
        f"the daemon's doing alone: in the same run a writer's COMMIT, otherwise on time, "
        f"returned up to {_ms(late)} ms after its due time, so the server or the machine "
        "stalled for everyone."
        if slowest > 0.25 and late >= slowest / 2 and on_time
        else ""
    )
    parts.append(
        "Neither half is one long wait: each is a chain of round trips, paid once per batch "
        "of events, not per event. The sequencer's half: its poll (1 ms after a cycle that "
        "found work, doubling up to "
        f"{first.settings.get('sequencer_poll', 0.05) * 1000:.0f} ms while idle), then a "
        "cycle: a read of the snapshot, then one call of `herald_sequence_v1()`, which looks, "
        "locks the state, orders, advances, NOTIFYs and commits without waiting for the WAL "
        "flush. The daemon's half: the sequencer wakes its own process's consumer thread "
        "directly (the NOTIFY wakes other processes), which reads its row, the head and a "
        "page (a transaction of its own), then hands the entries to its worker thread; the "
        "page's delivery records and offset are committed by the consumer's commits thread "
        f"while it reads again.{chains}{fallback}{stalls} For comparison, the design's "
        "prototype measured insert "
        f"→ consumer p50 {PROTOTYPE_P50_MS:.0f} ms, p99 {PROTOTYPE_P99_MS:.0f} ms, and B1 a "
        "`LogReader.follow` at 200 events/s with the sequencer alone in its own process."
    )
    return " ".join(parts)


def _trips(count: int, per: int) -> float:
    return count / per if per else 0.0


SQLITE_LATENCY_HEADER: Final = [
    "events/s asked (achieved)",
    "events",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "missing",
    "duplicates",
]


def sqlite_latency_rows(report: Report) -> list[list[str]]:
    return [
        [
            f"{lat.rate:,.0f} ({lat.achieved_rate:,.0f})",
            f"{len(lat.handler):,}",
            f"**{_by_round(lat, 'handler', lat.handler, 0.5)}**",
            _ms(percentile(lat.handler, 0.9)),
            f"**{_by_round(lat, 'handler', lat.handler, 0.99)}**",
            _ms(max(lat.handler)) if lat.handler else "-",
            f"{lat.missing}",
            f"{lat.duplicates}",
        ]
        for lat in report.sqlite_latencies
    ]


def sqlite_latency_notes(report: Report) -> list[str]:
    notes = []
    for lat in report.sqlite_latencies:
        kept = "kept up with the rate (within 2 %" if lat.kept else "**fell behind** (by over 2 %"
        notes.append(
            f"{lat.rate:,.0f} events/s asked: {lat.achieved_rate:,.0f} achieved over the "
            f"{lat.measured:,} measured events; the {lat.writers} writer(s) {kept}; a COMMIT "
            f"returned p50 {_ms(percentile(lat.lateness, 0.5))} ms, p99 "
            f"{_ms(percentile(lat.lateness, 0.99))} ms after the event's due time). "
            f"{lat.missing} missing, {lat.duplicates} duplicate(s) at the handler. The machine "
            f"was {lat.machine_busy:.0f} % busy (both cores, `/proc/stat`), the daemon's "
            f"process used {lat.daemon_cpu:.0f} % of one core." + _others(lat.others)
        )
    if report.sqlite_alone is not None:
        rate, alone = report.sqlite_alone
        notes.append(
            f"The same writer(s) with no daemon running achieved {alone:,.0f} of {rate:,.0f} "
            f"events/s for {min(5.0, report.args.latency_seconds):g} s."
        )
    return notes


def sqlite_latency_text(report: Report) -> str:
    """What the SQLite latency run does (B9's part of B5)."""
    args = report.args
    first = report.sqlite_latencies[0]
    poll = float(first.settings.get("poll_interval", 0.1))
    order = ", ".join(f"{r:g}" for r in _rounds_order(args, args.sqlite_rates))
    return (
        "**Commit → handler latency on SQLite (B9: SQLite, report only; no target).** The "
        "same measurement on the SQLite file of the throughput run, afterwards: "
        f"{first.writers} writer process(es) share one schedule, one `build_finished` per "
        "transaction (`herald.outbox.append` in `with engine.begin()` on an engine from "
        "`herald.config.create_engine`: `BEGIN IMMEDIATE`, so each takes the file's one "
        "write lock, and the append writes the event's `herald_log` row in the same "
        f"transaction), {args.latency_seconds:g} s measured per rate in {args.rounds} "
        f"mirrored round(s) ({order}), each after {args.latency_warmup:g} s of warm-up and "
        "with a fresh daemon and consumer; the `Daemon` (`herald run`'s defaults) and its "
        "consumer (`Consumer`'s defaults) run in the benchmark's process. There is no "
        "sequencer and no NOTIFY on SQLite: the consumer polls the log every "
        f"{poll:g} s (the daemon's poll interval on SQLite). herald's engine begins every "
        "SQLite transaction with `BEGIN IMMEDIATE`, the consumer's reads and its commits of "
        "delivery records and offset too, so the writers and the daemon take turns for the "
        "one write lock, and whoever finds it taken sleeps in SQLite's busy handler (1 ms, "
        "growing to 100 ms a try) until it is free. Latency = handler time − commit time "
        "(one clock). The p50 and p99 cells give the figure over all rounds, then each "
        "round's in parentheses."
    )


def markdown(report: Report) -> str:
    m, args = report.machine, report.args
    dated = (
        f"Date: {date.today().isoformat()}. Script: `bench/consumers.py` "
        f"(whole run {report.elapsed:.0f} s). {report.revision}."
    )
    if report.digests[0] != report.digests[1]:
        dated += " **herald's sources changed during the run**: the figures mix two versions."
    backends = [run.backend for run in report.runs]
    server = ""
    if "postgresql" in backends:
        settings = ", ".join(f"`{k}={v}`" for k, v in m.settings.items())
        server = (
            f"PostgreSQL {m.server_version} on the same machine over TCP loopback, {settings}; "
        )
    sqlite_text = ""
    if "sqlite" in backends:
        sqlite_text = (
            f"SQLite {report.sqlite_version} (a file on {report.sqlite_filesystem}; herald's "
            "engine: WAL, `synchronous=FULL`, `BEGIN IMMEDIATE`); "
        )
    others = (
        f"; other client sessions on the server: {m.other_sessions} at start, "
        f"{report.other_sessions_after} at the end"
        if report.other_sessions_after is not None
        else ""
    )
    machine = (
        "**Machine.** "
        f"{m.cores} cores (`os.cpu_count()`, {m.cpu_model}), {m.ram_gib:.1f} GiB RAM, {m.os}; "
        f"{server}{sqlite_text}Python {m.python}, SQLAlchemy {m.sqlalchemy}, psycopg "
        f"{m.psycopg}. Load average (1 min) {m.load[0]:.2f} at start, "
        f"{report.load_after:.2f} at the end{others}."
    )
    reproduce = (
        "**Reproduce.** `.venv/bin/python -m bench.consumers` (options: `--events`, "
        "`--sqlite-events`, `--batch-size`, `--daemon-batch-sizes`, `--prefill-chunk`, `--rates`, "
        "`--rounds`, `--writers`, "
        "`--latency-seconds`, `--latency-warmup`, `--sqlite-rates`, `--sqlite-writers`, "
        "`--backends`, `--samples`, `--quick`, `--help`; the "
        f"PostgreSQL server from `{URL_SETTING}`, default `{DEFAULT_URL}`). This run: "
        f"`--events {args.events} --sqlite-events {args.sqlite_events} --batch-size "
        f"{args.batch_size} --daemon-batch-sizes "
        f"{' '.join(str(size) for size in args.daemon_batch_sizes)} --prefill-chunk "
        f"{args.prefill_chunk} --rates "
        f"{' '.join(f'{r:g}' for r in args.rates)} --rounds {args.rounds} --writers "
        f"{args.writers} "
        f"--latency-seconds {args.latency_seconds:g} --latency-warmup "
        f"{args.latency_warmup:g} --sqlite-rates "
        f"{' '.join(f'{r:g}' for r in args.sqlite_rates)} --sqlite-writers "
        f"{args.sqlite_writers} --backends {' '.join(args.backends)}`."
    )
    passes = ", ".join(f"{size:,}" for _, size in _batch_order(args))
    throughput = (
        "**No-op consumer throughput.** `build_finished` events (at_least_once) are "
        f"appended with `herald.outbox.append_many`, {args.prefill_chunk:,} a transaction, "
        "and ordered (PostgreSQL: `Sequencer().cycle(conn)` until it returns 0, then "
        "`ANALYZE`, which autovacuum would do within a minute), then read three ways: "
        "*raw*, the driver alone (psycopg 3; on SQLite the stdlib `sqlite3` plus `json.loads` "
        f"of each payload, which psycopg does for jsonb), pages of {args.batch_size:,} by seq "
        "over `herald_log JOIN herald_events`, every column; *herald read_page*, "
        "`herald.outbox.read_page` with the consumer's topic filter, pages of "
        f"{args.batch_size:,}, nothing delivered; and the *daemon*: "
        "`herald.consumers.Daemon` with one consumer whose handler does nothing (every "
        "setting but `batch_size` the default), timed from `start()` until `wait_for` says "
        "the last seq is finished, once per batch size "
        f"({', '.join(f'{size:,}' for size in args.daemon_batch_sizes)}; "
        f"{DEFAULT_BATCH_SIZE:,} is `Consumer`'s default) in {args.rounds} mirrored "
        f"round(s), in the order {passes}. Each pass is a fresh consumer (its own name, offset 0) "
        "over the same log; afterwards its handler calls, delivery records, distinct seqs "
        "delivered and offset are checked, then its records and consumer row are deleted "
        "(PostgreSQL: and the two tables vacuumed), so every pass starts on the same tables. "
        "Per event, the daemon also calls the handler on its worker thread and writes a "
        "delivery record; it reads a page of half a batch at a time, reads the next while "
        "one is delivered, and its commits thread commits each page's records and offset "
        "while the next is delivered. Its start-up (claiming the consumer) is included. The "
        "daemon's cells give the passes' pooled events/s (events over seconds, all rounds), "
        "then each pass's in run order, in parentheses; the best batch size is in bold. "
        "The benchmark's process runs with `herald run`'s interpreter settings "
        "(`herald.consumers.tune_interpreter()`: the cycle collector's thresholds, a thread "
        "switch interval of 1 ms). The raw read runs before the first "
        "pass and after the last; the ratios use the faster."
    )
    verdict = throughput_verdict(report)
    order = ", ".join(f"{r:g}" for r in _rounds_order(args))
    latency = (
        "**Commit → handler latency (PostgreSQL, the same database afterwards).** "
        f"{args.writers} writer processes share one schedule: one `build_finished` per "
        "transaction (psycopg 3 and `herald.outbox.append`), event *i* due at start + "
        "*i*/rate (absolute: a late writer does not sleep, nor shift what follows), "
        f"{args.latency_seconds:g} s measured per rate, in {args.rounds} mirrored round(s) "
        f"({order}) of {args.latency_seconds / args.rounds:g} s, "
        f"each after {args.latency_warmup:g} s of warm-up (not counted) and with a fresh "
        "daemon and consumer; each writer notes the event's position and `time.time()` "
        "right after `COMMIT` returned. (Several writers, because one writer's own ceiling on this "
        "machine is close to 1,000 transactions/s, see B1.) In the benchmark's process, a "
        "`Daemon` with `herald run`'s defaults runs the sequencer and one consumer with "
        "`Consumer`'s defaults (batch size 500, concurrency 1), started at the head of the "
        "log, whose handler notes `(position, seq, time.time())`. Latency = handler time − "
        "commit time (one clock). "
        "A third process LISTENs on the sequencer's channel: the first NOTIFY whose "
        "payload (the newest seq) covers an event splits its latency into the sequencer's "
        "part and the daemon's. The p50 and p99 cells give the figure over all rounds, then "
        "each round's in parentheses."
    )
    lines = [BEGIN_MARK, "", TITLE, "", dated, "", machine, "", reproduce, ""]
    if report.runs:
        lines += [
            throughput,
            "",
            md_table(THROUGHPUT_HEADER, throughput_rows(report)),
            "",
            *([verdict, ""] if verdict else []),
            *(f"- {note}" for note in throughput_notes(report)),
            "",
        ]
    if report.latencies:
        lines += [
            latency,
            "",
            md_table(LATENCY_HEADER, latency_rows(report)),
            "",
            *(f"- {note}" for note in latency_notes(report)),
            "",
            latency_reading(report),
            "",
        ]
    if report.sqlite_latencies:
        lines += [
            sqlite_latency_text(report),
            "",
            md_table(SQLITE_LATENCY_HEADER, sqlite_latency_rows(report)),
            "",
            *(f"- {note}" for note in sqlite_latency_notes(report)),
            "",
        ]
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def _plain(rows: list[list[str]]) -> list[list[str]]:
    return [[cell.replace("**", "") for cell in row] for row in rows]


def print_report(report: Report) -> None:
    print()
    print("B3 — the consumer daemon")
    if report.runs:
        print(text_table(THROUGHPUT_HEADER, _plain(throughput_rows(report))))
        verdict = throughput_verdict(report)
        if verdict:
            print(verdict.replace("**", ""))
        for note in throughput_notes(report):
            print(f"- {note.replace('**', '')}")
    if report.latencies:
        print()
        print(text_table(LATENCY_HEADER, _plain(latency_rows(report))))
        for note in latency_notes(report):
            print(f"- {note.replace('**', '')}")
        print(latency_reading(report).replace("**", ""))
    if report.sqlite_latencies:
        print()
        print("B9 — commit → handler latency on SQLite (report only)")
        print(text_table(SQLITE_LATENCY_HEADER, _plain(sqlite_latency_rows(report))))
        for note in sqlite_latency_notes(report):
            print(f"- {note.replace('**', '')}")


def samples_record(report: Report) -> dict[str, Any]:
    """Every latency round's per-event samples, for ``bench.plot`` (B5 and B9)."""
    args = report.args
    runs = []
    for lat in report.latencies + report.sqlite_latencies:
        for number, one in enumerate(lat.rounds or [lat], 1):
            runs.append(
                {
                    "backend": one.backend,
                    "rate": one.rate,
                    "round": number,
                    "writers": one.writers,
                    "seconds": one.seconds,
                    # the measured window (s: the warm-up's end until every writer is done)
                    "window": one.window,
                    "achieved_rate": one.achieved_rate,
                    "sent": one.sent,
                    "measured": one.measured,
                    "missing": one.missing,
                    "duplicates": one.duplicates,
                    # [s from the measured window's start to the COMMIT, commit → handler s]
                    "samples": [
                        [round(at - one.started, 4), round(latency, 6)]
                        for at, latency in one.samples
                    ],
                }
            )
    return {
        "benchmark": "B5",
        "script": "bench/consumers.py",
        "measures": "commit → handler latency, seconds",
        "machine": machine_facts(report.machine) | {"sqlite": report.sqlite_version},
        "parameters": {
            "rates": args.rates,
            "sqlite_rates": args.sqlite_rates,
            "rounds": args.rounds,
            "writers": args.writers,
            "sqlite_writers": args.sqlite_writers,
            "latency_seconds": args.latency_seconds,
            "latency_warmup": args.latency_warmup,
            "backends": args.backends,
            "quick": args.quick,
        },
        "targets": {"p50": 0.010, "p99": 0.050},
        "runs": runs,
    }


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.consumers",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (20,000 / 5,000 events, 5 s per latency rate); BENCHMARKS.md is "
        "left alone unless --write is given",
    )
    parser.add_argument(
        "--events", type=int, default=None, help="events on PostgreSQL (default: 200000)"
    )
    parser.add_argument(
        "--sqlite-events", type=int, default=None, help="events on SQLite (default: 50000)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="the page size of the raw and read_page reads (default: 1000)",
    )
    parser.add_argument(
        "--daemon-batch-sizes",
        type=int,
        nargs="+",
        default=[500, 1000, 5000],
        metavar="N",
        help="the no-op consumer's batch sizes, one daemon pass each per round (default: "
        "500 1000 5000; 500 is Consumer's default)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=20_000,
        help="events per pre-fill transaction (default: 20000)",
    )
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[1000.0, 200.0],
        metavar="N",
        help="latency runs: events/s, one run each (default: 1000 200)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="mirrored rounds: of the daemon's batch sizes (500, 1000, 5000, 5000, 1000, "
        "500, ...), a whole pass each, and of the latency rates (1000, 200, 200, 1000, ...), "
        "over which --latency-seconds is split (default: 2)",
    )
    parser.add_argument(
        "--writers",
        type=int,
        default=2,
        help="latency runs: writer processes sharing the schedule (default: 2)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="latency runs: measured seconds each (default: 30)",
    )
    parser.add_argument(
        "--latency-warmup",
        type=float,
        default=None,
        help="latency runs: seconds of warm-up, not counted (default: 2)",
    )
    parser.add_argument(
        "--sqlite-rates",
        type=float,
        nargs="+",
        default=[1000.0, 200.0],
        metavar="N",
        help="latency runs on SQLite: events/s, one run each (default: 1000 200)",
    )
    parser.add_argument(
        "--sqlite-writers",
        type=int,
        default=1,
        help="latency runs on SQLite: writer processes sharing the schedule (default: 1)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("postgresql", "sqlite"),
        default=["postgresql", "sqlite"],
        help="run on these databases (default: postgresql sqlite): throughput and latency on each",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=SAMPLES,
        help="where the latency runs' per-event samples go, as b5.json, for "
        "`python -m bench.plot` (default: bench/samples, git-ignored)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(URL_SETTING, DEFAULT_URL),
        help=f"the PostgreSQL server (default: ${URL_SETTING} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--database", default="herald_bench_consumers", help="scratch PostgreSQL database name"
    )
    parser.add_argument(
        "--sqlite-dir",
        type=Path,
        default=None,
        help="where the SQLite file goes (default: the system's temporary directory)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="the markdown file whose section is rewritten (default: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the section of --output (default: yes, except with --quick)",
    )
    args = parser.parse_args(argv)
    defaults = {
        "events": 20_000 if args.quick else 200_000,
        "sqlite_events": 5_000 if args.quick else 50_000,
        "latency_seconds": 5.0 if args.quick else 30.0,
        "latency_warmup": 1.0 if args.quick else 2.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.write is None:
        args.write = not args.quick
    if (
        min(args.events, args.sqlite_events, args.batch_size, args.prefill_chunk) < 1
        or min(args.daemon_batch_sizes) < 1
    ):
        parser.error(
            "--events, --sqlite-events, --batch-size, --daemon-batch-sizes, --prefill-chunk: "
            "at least 1"
        )
    if (
        min(*args.rates, *args.sqlite_rates) <= 0
        or args.latency_seconds <= 0
        or min(args.writers, args.sqlite_writers, args.rounds) < 1
    ):
        parser.error(
            "--rates, --sqlite-rates, --latency-seconds, --writers, --sqlite-writers and "
            "--rounds must be positive"
        )
    if args.latency_warmup < 0:
        parser.error("--latency-warmup must not be negative")
    args.backends = list(dict.fromkeys(args.backends))
    args.daemon_batch_sizes = list(dict.fromkeys(args.daemon_batch_sizes))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()
    # The daemon logs its start and stop at INFO; warnings and errors are worth seeing.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # The daemons below run as `herald run` runs its own.
    tune_interpreter()

    def log(line: str) -> None:
        print(line, flush=True)

    admin = make_url(args.database_url)
    use_pg = "postgresql" in args.backends
    if use_pg and admin.get_backend_name() != "postgresql":
        raise SystemExit(f"{URL_SETTING}: a postgresql:// URL is needed")
    revision = git_revision()
    digest = source_digest()
    log(f"{revision} (sources {digest})")
    machine = describe_machine(admin, args.database) if use_pg else host_machine()
    runs: list[ThroughputRun] = []
    latencies: list[LatencyRun] = []
    sqlite_latencies: list[LatencyRun] = []
    sqlite_alone: tuple[float, float] | None = None
    alone: tuple[float, float] | None = None
    trip: float | None = None
    sqlite_filesystem = "?"
    for backend in args.backends:
        if backend == "postgresql":
            log(f"PostgreSQL: {args.database} on {admin.render_as_string(hide_password=True)}")
            with scratch_postgresql(admin, args.database) as url:
                runs.append(measure_throughput(backend, url, args.events, args, log))
                trip = round_trip(conninfo(make_url(url)))
                log(f"one round trip (SELECT 1, psycopg): {_ms(trip)} ms")
                top = max(args.rates)
                alone = (top, writers_alone(url, top, args))
                log(f"writers alone at {top:g} events/s: {alone[1]:,.0f} achieved")
                latencies = measure_latencies(url, args, log)
        else:
            with scratch_sqlite(args.sqlite_dir) as url:
                path = Path(make_url(url).database or ".")
                sqlite_filesystem = f"{filesystem_of(path.parent)}, `{path.parent.parent}`"
                log(f"SQLite: {path}")
                runs.append(measure_throughput(backend, url, args.sqlite_events, args, log))
                top = max(args.sqlite_rates)
                sqlite_alone = (top, writers_alone(url, top, args))
                log(f"SQLite writers alone at {top:g} events/s: {sqlite_alone[1]:,.0f} achieved")
                sqlite_latencies = measure_latencies(url, args, log)
    report = Report(args, machine, runs, latencies, alone, trip, revision=revision)
    report.sqlite_latencies, report.sqlite_alone = sqlite_latencies, sqlite_alone
    report.sqlite_filesystem = sqlite_filesystem
    report.digests = (digest, source_digest())
    if report.digests[0] != report.digests[1]:
        log("WARNING: herald's sources changed during the run")
    report.load_after = os.getloadavg()[0]
    if use_pg:
        report.other_sessions_after = describe_machine(admin, args.database).other_sessions
    report.elapsed = time.monotonic() - began
    disturbed = [
        f"{r.backend} batch size {p.batch_size} (round {p.round})"
        for r in runs
        for p in r.passes
        if p.others.get("other", 0.0) >= DISTURBED
    ] + [
        f"{'SQLite ' if lat.backend == 'sqlite' else ''}{lat.rate:g}/s"
        for lat in latencies + sqlite_latencies
        if lat.others.get("other", 0.0) >= DISTURBED
    ]
    if disturbed:
        log(f"WARNING: other processes used the machine during: {', '.join(disturbed)}")
    print_report(report)
    if latencies or sqlite_latencies:
        log(f"\nwrote {write_samples(args.samples, 'b5.json', samples_record(report))}")
    if args.write:
        write_section(args.output, "bench.consumers", markdown(report))
        log(f"\nwrote {args.output}")


if __name__ == "__main__":
    run_script(main)
