"""B1 and B9: append throughput, and insert → reader latency (issues #2 and #6).

Run with ``make bench`` or ``.venv/bin/python -m bench.append_throughput``
(``--help`` for the options; ``--seconds 2 --warmup 0.2 --rounds 1
--latency-seconds 2 --markdown /tmp/b1.md`` for a quick run).

The script creates a scratch PostgreSQL database (``herald_bench_append``,
dropped first and at the end), migrates it as ``herald db upgrade`` does, and
measures in one run:

1. **B1, append transactions/s on PostgreSQL**, with 1 and 8 concurrent
   writers. A transaction is one ``UPDATE bench_builds`` of a random row the
   writer owns plus one event (``build_finished`` in herald's log), committed.
   Five variants do the same work:

   * ``raw``: plain psycopg 3, no SQLAlchemy, no herald: ``UPDATE``, then
     ``INSERT INTO herald_events ... RETURNING position``, commit;
   * ``herald (psycopg)``: the same psycopg connection: ``UPDATE`` through a
     cursor, then :func:`herald.outbox.append` on the psycopg connection,
     commit. Same driver as ``raw``, so herald/raw is herald's own cost: this
     is the issue's first target (herald ≥ 0.8× raw at 8 writers);
   * ``sqlalchemy (no herald)``: an engine from
     :func:`herald.config.create_engine`, ``with engine.begin()``: the
     ``UPDATE`` as ``text()``, then raw's ``INSERT`` through
     ``exec_driver_sql``;
   * ``herald (sqlalchemy)``: the same engine, ``with engine.begin()``: the
     ``UPDATE`` as ``text()``, then :func:`herald.outbox.append`;
   * ``eventsourcing``: the eventsourcing library (9.5) as its users configure
     it for PostgreSQL (``PERSISTENCE_MODULE=eventsourcing.postgres``,
     ``POSTGRES_DBNAME``, ..., ``POSTGRES_SCHEMA=bench_es``, a pool of one
     connection per writer): an ``Application`` whose stock
     ``PostgresApplicationRecorder`` created its own table
     (``bench_es.benchbuilds_events``) in the scratch database. Each writer
     owns its own aggregates, one per build row, created before the run;
     a transaction is one command on one of them (one ``Finished`` event)
     and ``app.save(aggregate, build_update=...)``. The recorder takes
     ``LOCK TABLE ... IN EXCLUSIVE MODE`` and sends a ``NOTIFY`` in every
     transaction, as shipped. The ``UPDATE`` runs in the same transaction
     through the hook the library gives for that (``_insert_events``, where
     its own process recorder writes its tracking row), in a recorder
     subclass chosen with the library's ``APPLICATION_RECORDER_TOPIC``
     setting; nothing of the library is patched. herald (psycopg) /
     eventsourcing is the issue's second target (≥ 3× at 8 writers). After
     the run the rows in the library's table are counted against the
     transactions the writers committed.

   The SQLAlchemy variants both pay SQLAlchemy's own per-transaction cost,
   with or without herald, so herald's cost on SQLAlchemy is
   herald (sqlalchemy) / sqlalchemy (no herald).

   Writers are processes (``multiprocessing``, spawn) by default, so that the
   GIL does not tax the variants that spend more time in Python; the largest
   writer count is run with threads too, in one round (``--thread-check``).
   Each writer count runs the variants in ``--rounds`` mirrored rounds (A B C
   D E E D C B A), each segment measured for ``--seconds / (2 × rounds)``
   after ``--warmup`` seconds, so that drift and the other users of the
   machine hit every variant alike. No sequencer runs during this part: it
   measures the write path alone.

2. **B9, the same on the SQLite default** (``--sqlite``): a migrated SQLite
   file in a temporary directory (``--sqlite-dir``), written through
   ``herald.config.create_engine("sqlite:///...")`` (WAL, ``synchronous=FULL``,
   ``BEGIN IMMEDIATE``), by 1 and 8 writer processes (``--sqlite-writers``):

   * ``raw (sqlite3)``: the stdlib ``sqlite3`` module with the engine's
     pragmas, sending the statements herald's append sends on SQLite
     (``BEGIN IMMEDIATE``, the ``UPDATE``, the next position, the ``INSERT``
     into ``herald_events``, the ``INSERT`` into ``herald_log``: on SQLite the
     writer orders its own events), then ``COMMIT``;
   * ``sqlalchemy (no herald)``: the engine, ``with engine.begin()``: the same
     statements through ``exec_driver_sql``;
   * ``herald (sqlalchemy)``: the engine, ``with engine.begin()``: the
     ``UPDATE``, then :func:`herald.outbox.append`.

   SQLite has one writer at a time: with 8 writers the others wait for the
   write lock in the driver's busy handler (it sleeps and retries; no queue),
   which the report shows as it is, with the measured transactions per
   writer. No target: a report.

3. **Insert → reader latency**: ``herald run`` (the sequencer daemon) in a
   subprocess, one writer process appending ``--rate`` events/s, one event per
   transaction, and a :class:`herald.outbox.LogReader` following the log in
   this process. Latency = the time the reader gets the entry minus the time
   the writer's ``COMMIT`` returned (one clock: same machine).

It prints the tables and verdicts, rewrites its own section of
``BENCHMARKS.md`` (between the ``bench.append_throughput`` markers; the rest
of the file is kept; ``--markdown`` names another file, ``--no-write`` none)
and drops the scratch database.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar
from uuid import UUID

import psycopg
import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from sqlalchemy.engine import URL, make_url

import herald
from bench.common import filesystem_of, markers, run_script, write_section
from herald.config import create_engine
from herald.outbox import LogReader, append, head, sync_catalogue
from herald.schema import SEQUENCER_LOCK_KEY, migrate
from herald.schema.queries import query

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
URL_SETTING: Final = "HERALD_BENCH_DATABASE_URL"
REPO: Final = Path(__file__).resolve().parent.parent
#: the herald package this run measures (normally REPO / "herald")
HERALD_DIR: Final = Path(herald.__file__).resolve().parent
BEGIN_MARK, END_MARK = markers("bench.append_throughput")
TARGET_RATIO: Final = 0.8
#: herald (psycopg) / eventsourcing at the largest writer count, at least
ES_TARGET_RATIO: Final = 3.0
#: the figures the design (ARCHITECTURE.md) quotes for the prototype, for comparison
PROTOTYPE_P50_MS: Final = 7.0
PROTOTYPE_P99_MS: Final = 18.0

RAW_UPDATE: Final = "UPDATE bench_builds SET status = %s, stoptime = %s WHERE id = %s"
RAW_INSERT: Final = (
    "INSERT INTO herald_events (topic, payload, delivery, occurred_at) "
    "VALUES (%s, %s, %s, %s) RETURNING position"
)
SA_UPDATE: Final = sa.text(
    "UPDATE bench_builds SET status = :status, stoptime = :stoptime WHERE id = :id"
)

# What herald's append sends on SQLite for one event (herald/outbox/append.py:
# _insert_sqlite, then _order_on_sqlite), for the B9 variants without herald.
SQLITE_UPDATE: Final = "UPDATE bench_builds SET status = ?, stoptime = ? WHERE id = ?"
SQLITE_LAST_POSITION: Final = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'herald_events'), 0),"
    " coalesce((SELECT max(position) FROM herald_events), 0))"
)
SQLITE_INSERT: Final = (
    "INSERT INTO herald_events (position, topic, payload, delivery, dedupe_key, aggregate_id, "
    "aggregate_version, trace_id, occurred_at, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SQLITE_ORDER: Final = (
    "INSERT INTO herald_log (seq, position) "
    "SELECT (SELECT coalesce(max(seq), 0) FROM herald_log) "
    "+ row_number() OVER (ORDER BY position), position "
    "FROM herald_events WHERE position >= ?"
)
#: the connection settings of herald's SQLite engine (herald.config.create_engine)
SQLITE_PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)

#: the variants on PostgreSQL, in the order a round runs them (then the reverse)
VARIANTS: Final = ("raw", "herald_psycopg", "sqlalchemy", "herald_sqlalchemy", "eventsourcing")
#: the variants on SQLite (B9)
SQLITE_VARIANTS: Final = ("sqlite_raw", "sqlite_sqlalchemy", "sqlite_herald")
LABELS: Final = {
    "raw": "raw",
    "herald_psycopg": "herald (psycopg)",
    "sqlalchemy": "sqlalchemy (no herald)",
    "herald_sqlalchemy": "herald (sqlalchemy)",
    "eventsourcing": "eventsourcing",
    "sqlite_raw": "raw (sqlite3)",
    "sqlite_sqlalchemy": "sqlalchemy (no herald)",
    "sqlite_herald": "herald (sqlalchemy)",
}
#: (numerator, denominator) of the ratios reported; the first two are the targets'
RATIOS: Final = (
    ("herald_psycopg", "raw"),
    ("herald_psycopg", "eventsourcing"),
    ("herald_sqlalchemy", "sqlalchemy"),
    ("herald_sqlalchemy", "raw"),
)
SQLITE_RATIOS: Final = (
    ("sqlite_herald", "sqlite_raw"),
    ("sqlite_herald", "sqlite_sqlalchemy"),
    ("sqlite_sqlalchemy", "sqlite_raw"),
)

#: where the eventsourcing variant's tables live, away from herald's
ES_SCHEMA: Final = "bench_es"
ES_VERSION: Final = importlib.metadata.version("eventsourcing")

#: the variant of the message a writer sends once it is connected
READY: Final = "ready"

T = TypeVar("T")


class Channel(Protocol[T]):
    """What the writers need of a queue: ``queue.Queue`` or ``multiprocessing.Queue``."""

    def put(self, item: T, /) -> None: ...

    def get(self, block: bool = True, timeout: float | None = None) -> T: ...


# -- the eventsourcing variant ---------------------------------------------------


class BenchBuild(Aggregate):
    """A build as an eventsourcing aggregate: created once, then one ``Finished``
    event per transaction of the eventsourcing variant."""

    def __init__(self, build_id: int) -> None:
        self.build_id = build_id
        self.status: int | None = None
        self.stoptime: int | None = None

    @event("Finished")
    def finish(self, status: int, stoptime: int) -> None:
        self.status = status
        self.stoptime = stoptime


class BuildUpdatingRecorder(PostgresApplicationRecorder):
    """eventsourcing's stock PostgreSQL application recorder, plus the build update.

    ``_insert_events`` is the library's hook for writes that must share the
    events' transaction (its own ``PostgresProcessRecorder`` writes its
    tracking row there); ``Application.save(..., **kwargs)`` hands its keyword
    arguments down to it. Everything else, the ``LOCK TABLE ... IN EXCLUSIVE
    MODE`` and the ``NOTIFY`` included, is the library's own code.
    """

    def _insert_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        update = kwargs.get("build_update")
        if update is not None:
            curs.execute(RAW_UPDATE, update)
        super()._insert_events(curs, stored_events, **kwargs)


class BenchBuilds(Application[UUID]):
    """The eventsourcing application the variant saves through (its table:
    ``bench_es.benchbuilds_events``)."""

    name = "BenchBuilds"


ES_TABLE: Final = f"{ES_SCHEMA}.{BenchBuilds.name.lower()}_events"


def eventsourcing_env(url: URL, *, create_table: bool) -> dict[str, str]:
    """The library's settings for ``url``'s database: one pooled connection, our schema."""
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.database or "",
        "POSTGRES_HOST": url.host or "localhost",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_PASSWORD": url.password or "",
        "POSTGRES_SCHEMA": ES_SCHEMA,
        # one connection per writer, like the other variants
        "POSTGRES_POOL_SIZE": "1",
        "POSTGRES_MAX_OVERFLOW": "0",
        # the class as this process knows it (``__main__`` or ``__mp_main__`` when run
        # with -m): the topic resolves to the module already imported
        "APPLICATION_RECORDER_TOPIC": get_topic(BuildUpdatingRecorder),
        "CREATE_TABLE": "y" if create_table else "n",
    }


def create_eventsourcing_tables(url: URL) -> None:
    """The schema, then the library's own tables, types and function in it."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ES_SCHEMA}")
    app = BenchBuilds(env=eventsourcing_env(url, create_table=True))
    app.close()


@dataclass(frozen=True, slots=True)
class EventsourcingCheck:
    """What the library's table holds after the run, against what the writers committed."""

    rows: int
    max_notification_id: int
    created: int
    committed: int

    @property
    def ok(self) -> bool:
        return self.rows == self.created + self.committed

    def sentence(self) -> str:
        verdict = "they match" if self.ok else "**they do not match**"
        return (
            f"Rows check: `{ES_TABLE}` holds {self.rows:,} rows (notification ids up to "
            f"{self.max_notification_id:,}); the writers created {self.created:,} aggregates "
            f"(one event each) and committed {self.committed:,} eventsourcing transactions "
            f"(warm-ups included): {self.created + self.committed:,} events expected, {verdict}."
        )


def check_eventsourcing(url: URL, created: int, committed: int) -> EventsourcingCheck:
    with psycopg.connect(conninfo(url)) as conn:
        row = conn.execute(
            f"SELECT count(*), coalesce(max(notification_id), 0) FROM {ES_TABLE}"
        ).fetchone()
    rows, top = (int(row[0]), int(row[1])) if row else (0, 0)
    return EventsourcingCheck(rows, top, created, committed)


# -- the writers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """One timed stretch of one variant, sent to every writer that takes part."""

    variant: str  # one of VARIANTS
    writers: int
    #: time.monotonic() at which the warm-up starts (CLOCK_MONOTONIC is system-wide)
    start_at: float
    warmup: float
    seconds: float
    number: int


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """What one writer did in one segment's measured window."""

    writer: int
    variant: str
    transactions: int
    #: seconds per transaction, measured ones only
    durations: list[float]
    #: CPU seconds this writer's thread spent in the measured window
    cpu: float
    error: str | None = None
    #: every transaction committed in the segment, warm-up included (in the READY
    #: message: the eventsourcing aggregates the writer created)
    committed: int = 0
    #: seconds, the longest transaction of the segment, warm-up included
    longest: float = 0.0


def _raw_insert_params(build_id: int) -> tuple[Any, ...]:
    return (
        "build_finished",
        Jsonb({"build_id": build_id, "dependent_ids": []}),
        "at_least_once",
        datetime.now(UTC),
    )


class Writer:
    """One writer's connections: plain psycopg, an engine from herald's config, and
    (``eventsourcing_rows``) an eventsourcing application with one aggregate per build
    row, created here in one transaction."""

    def __init__(self, conninfo: str, url: str, *, eventsourcing_rows: int = 0) -> None:
        self.raw = psycopg.connect(conninfo)
        self.cursor = self.raw.cursor()
        self.engine = create_engine(url)
        self.transactions: dict[str, Callable[[int, int], None]] = {
            "raw": self.raw_transaction,
            "herald_psycopg": self.herald_psycopg_transaction,
            "sqlalchemy": self.sqlalchemy_transaction,
            "herald_sqlalchemy": self.herald_sqlalchemy_transaction,
        }
        self.app: BenchBuilds | None = None
        self.aggregates: dict[int, BenchBuild] = {}
        if eventsourcing_rows:
            self.app = BenchBuilds(env=eventsourcing_env(make_url(url), create_table=False))
            # This writer's own aggregates (new UUIDs): no two writers share one.
            self.aggregates = {i: BenchBuild(i) for i in range(1, eventsourcing_rows + 1)}
            self.app.save(*self.aggregates.values())
            self.transactions["eventsourcing"] = self.eventsourcing_transaction

    def raw_transaction(self, build_id: int, status: int) -> None:
        self.cursor.execute(RAW_UPDATE, (status, int(time.time()), build_id))
        self.cursor.execute(RAW_INSERT, _raw_insert_params(build_id))
        self.cursor.fetchone()
        self.raw.commit()

    def herald_psycopg_transaction(self, build_id: int, status: int) -> None:
        self.cursor.execute(RAW_UPDATE, (status, int(time.time()), build_id))
        append(self.raw, "build_finished", {"build_id": build_id, "dependent_ids": []})
        self.raw.commit()

    def sqlalchemy_transaction(self, build_id: int, status: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                SA_UPDATE, {"status": status, "stoptime": int(time.time()), "id": build_id}
            )
            conn.exec_driver_sql(RAW_INSERT, _raw_insert_params(build_id)).scalar_one()

    def herald_sqlalchemy_transaction(self, build_id: int, status: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                SA_UPDATE, {"status": status, "stoptime": int(time.time()), "id": build_id}
            )
            append(conn, "build_finished", {"build_id": build_id, "dependent_ids": []})

    def eventsourcing_transaction(self, build_id: int, status: int) -> None:
        assert self.app is not None
        build = self.aggregates[build_id]
        stoptime = int(time.time())
        build.finish(status, stoptime)  # one pending event
        # one transaction: the UPDATE, the library's lock, NOTIFY and INSERT, commit
        self.app.save(build, build_update=(status, stoptime, build_id))

    def close(self) -> None:
        self.cursor.close()
        self.raw.close()
        self.engine.dispose()
        if self.app is not None:
            self.app.close()


def _sqlite_insert_params(position: int, build_id: int) -> tuple[Any, ...]:
    # herald's engine stores datetimes as SQLAlchemy's SQLite DateTime does: UTC text
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    payload = json.dumps({"build_id": build_id, "dependent_ids": []})
    return (position, "build_finished", payload, "at_least_once", None, None, None, None, now, now)


class SqliteWriter:
    """One writer on the SQLite file (B9): the stdlib's sqlite3 alone, with the settings
    of herald's engine, and an engine from herald's config."""

    def __init__(self, path: str, url: str) -> None:
        # isolation_level=None: the transactions below say BEGIN IMMEDIATE themselves,
        # as herald's engine does; timeout: the engine's busy timeout
        self.raw = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        for pragma in SQLITE_PRAGMAS:
            self.raw.execute(pragma)
        self.engine = create_engine(url)
        self.transactions: dict[str, Callable[[int, int], None]] = {
            "sqlite_raw": self.raw_transaction,
            "sqlite_sqlalchemy": self.sqlalchemy_transaction,
            "sqlite_herald": self.herald_transaction,
        }

    def raw_transaction(self, build_id: int, status: int) -> None:
        conn = self.raw
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SQLITE_UPDATE, (status, int(time.time()), build_id))
            position = int(conn.execute(SQLITE_LAST_POSITION).fetchone()[0]) + 1
            conn.execute(SQLITE_INSERT, _sqlite_insert_params(position, build_id))
            conn.execute(SQLITE_ORDER, (position,))
            conn.execute("COMMIT")
        except BaseException:
            # an open write transaction would hold the file's write lock
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def sqlalchemy_transaction(self, build_id: int, status: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                SA_UPDATE, {"status": status, "stoptime": int(time.time()), "id": build_id}
            )
            position = int(conn.exec_driver_sql(SQLITE_LAST_POSITION).scalar_one()) + 1
            conn.exec_driver_sql(SQLITE_INSERT, _sqlite_insert_params(position, build_id))
            conn.exec_driver_sql(SQLITE_ORDER, (position,))

    def herald_transaction(self, build_id: int, status: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                SA_UPDATE, {"status": status, "stoptime": int(time.time()), "id": build_id}
            )
            append(conn, "build_finished", {"build_id": build_id, "dependent_ids": []})

    def close(self) -> None:
        self.raw.close()
        self.engine.dispose()


def run_segment(
    writer: Writer | SqliteWriter, index: int, rows: int, segment: Segment
) -> SegmentResult:
    """Run one segment: warm up, then count the commits that end in the window."""
    ids = [i for i in range(1, rows + 1) if i % segment.writers == index]
    rng = random.Random(segment.number * 1000 + index)
    transaction = writer.transactions[segment.variant]
    started = time.monotonic()
    transaction(rng.choice(ids), rng.randrange(4))  # the first of a kind pays for preparing
    longest = time.monotonic() - started
    committed = 1
    delay = segment.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    measure_from = segment.start_at + segment.warmup
    stop_at = measure_from + segment.seconds
    durations: list[float] = []
    cpu_start: float | None = None
    cpu_end = 0.0
    while True:
        started = time.monotonic()
        if started >= stop_at:
            break
        if cpu_start is None and started >= measure_from:
            cpu_start = time.thread_time()
        transaction(rng.choice(ids), rng.randrange(4))
        committed += 1
        ended = time.monotonic()
        longest = max(longest, ended - started)
        if started >= measure_from and ended <= stop_at:
            durations.append(ended - started)
            cpu_end = time.thread_time()
    cpu = cpu_end - cpu_start if cpu_start is not None and durations else 0.0
    return SegmentResult(
        index, segment.variant, len(durations), durations, cpu, None, committed, longest
    )


#: what a pool's writers write to: herald's tables on PostgreSQL (B1), the same plus
#: the eventsourcing application's, or an SQLite file (B9)
BACKENDS: Final = ("postgresql", "eventsourcing", "sqlite")


def writer_main(
    index: int,
    conninfo: str,
    url: str,
    rows: int,
    commands: Channel[Segment | None],
    results: Channel[SegmentResult],
    backend: str = "postgresql",
) -> None:
    """A writer's life: connect once, run the segments it is sent, stop on None.

    ``conninfo`` is the file's path for ``backend="sqlite"``.
    """
    writer: Writer | SqliteWriter
    try:
        if backend == "sqlite":
            writer = SqliteWriter(conninfo, url)
        else:
            es_rows = rows if backend == "eventsourcing" else 0
            writer = Writer(conninfo, url, eventsourcing_rows=es_rows)
    except Exception as exc:
        results.put(SegmentResult(index, READY, 0, [], 0.0, f"connect: {exc!r}"))
        return
    created = len(writer.aggregates) if isinstance(writer, Writer) else 0
    results.put(SegmentResult(index, READY, 0, [], 0.0, None, created))
    try:
        while (segment := commands.get()) is not None:
            try:
                results.put(run_segment(writer, index, rows, segment))
            except Exception as exc:
                results.put(SegmentResult(index, segment.variant, 0, [], 0.0, repr(exc)))
    finally:
        writer.close()


class WriterPool:
    """``size`` long-lived writers, as processes or threads, each with its own connections.

    ``backend``: one of BACKENDS; ``"eventsourcing"`` needs the library's tables
    (:func:`create_eventsourcing_tables`), ``"sqlite"`` takes the file's path as
    ``conninfo``.
    """

    def __init__(
        self,
        executor: str,
        size: int,
        conninfo: str,
        url: str,
        rows: int,
        *,
        backend: str = "postgresql",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        self.executor = executor
        self.size = size
        self.backend = backend
        self._handles: list[mp.process.BaseProcess | threading.Thread] = []
        self.commands: list[Channel[Segment | None]] = []
        self.results: Channel[SegmentResult]
        if executor == "process":
            ctx = mp.get_context("spawn")
            self.results = ctx.Queue()
            for index in range(size):
                commands: Channel[Segment | None] = ctx.Queue()
                proc = ctx.Process(
                    target=writer_main,
                    args=(index, conninfo, url, rows, commands, self.results, backend),
                    name=f"bench-writer-{index}",
                    daemon=True,
                )
                proc.start()
                self.commands.append(commands)
                self._handles.append(proc)
        else:
            self.results = queue.Queue()
            for index in range(size):
                local: Channel[Segment | None] = queue.Queue()
                thread = threading.Thread(
                    target=writer_main,
                    args=(index, conninfo, url, rows, local, self.results, backend),
                    name=f"bench-writer-{index}",
                    daemon=True,
                )
                thread.start()
                self.commands.append(local)
                self._handles.append(thread)

        # Spawned processes import SQLAlchemy and herald first: wait for all of them.
        ready = [self.results.get(timeout=120) for _ in range(size)]
        errors = [f"writer {r.writer}: {r.error}" for r in ready if r.error]
        if errors:
            self.close()
            raise RuntimeError("; ".join(errors))
        #: eventsourcing aggregates the writers created (one event each)
        self.created = sum(r.committed for r in ready)

    def run(self, segment: Segment) -> list[SegmentResult]:
        """Send ``segment`` to its first ``segment.writers`` writers; their results."""
        # Long enough for every writer to get the command and run its warming transaction.
        lead = 0.5
        segment = replace(segment, start_at=time.monotonic() + lead)
        for index in range(segment.writers):
            self.commands[index].put(segment)
        deadline = lead + segment.warmup + segment.seconds + 60
        found = [self.results.get(timeout=deadline) for _ in range(segment.writers)]
        errors = [f"writer {r.writer}: {r.error}" for r in found if r.error]
        if errors:
            raise RuntimeError("; ".join(errors))
        return found

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for handle in self._handles:
            handle.join(timeout=10)


# -- throughput ----------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    """One (executor, writers, variant) cell of the table, over all its segments."""

    executor: str
    writers: int
    variant: str
    seconds: float = 0.0
    transactions: int = 0
    cpu: float = 0.0
    durations: list[float] = field(default_factory=list)
    #: tx/s of each segment, in the order run
    segments: list[float] = field(default_factory=list)
    #: every transaction committed, warm-ups included
    committed: int = 0
    #: measured transactions by writer index (how evenly the writers got through)
    by_writer: dict[int, int] = field(default_factory=dict)
    #: seconds, the longest single transaction, warm-ups included
    longest: float = 0.0

    def add(self, seconds: float, results: Sequence[SegmentResult]) -> None:
        count = sum(r.transactions for r in results)
        self.seconds += seconds
        self.transactions += count
        self.committed += sum(r.committed for r in results)
        self.longest = max([self.longest, *(r.longest for r in results)])
        for result in results:
            self.by_writer[result.writer] = (
                self.by_writer.get(result.writer, 0) + result.transactions
            )
        self.cpu += sum(r.cpu for r in results)
        for result in results:
            self.durations.extend(result.durations)
        self.segments.append(count / seconds)

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_tx(self) -> float:
        return 1e6 * self.cpu / self.transactions if self.transactions else 0.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def measure_throughput(
    pool: WriterPool,
    writers: int,
    warmup: float,
    seconds: float,
    rounds: int,
    log: Callable[[str], None],
    variants: Sequence[str] = VARIANTS,
) -> dict[str, Throughput]:
    """``rounds`` × (A B C ... C B A) over ``variants``; ``seconds`` per variant in all."""
    cells = {v: Throughput(pool.executor, writers, v) for v in variants}
    length = seconds / (2 * rounds)
    order = (*variants, *reversed(variants)) * rounds
    for number, variant in enumerate(order):
        results = pool.run(Segment(variant, writers, 0.0, warmup, length, number))
        cells[variant].add(length, results)
        log(
            f"  {pool.executor:7} {writers} writer(s) {LABELS[variant]:22}: "
            f"{cells[variant].segments[-1]:8.0f} tx/s"
        )
    return cells


def round_ratios(num: Throughput, den: Throughput) -> list[float]:
    """num/den within each round (each variant has two segments a round)."""
    ratios = []
    for i in range(0, min(len(num.segments), len(den.segments)) - 1, 2):
        base = den.segments[i] + den.segments[i + 1]
        ratios.append((num.segments[i] + num.segments[i + 1]) / base if base else 0.0)
    return ratios


def ratio(num: Throughput, den: Throughput) -> float:
    return num.rate / den.rate if den.rate else 0.0


# -- latency -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencyWriterResult:
    #: (bench_seq, wall-clock time the COMMIT returned)
    commits: list[tuple[int, float]]
    error: str | None = None


def latency_writer_main(
    url: str, rows: int, rate: float, count: int, start_at: float, results: Channel[Any]
) -> None:
    """Append ``count`` events at ``rate``/s from ``start_at`` on, one per transaction."""
    commits: list[tuple[int, float]] = []
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        for seq in range(count):
            delay = start_at + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            payload = {
                "build_id": seq % rows + 1,
                "dependent_ids": [],
                "bench_seq": seq,
                "sent_at": time.time(),
            }
            with engine.begin() as conn:
                append(conn, "build_finished", payload)
            commits.append((seq, time.time()))
        engine.dispose()
    except Exception as exc:
        results.put(LatencyWriterResult(commits, repr(exc)))
        return
    results.put(LatencyWriterResult(commits))


@dataclass(slots=True)
class Latency:
    rate: float = 0.0
    seconds: float = 0.0
    sent: int = 0
    #: commit → LogReader.follow() yields the entry, seconds, after the warm-up
    reader: list[float] = field(default_factory=list)
    #: commit → the sequencer's NOTIFY for its seq reaches a plain LISTEN connection
    notified: list[float] = field(default_factory=list)
    missing: int = 0
    duplicates: int = 0
    catch_up_events: int = 0
    catch_up_seconds: float = 0.0
    sequencer_idle_cpu: float = 0.0  # % of one core
    sequencer_busy_cpu: float = 0.0
    #: server sessions opened in the bench database while the reader followed
    sessions_opened: int = 0
    follow_seconds: float = 0.0
    #: records herald.wakeup logged (at any level) saying its listening connection failed
    waker_failures: int = 0


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "failed" in record.getMessage():
            self.count += 1


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # after the command name: state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _herald_command() -> list[str]:
    script = Path(sys.executable).with_name("herald")
    if script.exists():
        return [str(script)]
    found = shutil.which("herald")
    if found:
        return [found]
    return [sys.executable, "-c", "from herald.cli import main; main()"]


@contextmanager
def herald_daemon(url: str, log: Callable[[str], None]) -> Iterator[subprocess.Popen[bytes]]:
    """``herald run`` in a subprocess; SIGTERM on the way out."""
    env = dict(os.environ, HERALD_DATABASE_URL=url)
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [*_herald_command(), "run"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-5:]
            if proc.returncode not in (0, -15):
                log(f"  herald run exited with {proc.returncode}: {' / '.join(tail)}")


def _sessions(url: str, database: str | None) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
    return int(row[0]) if row else 0


class Follower:
    """The reader under test (``LogReader.follow``) and, beside it, a plain LISTEN."""

    def __init__(self, engine: sa.Engine, url: str, after: int) -> None:
        self.engine = engine
        self.url = url
        self.after = after
        self.stop = threading.Event()
        #: bench_seq → (receive time, seq)
        self.received: dict[int, tuple[float, int]] = {}
        self.duplicates = 0
        #: (time, payload = newest seq) of every NOTIFY on herald_log
        self.notified: list[tuple[float, int]] = []
        self._payloads: list[int] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._follow, name="bench-reader", daemon=True),
            threading.Thread(target=self._listen, name="bench-listener", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _follow(self) -> None:
        try:
            for entry in LogReader(self.engine).follow(after=self.after, stop=self.stop):
                now = time.time()
                seq = entry.payload.get("bench_seq")
                if not isinstance(seq, int):
                    continue
                if seq in self.received:
                    self.duplicates += 1
                else:
                    self.received[seq] = (now, entry.seq)
        except Exception as exc:
            self.errors.append(f"reader: {exc!r}")

    def _listen(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("LISTEN herald_log")
                while not self.stop.is_set():
                    for note in conn.notifies(timeout=0.2):
                        self.notified.append((time.time(), int(note.payload)))
        except Exception as exc:
            self.errors.append(f"listener: {exc!r}")

    def notified_at(self, seq: int) -> float | None:
        """When the first NOTIFY covering ``seq`` arrived (call after :meth:`close`)."""
        if len(self._payloads) != len(self.notified):
            # One sequencer sends them, in commit order: the payloads only grow.
            self._payloads = [payload for _, payload in self.notified]
        i = bisect.bisect_left(self._payloads, seq)
        return self.notified[i][0] if i < len(self.notified) else None

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


def _wait_for_sequencer(engine: sa.Engine, daemon: subprocess.Popen[bytes], total: int) -> None:
    started = time.monotonic()
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"herald run exited with status {daemon.returncode}")
        with engine.connect() as conn:
            last = conn.execute(
                sa.text("SELECT last_seq FROM herald_sequencer WHERE id = 1")
            ).scalar_one()
            holder = conn.execute(query("sequencer_holder"), {"key": SEQUENCER_LOCK_KEY}).scalar()
        if holder is not None and last >= total:
            return
        if time.monotonic() - started > 120:
            raise RuntimeError(f"the sequencer ordered {last} of {total} events in 120 s")
        time.sleep(0.05)


def measure_latency(
    url: URL, rows: int, rate: float, seconds: float, warmup: float, log: Callable[[str], None]
) -> Latency:
    """``herald run`` + a writer process at ``rate``/s + ``LogReader.follow`` here."""
    result = Latency(rate=rate, seconds=seconds)
    url_text = url.render_as_string(hide_password=False)
    engine = create_engine(url_text)  # a string: herald picks the driver
    counter = _Counter()
    wakeup_log = logging.getLogger("herald.wakeup")
    wakeup_log.addHandler(counter)
    wakeup_log.setLevel(logging.DEBUG)
    try:
        with engine.connect() as conn:
            total = int(conn.execute(sa.text("SELECT count(*) FROM herald_events")).scalar_one())
        result.catch_up_events = total
        with herald_daemon(url_text, log) as daemon:
            started = time.monotonic()
            _wait_for_sequencer(engine, daemon, total)
            result.catch_up_seconds = time.monotonic() - started
            log(
                f"  herald run ordered the {total} events left by the throughput runs "
                f"in {result.catch_up_seconds:.1f} s (including its start-up)"
            )
            with engine.connect() as conn:
                # What autovacuum would do within a minute: without statistics for
                # the freshly filled herald_log, the reader's page query is planned
                # as a hash join over a sequential scan of herald_events.
                conn.execute(sa.text("ANALYZE herald_events, herald_log"))
                conn.commit()
                after = head(conn)
            sessions_before, follow_started = _sessions(url_text, url.database), time.monotonic()
            follower = Follower(engine, url_text, after)
            count = round(rate * (warmup + seconds))
            ctx = mp.get_context("spawn")
            results: Channel[Any] = ctx.Queue()
            start_at = time.monotonic() + 3.0
            writer = ctx.Process(
                target=latency_writer_main,
                args=(url_text, rows, rate, count, start_at, results),
                name="bench-latency-writer",
                daemon=True,
            )
            writer.start()
            # The sequencer's cost while nothing is written (the reader is waiting).
            time.sleep(0.5)
            cpu0, t0 = _proc_cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(max(0.1, start_at - time.monotonic() - 0.1))
            cpu1, t1 = _proc_cpu_seconds(daemon.pid), time.monotonic()
            result.sequencer_idle_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
            time.sleep(max(0.0, start_at + warmup - time.monotonic()))
            cpu2, t2 = _proc_cpu_seconds(daemon.pid), time.monotonic()
            done: LatencyWriterResult = results.get(timeout=warmup + seconds + 60)
            cpu3, t3 = _proc_cpu_seconds(daemon.pid), time.monotonic()
            result.sequencer_busy_cpu = 100 * (cpu3 - cpu2) / (t3 - t2)
            writer.join(timeout=10)
            if done.error:
                raise RuntimeError(f"latency writer: {done.error}")
            wait_until = time.monotonic() + 10
            while len(follower.received) < len(done.commits) and time.monotonic() < wait_until:
                time.sleep(0.05)
            follower.close()
            result.follow_seconds = time.monotonic() - follow_started
            # less one: the session that reads the count
            result.sessions_opened = _sessions(url_text, url.database) - sessions_before - 1
            if follower.errors:
                raise RuntimeError("; ".join(follower.errors))
    finally:
        wakeup_log.removeHandler(counter)
        engine.dispose()
    result.waker_failures = counter.count
    skip = round(rate * warmup)
    result.sent = len(done.commits)
    result.missing = sum(1 for seq, _ in done.commits if seq not in follower.received)
    result.duplicates = follower.duplicates
    for seq, committed in done.commits:
        if seq < skip or seq not in follower.received:
            continue
        received, log_seq = follower.received[seq]
        result.reader.append(received - committed)
        notified = follower.notified_at(log_seq)
        if notified is not None:
            result.notified.append(notified - committed)
    return result


# -- the database ---------------------------------------------------------------


def conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _quote(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise SystemExit(f"--database: {name!r} is not a plain lower-case name")
    return f'"{name}"'


def create_scratch(admin: URL, name: str, rows: int) -> URL:
    """Drop and create ``name``, migrate it like ``herald db upgrade``, add ``bench_builds``."""
    with psycopg.connect(conninfo(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {_quote(name)}")
    url = admin.set(database=name)
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn)
            with conn.begin():
                sync_catalogue(conn)
            with conn.begin():
                conn.execute(
                    sa.text(
                        "CREATE TABLE bench_builds ("
                        " id integer PRIMARY KEY, status integer, stoptime integer)"
                    )
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO bench_builds (id, status, stoptime) "
                        "SELECT g, NULL, NULL FROM generate_series(1, :rows) AS g"
                    ),
                    {"rows": rows},
                )
            conn.execute(sa.text("ANALYZE bench_builds"))
            conn.commit()
    finally:
        engine.dispose()
    return url


def drop_scratch(admin: URL, name: str) -> None:
    with psycopg.connect(conninfo(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")


@contextmanager
def scratch_sqlite(directory: Path | None, rows: int) -> Iterator[tuple[str, str]]:
    """A migrated SQLite file with ``bench_builds``, in a temporary directory deleted on
    the way out: (its path, its URL)."""
    with tempfile.TemporaryDirectory(prefix="herald-bench-append-", dir=directory) as where:
        path = str(Path(where) / "herald.db")
        url = f"sqlite:///{path}"
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                migrate.upgrade(conn)
                with conn.begin():
                    sync_catalogue(conn)
                with conn.begin():
                    conn.execute(
                        sa.text(
                            "CREATE TABLE bench_builds ("
                            " id integer PRIMARY KEY, status integer, stoptime integer)"
                        )
                    )
                    conn.execute(
                        sa.text("INSERT INTO bench_builds (id) VALUES (:id)"),
                        [{"id": i} for i in range(1, rows + 1)],
                    )
        finally:
            engine.dispose()
        yield path, url


@dataclass(frozen=True, slots=True)
class SqliteCheck:
    """The SQLite log after the B9 runs: every event ordered once, seq dense."""

    events: int
    entries: int
    max_seq: int
    committed: int

    @property
    def ok(self) -> bool:
        return self.events == self.entries == self.max_seq == self.committed

    def sentence(self) -> str:
        verdict = "all equal" if self.ok else "**not all equal**"
        return (
            f"Log check: the writers committed {self.committed:,} transactions (warm-ups "
            f"included); the file holds {self.events:,} events and {self.entries:,} log "
            f"entries, seq up to {self.max_seq:,}: {verdict}."
        )


def check_sqlite(path: str, committed: int) -> SqliteCheck:
    conn = sqlite3.connect(path)
    try:
        events = int(conn.execute("SELECT count(*) FROM herald_events").fetchone()[0])
        entries, top = conn.execute(
            "SELECT count(*), coalesce(max(seq), 0) FROM herald_log"
        ).fetchone()
    finally:
        conn.close()
    return SqliteCheck(events, int(entries), int(top), committed)


@dataclass(frozen=True, slots=True)
class Machine:
    cores: int
    cpu_model: str
    ram_gib: float
    os: str
    python: str
    sqlalchemy: str
    psycopg: str
    server_version: str
    settings: dict[str, str]
    load: tuple[float, float, float]
    other_sessions: int


SETTINGS: Final = (
    "synchronous_commit",
    "fsync",
    "shared_buffers",
    "wal_level",
    "max_connections",
    "commit_delay",
)


def describe_machine(admin: URL, scratch: str) -> Machine:
    ram = 0.0
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024 / 1024
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(conninfo(admin), autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings: dict[str, str] = {}
        for name in SETTINGS:
            row = conn.execute(f"SHOW {name}").fetchone()
            settings[name] = str(row[0]) if row else "?"
        others = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND datname IS DISTINCT FROM %s",
            (scratch,),
        ).fetchone()
    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=model,
        ram_gib=ram,
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        sqlalchemy=sa.__version__,
        psycopg=f"{psycopg.__version__} (libpq {psycopg.pq.version()}, {psycopg.pq.__impl__})",
        server_version=str(version[0]) if version else "?",
        settings=settings,
        load=os.getloadavg(),
        other_sessions=int(others[0]) if others else 0,
    )


def source_digest() -> str:
    """A digest of the imported herald's sources (``*.py``, ``*.sql``), to notice edits."""
    digest = hashlib.sha256()
    for path in sorted(HERALD_DIR.rglob("*")):
        if path.suffix in (".py", ".sql") and path.is_file():
            digest.update(path.relative_to(HERALD_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_revision() -> str:
    """The commit the imported herald is at, and whether it has uncommitted changes."""
    where = HERALD_DIR.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "herald"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"herald from `{where}` (not a git checkout)"
    files = [line[3:] for line in changed if line.strip()]
    if not files:
        return f"herald at commit `{commit}`"
    return f"herald at commit `{commit}` with uncommitted changes in " + ", ".join(
        f"`{f}`" for f in files
    )


# -- report ----------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    args: argparse.Namespace
    machine: Machine
    cells: list[Throughput]
    latency: Latency | None
    elapsed: float = 0.0
    other_sessions_after: int = 0
    revision: str = "?"
    #: digest of herald's sources at the start and at the end of the run
    digests: tuple[str, str] = ("?", "?")
    eventsourcing_check: EventsourcingCheck | None = None
    #: B9: the cells on SQLite (writers are always processes there)
    sqlite_cells: list[Throughput] = field(default_factory=list)
    sqlite_check: SqliteCheck | None = None
    sqlite_filesystem: str = "?"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


PLURAL: Final = {"process": "processes", "thread": "threads"}


def _groups(
    cells: Sequence[Throughput], variants: Sequence[str] = VARIANTS
) -> dict[tuple[str, int], dict[str, Throughput]]:
    """The cells by (executor, writers), then by variant, in the order run."""
    groups: dict[tuple[str, int], dict[str, Throughput]] = {}
    for cell in cells:
        groups.setdefault((cell.executor, cell.writers), {})[cell.variant] = cell
    return {key: found for key, found in groups.items() if all(v in found for v in variants)}


def _ratio_label(num: str, den: str) -> str:
    return f"{LABELS[num]} / {LABELS[den]}"


def _ratio_cell(num: Throughput, den: Throughput) -> str:
    rounds = round_ratios(num, den)
    shown = f"{ratio(num, den):.2f}"
    if len(rounds) > 1:
        shown += " (" + ", ".join(f"{x:.2f}" for x in rounds) + ")"
    return shown


def _throughput_header(variants: Sequence[str], ratios: Sequence[tuple[str, str]]) -> list[str]:
    return [
        "writers",
        "writers are",
        *(f"{LABELS[v]} tx/s" for v in variants),
        *(_ratio_label(num, den) for num, den in ratios),
    ]


THROUGHPUT_HEADER: Final = _throughput_header(VARIANTS, RATIOS)
SQLITE_HEADER: Final = _throughput_header(SQLITE_VARIANTS, SQLITE_RATIOS)


def throughput_rows(
    cells: Sequence[Throughput],
    variants: Sequence[str] = VARIANTS,
    ratios: Sequence[tuple[str, str]] = RATIOS,
) -> list[list[str]]:
    rows = []
    for (executor, writers), found in _groups(cells, variants).items():
        rows.append(
            [
                str(writers),
                PLURAL[executor],
                *(f"{found[v].rate:,.0f}" for v in variants),
                *(_ratio_cell(found[num], found[den]) for num, den in ratios),
            ]
        )
    return rows


def _spread(cell: Throughput) -> str:
    counts = cell.by_writer.values()
    return f"{min(counts):,} – {max(counts):,}" if counts else "-"


DETAIL_HEADER: Final = [
    "writers",
    "writers are",
    "variant",
    "tx/s",
    "ms/tx p50 / p99",
    "client CPU µs/tx",
    "tx per writer, fewest – most",
    "segments tx/s (in the order run)",
]


def detail_rows(cells: Sequence[Throughput], variants: Sequence[str] = VARIANTS) -> list[list[str]]:
    rows = []
    for (executor, writers), found in _groups(cells, variants).items():
        for variant in variants:
            cell = found[variant]
            rows.append(
                [
                    str(writers),
                    PLURAL[executor],
                    LABELS[variant],
                    f"{cell.rate:,.0f}",
                    (
                        f"{_ms(percentile(cell.durations, 0.5))} / "
                        f"{_ms(percentile(cell.durations, 0.99))}"
                    ),
                    f"{cell.cpu_us_per_tx:.0f}",
                    _spread(cell),
                    " ".join(f"{x:.0f}" for x in cell.segments),
                ]
            )
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(r) + " |" for r in rows)
    return "\n".join(lines)


def latency_rows(latency: Latency) -> list[list[str]]:
    rows = []
    for path, values in (
        ("commit → sequencer's NOTIFY at a plain LISTEN", latency.notified),
        ("commit → `LogReader.follow()` yields it", latency.reader),
    ):
        rows.append(
            [
                path,
                f"{len(values)} of {latency.sent}",
                _ms(percentile(values, 0.5)),
                _ms(percentile(values, 0.99)),
                _ms(max(values)) if values else "-",
            ]
        )
    return rows


LATENCY_HEADER: Final = ["path", "events measured", "p50 ms", "p99 ms", "max ms"]


def latency_facts(latency: Latency) -> str:
    per_second = latency.sessions_opened / latency.follow_seconds if latency.follow_seconds else 0
    return (
        f"{latency.rate:g} events/s; {latency.missing} missing, {latency.duplicates} "
        f"duplicate(s) at the reader. `herald run` CPU: {latency.sequencer_idle_cpu:.1f} % "
        f"of one core idle, {latency.sequencer_busy_cpu:.1f} % while the writer runs. "
        f"While the reader followed ({latency.follow_seconds:.0f} s), about "
        f"{latency.sessions_opened} server sessions were opened in the bench database "
        f"({per_second:.1f}/s; `pg_stat_database.sessions`), and `herald.wakeup` logged "
        f'{latency.waker_failures} "listening connection failed" messages.'
    )


def _verdict(value: float, target: float = TARGET_RATIO) -> str:
    return "**met**" if value >= target else "**not met**"


def _rounds_note(num: Throughput, den: Throughput, target: float) -> str:
    """Says so when some rounds fall on the other side of the target than the whole run."""
    rounds = round_ratios(num, den)
    whole = ratio(num, den) >= target
    if all((x >= target) == whole for x in rounds):
        return ""
    shown = ", ".join(f"{x:.2f}" for x in rounds)
    return f", though not in every round ({shown})"


def throughput_verdicts(report: Report) -> list[str]:
    """Sentences computed from the throughput figures: the targets, the costs, threads."""
    notes = []
    groups = _groups(report.cells)
    main = report.args.executor
    top = max(report.args.writers)
    cells = groups.get((main, top))
    if cells:
        target = ratio(cells["herald_psycopg"], cells["raw"])
        raw_rounds = _rounds_note(cells["herald_psycopg"], cells["raw"], TARGET_RATIO)
        notes.append(
            f"Target (herald ≥ {TARGET_RATIO}× raw at {top} writers; {PLURAL[main]}), read "
            f"as herald (psycopg) / raw, herald's append on raw's driver: {target:.2f}× — "
            f"{_verdict(target)}{raw_rounds}."
        )
        es = ratio(cells["herald_psycopg"], cells["eventsourcing"])
        es_sa = ratio(cells["herald_sqlalchemy"], cells["eventsourcing"])
        es_rounds = _rounds_note(cells["herald_psycopg"], cells["eventsourcing"], ES_TARGET_RATIO)
        notes.append(
            f"Target (herald ≥ {ES_TARGET_RATIO:g}× eventsourcing at {top} writers; "
            f"{PLURAL[main]}), read as herald (psycopg) / eventsourcing: {es:.2f}× — "
            f"{_verdict(es, ES_TARGET_RATIO)}{es_rounds}. herald (sqlalchemy) / eventsourcing: "
            f"{es_sa:.2f}×; raw / eventsourcing: "
            f"{ratio(cells['raw'], cells['eventsourcing']):.2f}×."
        )
        on_sa = ratio(cells["herald_sqlalchemy"], cells["sqlalchemy"])
        notes.append(
            f"herald's cost on SQLAlchemy, herald (sqlalchemy) / sqlalchemy (no herald) at "
            f"{top} writers: {on_sa:.2f}× — against the same {TARGET_RATIO}× bar: "
            f"{_verdict(on_sa)}."
        )
        overall = ratio(cells["herald_sqlalchemy"], cells["raw"])
        notes.append(
            f"herald (sqlalchemy) / raw at {top} writers: {overall:.2f}× — against the "
            f"same {TARGET_RATIO}× bar: {_verdict(overall)}; this ratio includes SQLAlchemy's "
            "own per-transaction cost, which the sqlalchemy (no herald) variant pays too "
            f"(sqlalchemy (no herald) / raw: {ratio(cells['sqlalchemy'], cells['raw']):.2f}×)."
        )
        cpu = {v: cells[v].cpu_us_per_tx for v in VARIANTS}
        notes.append(
            f"Client CPU per transaction at {top} writers: raw {cpu['raw']:.0f} µs, "
            f"herald (psycopg) {cpu['herald_psycopg']:.0f} µs "
            f"({cpu['herald_psycopg'] - cpu['raw']:+.0f}); sqlalchemy (no herald) "
            f"{cpu['sqlalchemy']:.0f} µs, herald (sqlalchemy) "
            f"{cpu['herald_sqlalchemy']:.0f} µs "
            f"({cpu['herald_sqlalchemy'] - cpu['sqlalchemy']:+.0f}); eventsourcing "
            f"{cpu['eventsourcing']:.0f} µs. On {report.machine.cores} cores the writers' "
            "CPU and the server's compete for the same cores."
        )
        low = min(report.args.writers)
        first = groups.get((main, low))
        if first and low != top:
            notes.append(
                "eventsourcing from "
                f"{low} to {top} writers: {first['eventsourcing'].rate:,.0f} → "
                f"{cells['eventsourcing'].rate:,.0f} tx/s "
                f"({ratio(cells['eventsourcing'], first['eventsourcing']):.2f}×); raw "
                f"{ratio(cells['raw'], first['raw']):.2f}×, herald (psycopg) "
                f"{ratio(cells['herald_psycopg'], first['herald_psycopg']):.2f}×. The "
                "table lock lets one eventsourcing transaction at a time run from its "
                "`LOCK TABLE` to its commit."
            )
    if report.eventsourcing_check is not None:
        notes.append(report.eventsourcing_check.sentence())
    other = "thread" if main == "process" else "process"
    mine, theirs = groups.get((main, top)), groups.get((other, top))
    if mine and theirs:
        by = {main: mine, other: theirs}
        ratios = {k: ratio(c["herald_psycopg"], c["raw"]) for k, c in by.items()}
        # how far one round's ratio strays from another's, in either executor
        spread = max(
            (
                max(rr) - min(rr)
                for rr in (round_ratios(c["herald_psycopg"], c["raw"]) for c in by.values())
                if len(rr) > 1
            ),
            default=0.0,
        )
        gap = ratios["thread"] - ratios["process"]
        if abs(gap) <= spread:
            verdict = f"the same within the noise (rounds spread over {spread:.2f})"
        else:
            verdict = "lower with threads" if gap < 0 else "higher with threads"
        es_ratios = {k: ratio(c["herald_psycopg"], c["eventsourcing"]) for k, c in by.items()}
        notes.append(
            f"Threads against processes at {top} writers: herald (psycopg) / raw is "
            f"{ratios['thread']:.2f} with threads, {ratios['process']:.2f} with processes: "
            f"{verdict}; herald (psycopg) / eventsourcing {es_ratios['thread']:.2f} with "
            f"threads, {es_ratios['process']:.2f} with processes. The headline figures use "
            f"{PLURAL[main]}."
        )
    return notes


def sqlite_facts(report: Report) -> list[str]:
    """B9's sentences: ratios and what 8 writers on one SQLite file do; no target."""
    notes = []
    groups = _groups(report.sqlite_cells, SQLITE_VARIANTS)
    for (_executor, writers), cells in groups.items():
        herald_cell, raw_cell = cells["sqlite_herald"], cells["sqlite_raw"]
        notes.append(
            f"Report, {writers} writer(s): herald (sqlalchemy) {herald_cell.rate:,.0f} tx/s, "
            f"raw (sqlite3) {raw_cell.rate:,.0f} tx/s: "
            f"{ratio(herald_cell, raw_cell):.2f}× raw, "
            f"{ratio(herald_cell, cells['sqlite_sqlalchemy']):.2f}× sqlalchemy (no herald); "
            f"client CPU {herald_cell.cpu_us_per_tx:.0f} µs/tx against "
            f"{raw_cell.cpu_us_per_tx:.0f} µs/tx."
        )
    counts = sorted({w for _, w in groups})
    if len(counts) > 1:
        low, top = counts[0], counts[-1]
        one, many = groups[("process", low)], groups[("process", top)]
        p99 = {
            v: (_ms(percentile(one[v].durations, 0.99)), _ms(percentile(many[v].durations, 0.99)))
            for v in ("sqlite_raw", "sqlite_herald")
        }
        notes.append(
            f"From {low} to {top} writers on the one file: raw (sqlite3) "
            f"{ratio(many['sqlite_raw'], one['sqlite_raw']):.2f}×, herald (sqlalchemy) "
            f"{ratio(many['sqlite_herald'], one['sqlite_herald']):.2f}× the tx/s; p99 "
            f"{p99['sqlite_raw'][0]} → {p99['sqlite_raw'][1]} ms and "
            f"{p99['sqlite_herald'][0]} → {p99['sqlite_herald'][1]} ms. SQLite lets one "
            "writer at a time hold the write lock (`BEGIN IMMEDIATE`); the others wait in "
            "the driver's busy handler (`sqlite3_busy_timeout`, 30 s in herald's engine), "
            "which sleeps and retries rather than queueing them. Measured transactions per "
            f"writer at {top} writers: raw (sqlite3) {_spread(many['sqlite_raw'])}, herald "
            f"(sqlalchemy) {_spread(many['sqlite_herald'])} (fewest – most); the p99 counts "
            "only transactions that ended inside a measured window, the longest single "
            f"transaction (warm-ups included) took {_ms(many['sqlite_raw'].longest)} ms "
            f"(raw) and {_ms(many['sqlite_herald'].longest)} ms (herald)."
        )
    if report.sqlite_check is not None:
        notes.append(report.sqlite_check.sentence())
    return notes


def latency_verdicts(lat: Latency) -> list[str]:
    if not lat.reader:
        return []
    p50, p99 = 1000 * percentile(lat.reader, 0.5), 1000 * percentile(lat.reader, 0.99)
    n50 = 1000 * percentile(lat.notified, 0.5)
    n99 = 1000 * percentile(lat.notified, 0.99)

    def against(value: float, prototype: float) -> str:
        return "at or below it" if value <= prototype else "above it"

    notes = [
        (
            f"Against the design's prototype (insert → consumer p50 {PROTOTYPE_P50_MS:.0f} ms, "
            f"p99 {PROTOTYPE_P99_MS:.0f} ms): the reader's p50 is {p50:.1f} ms "
            f"({against(p50, PROTOTYPE_P50_MS)}), its p99 {p99:.1f} ms "
            f"({against(p99, PROTOTYPE_P99_MS)}); the sequencer's NOTIFY alone: p50 "
            f"{n50:.1f} ms, p99 {n99:.1f} ms."
        )
    ]
    if lat.waker_failures:
        notes.append(
            f"`herald.wakeup.Waker` failed to open its LISTEN connection "
            f"{lat.waker_failures} times in {lat.follow_seconds:.0f} s (each failure: "
            "a new server connection, then a 0.5 s sleep), so the reader never woke on "
            "a NOTIFY; its latency is that of a 0.5 s poll, not of the sequencer."
        )
    return notes


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run's measurements (not its file options)."""
    parts = [
        ".venv/bin/python -m bench.append_throughput",
        f"--seconds {args.seconds:g} --warmup {args.warmup:g} --rounds {args.rounds}",
        f"--writers {' '.join(str(w) for w in args.writers)} --executor {args.executor}",
        f"--{'' if args.thread_check else 'no-'}thread-check --rows {args.rows}",
    ]
    if args.sqlite:
        parts.append(f"--sqlite-writers {' '.join(str(w) for w in args.sqlite_writers)}")
    else:
        parts.append("--no-sqlite")
    if args.latency:
        parts.append(
            f"--rate {args.rate:g} --latency-seconds {args.latency_seconds:g} "
            f"--latency-warmup {args.latency_warmup:g}"
        )
    else:
        parts.append("--no-latency")
    return " ".join(parts)


def markdown(report: Report) -> str:
    m, args = report.machine, report.args
    settings = ", ".join(f"`{k}={v}`" for k, v in m.settings.items())
    dated = (
        f"Date: {date.today().isoformat()}. Script: `bench/append_throughput.py` "
        f"(whole run {report.elapsed:.0f} s). {report.revision}."
    )
    if report.digests[0] != report.digests[1]:
        dated += " **herald's sources changed during the run**: the figures mix two versions."
    sqlite_text = (
        f"SQLite {sqlite3.sqlite_version} (B9: a file on {report.sqlite_filesystem}); "
        if args.sqlite
        else ""
    )
    machine = (
        "**Machine.** "
        f"{m.cores} cores (`os.cpu_count()`, {m.cpu_model}), {m.ram_gib:.1f} GiB RAM, {m.os}; "
        f"PostgreSQL {m.server_version} on the same machine over TCP loopback, {settings}; "
        f"{sqlite_text}Python {m.python}, SQLAlchemy {m.sqlalchemy}, psycopg {m.psycopg}, "
        f"eventsourcing {ES_VERSION}. Load average (1 min) {m.load[0]:.2f} at start; other "
        f"client sessions on the server: {m.other_sessions} at start, "
        f"{report.other_sessions_after} at the end."
    )
    reproduce = (
        "**Reproduce.** `make bench`, which runs `.venv/bin/python -m bench.append_throughput` "
        "with the defaults (options: `--seconds`, `--warmup`, `--rounds`, `--writers`, "
        "`--executor`, `--thread-check`, `--rows`, `--sqlite`, `--sqlite-writers`, "
        "`--sqlite-dir`, `--latency`, `--rate`, `--latency-seconds`, `--latency-warmup`, "
        "`--database-url`, `--database`, `--markdown`, `--help`; the server from "
        f"`{URL_SETTING}`, default `{DEFAULT_URL}`). This run: `{command_line(args)}`."
    )
    length = args.seconds / (2 * args.rounds)
    other = "threads" if args.executor == "process" else "processes"
    check = (
        f" The largest writer count is also run with {other}, in one round "
        f"({args.seconds / args.rounds:g} s of commits per variant)."
        if args.thread_check
        else ""
    )
    measured = (
        "**What is measured.** One transaction = `UPDATE bench_builds SET status, stoptime "
        f"WHERE id` of a random row the writer owns ({args.rows} rows, split between the "
        "writers, so no row lock is contended) + one event, committed. Five variants:"
    )
    variants = [
        (
            "*raw*: plain psycopg 3, no SQLAlchemy, no herald: `UPDATE`, then "
            "`INSERT INTO herald_events (topic, payload, delivery, occurred_at) ... "
            "RETURNING position` of a `build_finished` event "
            '(`{"build_id": id, "dependent_ids": []}`), `commit()`.'
        ),
        (
            "*herald (psycopg)*: the same psycopg connection: `UPDATE` through a cursor, then "
            "`herald.outbox.append(conn, ...)` of the same event on the psycopg connection, "
            "`commit()`. Same driver as *raw*, so herald (psycopg) / raw is herald's own "
            "cost; the first target is read from it."
        ),
        (
            "*sqlalchemy (no herald)*: an engine from `herald.config.create_engine(url)`, "
            "`with engine.begin() as conn:` the `UPDATE` as `text()`, then *raw*'s `INSERT` "
            "through `exec_driver_sql`."
        ),
        (
            "*herald (sqlalchemy)*: the same engine, `with engine.begin() as conn:` the "
            "`UPDATE` as `text()`, then `herald.outbox.append(conn, ...)`."
        ),
        (
            f"*eventsourcing*: the eventsourcing library ({ES_VERSION}) configured as its "
            "users configure it for PostgreSQL (`PERSISTENCE_MODULE=eventsourcing.postgres`, "
            f"`POSTGRES_DBNAME`, `POSTGRES_HOST`, ..., `POSTGRES_SCHEMA={ES_SCHEMA}`, "
            "`POSTGRES_POOL_SIZE=1`, `POSTGRES_MAX_OVERFLOW=0`: one connection per writer). "
            "An `Application` whose stock `PostgresApplicationRecorder` made its own table "
            f"`{ES_TABLE}` in the same scratch database. Each writer creates its own "
            "aggregates beforehand (one per build row, new UUIDs: no two writers share one); "
            "a transaction is one command on one of them (one `Finished` event, "
            '`{"status", "stoptime", "timestamp"}` as the library\'s JSON) and '
            "`app.save(aggregate, build_update=(...))`: in one transaction, pipelined by "
            "the library, the `UPDATE`, `SET LOCAL lock_timeout`, "
            f"`LOCK TABLE {ES_TABLE} IN EXCLUSIVE MODE`, `NOTIFY`, the `INSERT`, then the "
            "commit. The `UPDATE` goes through the hook the library has for writes that "
            "share the events' transaction (`_insert_events`, where its own process "
            "recorder writes its tracking row; `save()` hands its keyword arguments down "
            "to it), in a subclass chosen with its `APPLICATION_RECORDER_TOPIC` setting; "
            "nothing of the library is patched. herald (psycopg) / eventsourcing is the "
            "second target's ratio."
        ),
    ]
    method = (
        "Each writer has its own psycopg connection, its own engine and its own "
        f"eventsourcing application. Writers are {PLURAL[args.executor]}. Each writer "
        f"count runs the variants in {args.rounds} mirrored round(s) (raw, herald "
        "(psycopg), sqlalchemy, herald (sqlalchemy), eventsourcing, then the reverse), "
        f"each segment {length:g} s measured after a {args.warmup:g} s warm-up, so each "
        f"figure is {args.seconds:g} s of commits.{check} No sequencer runs meanwhile. "
        "ms/tx is the client-side time of one whole transaction; client CPU is the "
        "writer thread's CPU time (`time.thread_time()`) per transaction, so it leaves "
        "out the server's share. Ratio cells give the ratio over the whole run, then "
        "each round's in parentheses."
    )
    reading = (
        "**Reading the ratios.** The two SQLAlchemy variants include SQLAlchemy's own "
        "per-transaction cost (pool checkout, `Connection` and transaction objects, "
        "statement execution), which is the same with or without herald. herald's own "
        "cost is therefore read from herald (psycopg) / raw and from herald (sqlalchemy) "
        "/ sqlalchemy (no herald); herald (sqlalchemy) / raw is given for completeness "
        "and includes SQLAlchemy's cost. eventsourcing pays its own Python cost (the "
        "aggregate's event, the mapper, the pool) as a user of the library would."
    )
    lines = [
        BEGIN_MARK,
        "",
        "## B1 — append throughput (issues #2, #6)",
        "",
        dated,
        "",
        machine,
        "",
        reproduce,
        "",
        measured,
        "",
        *(f"- {v}" for v in variants),
        "",
        method,
        "",
        reading,
        "",
        md_table(THROUGHPUT_HEADER, throughput_rows(report.cells)),
        "",
        *(f"- {note}" for note in throughput_verdicts(report)),
        "",
        "Per variant:",
        "",
        md_table(DETAIL_HEADER, detail_rows(report.cells)),
        "",
    ]
    lines.extend(sqlite_markdown(report))
    lines.extend(["## Insert → reader latency (issue #2)", ""])
    lat = report.latency
    if lat is None:
        lines.extend(["Not run (`--no-latency`).", ""])
    else:
        setup = (
            "Same database, right after the throughput runs. `herald run` (the sequencer "
            "daemon, default `--poll-interval 0.05`) in a subprocess; one writer process "
            f"appends {lat.rate:g} `build_finished` events/s, one per transaction "
            "(`with engine.begin()` + `herald.outbox.append`), for "
            f"{args.latency_warmup:g} s of warm-up (not counted) + {lat.seconds:g} s; a "
            "`herald.outbox.LogReader(engine).follow(after=head)` in this process "
            "receives them (default `poll_interval=1.0`). Latency = the time an event is "
            "received − the time the writer's `COMMIT` returned (one clock). Beside the "
            "reader, a plain psycopg connection LISTENs on `herald_log`: its row is the time "
            "until the sequencer had ordered the event and said so, i.e. what a reader that "
            "woke on every NOTIFY could at best achieve."
        )
        analyze = (
            f"Before that, `herald run` ordered the {lat.catch_up_events:,} events the "
            f"throughput runs had left, in {lat.catch_up_seconds:.1f} s (start-up "
            "included), and the script then ran `ANALYZE herald_events, herald_log`: "
            "without statistics for the freshly filled `herald_log`, the reader's page "
            "query is planned as a hash join over a sequential scan of `herald_events` "
            "until autovacuum's next `ANALYZE`. The figures are those of a log of that "
            "size in its steady state."
        )
        lines.extend(
            [
                setup,
                "",
                analyze,
                "",
                md_table(LATENCY_HEADER, latency_rows(lat)),
                "",
                f"- {latency_facts(lat)}",
                *(f"- {note}" for note in latency_verdicts(lat)),
                "",
            ]
        )
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def sqlite_markdown(report: Report) -> list[str]:
    """B9's part of the section: B1 on the SQLite default."""
    args = report.args
    lines = ["## B9 — B1 on the SQLite default (issue #6)", ""]
    if not args.sqlite:
        return [*lines, "Not run (`--no-sqlite`).", ""]
    length = args.seconds / (2 * args.rounds)
    counts = " and ".join(str(w) for w in args.sqlite_writers)
    measured = (
        "**What is measured.** The same transaction as B1 (the `UPDATE` of a random row "
        "the writer owns, then one `build_finished` event, committed) on a migrated SQLite "
        f"file in a temporary directory (on {report.sqlite_filesystem}), written through "
        '`herald.config.create_engine("sqlite:///...")`: WAL, `synchronous=FULL`, '
        "`foreign_keys=ON`, a 30 s busy timeout, every transaction `BEGIN IMMEDIATE`. "
        f"{counts} writer processes, each with its own connections; the same mirrored "
        f"rounds as B1 ({args.rounds} round(s), segments of {length:g} s after a "
        f"{args.warmup:g} s warm-up). Three variants:"
    )
    variants = [
        (
            "*raw (sqlite3)*: the stdlib `sqlite3` module alone, with the engine's "
            "settings, sending what herald's append sends on SQLite: `BEGIN IMMEDIATE`, "
            "the `UPDATE`, the last position (`SELECT max(...)` over `sqlite_sequence` "
            "and `herald_events`), `INSERT INTO herald_events` with the next position, "
            "`INSERT INTO herald_log ... SELECT` (on SQLite the writer orders its own "
            "events: no sequencer), `COMMIT`."
        ),
        (
            "*sqlalchemy (no herald)*: the engine, `with engine.begin() as conn:` the "
            "`UPDATE` as `text()`, then the same three statements through "
            "`exec_driver_sql`."
        ),
        (
            "*herald (sqlalchemy)*: the engine, `with engine.begin() as conn:` the "
            "`UPDATE` as `text()`, then `herald.outbox.append(conn, ...)`. herald's append "
            "on SQLite takes a SQLAlchemy connection (or session), so both herald/raw "
            "(SQLAlchemy's cost included) and herald/sqlalchemy (herald's own) are given."
        ),
    ]
    cells = report.sqlite_cells
    return [
        *lines,
        measured,
        "",
        *(f"- {v}" for v in variants),
        "",
        md_table(SQLITE_HEADER, throughput_rows(cells, SQLITE_VARIANTS, SQLITE_RATIOS)),
        "",
        *(f"- {note}" for note in sqlite_facts(report)),
        "",
        "Per variant:",
        "",
        md_table(DETAIL_HEADER, detail_rows(cells, SQLITE_VARIANTS)),
        "",
    ]


def print_report(report: Report) -> None:
    print()
    print("B1 — append throughput (tx = UPDATE bench_builds + one event)")
    print(text_table(THROUGHPUT_HEADER, throughput_rows(report.cells)))
    print()
    print(text_table(DETAIL_HEADER, detail_rows(report.cells)))
    print()
    for note in throughput_verdicts(report):
        print(f"- {note.replace('**', '')}")
    if report.args.sqlite:
        print()
        print("B9 — B1 on the SQLite default (report)")
        cells = report.sqlite_cells
        print(text_table(SQLITE_HEADER, throughput_rows(cells, SQLITE_VARIANTS, SQLITE_RATIOS)))
        print()
        print(text_table(DETAIL_HEADER, detail_rows(cells, SQLITE_VARIANTS)))
        print()
        for note in sqlite_facts(report):
            print(f"- {note.replace('**', '')}")
    if report.latency is not None:
        print()
        print("Insert → reader latency (herald run + LogReader.follow)")
        print(text_table(LATENCY_HEADER, latency_rows(report.latency)))
        print(latency_facts(report.latency))
        for note in latency_verdicts(report.latency):
            print(f"- {note.replace('**', '')}")
    print()
    print(f"command: {command_line(report.args)}")


# -- main ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.append_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="measured seconds per variant and writer count, split over the segments "
        "(default: 10); also B9's",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="warm-up seconds before each segment (default: 0.5)",
    )
    parser.add_argument(
        "--writers",
        type=int,
        nargs="+",
        default=[1, 8],
        metavar="N",
        help="concurrent writer counts to measure on PostgreSQL (default: 1 8)",
    )
    parser.add_argument(
        "--executor",
        choices=("process", "thread"),
        default="process",
        help="writers as processes (default) or threads",
    )
    parser.add_argument(
        "--thread-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the largest writer count with the other executor, in one round",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="mirrored rounds (A B C D E E D C B A) per writer count; a segment lasts "
        "seconds / (2 × rounds) (default: 2)",
    )
    parser.add_argument(
        "--rows", type=int, default=1000, help="rows in bench_builds (default: 1000)"
    )
    parser.add_argument(
        "--sqlite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run B9, the same on an SQLite file (default: on)",
    )
    parser.add_argument(
        "--sqlite-writers",
        type=int,
        nargs="+",
        default=[1, 8],
        metavar="N",
        help="B9: concurrent writer processes on the SQLite file (default: 1 8)",
    )
    parser.add_argument(
        "--sqlite-dir",
        type=Path,
        default=None,
        help="B9: where the SQLite file's temporary directory goes (default: the system's)",
    )
    parser.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the insert → reader latency part (default: on)",
    )
    parser.add_argument(
        "--rate", type=float, default=200.0, help="latency run: events/s (default: 200)"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="latency run: measured seconds (default: 10)",
    )
    parser.add_argument(
        "--latency-warmup",
        type=float,
        default=2.0,
        help="latency run: warm-up seconds, not counted (default: 2)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(URL_SETTING, DEFAULT_URL),
        help=f"a superuser's URL on the server (default: ${URL_SETTING} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--database",
        default="herald_bench_append",
        help="the scratch database, dropped first and at the end (default: herald_bench_append)",
    )
    parser.add_argument(
        "--markdown",
        "--output",
        dest="output",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="the markdown file whose section is rewritten (default: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rewrite the section of --markdown (default: on)",
    )
    args = parser.parse_args(argv)
    if (
        args.seconds <= 0
        or args.latency_seconds <= 0
        or args.rate <= 0
        or args.rounds < 1
        or args.warmup < 0
        or args.latency_warmup < 0
    ):
        parser.error("durations, --rate and --rounds must be positive, warm-ups not negative")
    if min(args.writers + args.sqlite_writers) < 1 or args.rows < max(
        args.writers + args.sqlite_writers
    ):
        parser.error("--writers and --sqlite-writers must be at least 1 and at most --rows")
    args.writers = sorted(set(args.writers))
    args.sqlite_writers = sorted(set(args.sqlite_writers))
    return args


def measure_postgresql(
    args: argparse.Namespace, url: URL, log: Callable[[str], None]
) -> tuple[list[Throughput], EventsourcingCheck]:
    """B1: every variant, at every writer count, then the thread check; the rows check."""
    url_text = url.set(drivername="postgresql").render_as_string(hide_password=False)
    create_eventsourcing_tables(url)
    cells: list[Throughput] = []
    created = 0
    executors = [args.executor]
    if args.thread_check:
        executors.append("thread" if args.executor == "process" else "process")
    for executor in executors:
        main_run = executor == args.executor
        counts = args.writers if main_run else [max(args.writers)]
        # The check runs one round of segments as long as the main run's.
        rounds = args.rounds if main_run else 1
        seconds = args.seconds if main_run else args.seconds / args.rounds
        log(f"throughput, writers as {PLURAL[executor]}")
        pool = WriterPool(
            executor, max(counts), conninfo(url), url_text, args.rows, backend="eventsourcing"
        )
        created += pool.created
        try:
            for writers in counts:
                found = measure_throughput(pool, writers, args.warmup, seconds, rounds, log)
                cells.extend(found.values())
        finally:
            pool.close()
    committed = sum(c.committed for c in cells if c.variant == "eventsourcing")
    check = check_eventsourcing(url, created, committed)
    log(f"  {check.sentence().replace('**', '')}")
    return cells, check


def measure_sqlite(
    args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[list[Throughput], SqliteCheck, str]:
    """B9: the SQLite variants on a fresh file; the log check; the file's file system."""
    with scratch_sqlite(args.sqlite_dir, args.rows) as (path, url):
        filesystem = filesystem_of(Path(path).parent)
        log(f"B9 on SQLite ({path}, {filesystem}), writers as processes")
        cells: list[Throughput] = []
        pool = WriterPool(
            "process", max(args.sqlite_writers), path, url, args.rows, backend="sqlite"
        )
        try:
            for writers in args.sqlite_writers:
                found = measure_throughput(
                    pool, writers, args.warmup, args.seconds, args.rounds, log, SQLITE_VARIANTS
                )
                cells.extend(found.values())
        finally:
            pool.close()
        check = check_sqlite(path, sum(c.committed for c in cells))
        log(f"  {check.sentence().replace('**', '')}")
    return cells, check, filesystem


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)

    admin = make_url(args.database_url)
    if admin.get_backend_name() != "postgresql":
        raise SystemExit(f"{URL_SETTING}: a postgresql:// URL is needed")
    log(f"creating {args.database} on {admin.render_as_string(hide_password=True)}")
    url = create_scratch(admin, args.database, args.rows)
    revision = git_revision()
    digest = source_digest()
    log(f"{revision} (sources {digest})")
    try:
        machine = describe_machine(admin, args.database)
        cells, es_check = measure_postgresql(args, url, log)
        sqlite_cells: list[Throughput] = []
        sqlite_check, filesystem = None, "?"
        if args.sqlite:
            sqlite_cells, sqlite_check, filesystem = measure_sqlite(args, log)
        latency = None
        if args.latency:
            log("latency: herald run + one writer + LogReader.follow")
            latency = measure_latency(
                url.set(drivername="postgresql"),
                args.rows,
                args.rate,
                args.latency_seconds,
                args.latency_warmup,
                log,
            )
        report = Report(
            args,
            machine,
            cells,
            latency,
            revision=revision,
            eventsourcing_check=es_check,
            sqlite_cells=sqlite_cells,
            sqlite_check=sqlite_check,
            sqlite_filesystem=filesystem,
        )
        report.digests = (digest, source_digest())
        if report.digests[0] != report.digests[1]:
            log("WARNING: herald's sources changed during the run")
        report.other_sessions_after = describe_machine(admin, args.database).other_sessions
    finally:
        drop_scratch(admin, args.database)
    report.elapsed = time.monotonic() - began
    print_report(report)
    if args.write:
        write_section(args.output, "bench.append_throughput", markdown(report))
        log(f"\nwrote {args.output}")


if __name__ == "__main__":
    run_script(main)
