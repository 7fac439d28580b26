"""Saving a build finish through the unit of work, against the raw append (issue #3).

Run with ``make bench`` or ``.venv/bin/python -m bench.unit_of_work``.

The script measures, in one run, on PostgreSQL (a scratch database,
``herald_bench_uow``, dropped first and at the end) and on SQLite (a file in
a temporary directory, deleted at the end), both migrated as ``herald db
upgrade`` does, the **transactions/s of two ways to record that a build
finished**:

* ``append``: the raw append of issue #2, ``with engine.begin() as conn:
  herald.outbox.append(conn, "build_finished", {"build_id": id,
  "dependent_ids": [], "status": 0})``: one log row, nothing else;
* ``unit of work``: ``with engine.begin() as conn: uow = UnitOfWork(conn);
  finish_build(uow, build_id, 0); uow.save()``: the build is loaded from
  its log events (replayed), the command is applied, its
  ``build_finished`` is appended with the aggregate's version and the
  ``herald_builds`` projection is updated, all in the one transaction.

Every measured unit-of-work transaction finishes a different running
build: the builds are queued and started beforehand through the unit of
work (``Build(...)`` + ``start()``, saved in bulk), as many as the writers
will use (estimated, topped up between segments if needed; a writer that
runs out has its segment run again). The engines come from
:func:`herald.config.create_engine`. One writer on each backend, and on
PostgreSQL also 8 concurrent writer processes (``--writers``). Each
writer count runs ``--rounds`` mirrored rounds (append, unit of work, unit
of work, append), each segment ``--seconds / (2 × rounds)`` measured
after a ``--warmup``, so that drift and the machine's other users hit both
variants alike. Reported: tx/s, unit of work / append, ms per transaction
(p50, p99), client CPU per transaction (the writer thread's
``time.thread_time()``) and the SQL statements each transaction sends
(counted once per backend, with a ``before_cursor_execute`` listener).

The unit of work's other end, one evaluation adding 50,000 builds in one
transaction, is issue #6's B2: ``bench/bulk.py`` measures it against a raw
``COPY`` of the same rows.

It prints tables, rewrites its own section of ``BENCHMARKS.md`` (between the
``bench.unit_of_work`` markers; the rest of the file is kept) and removes its
databases.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing as mp
import os
import platform
import re
import sqlite3
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

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
from herald.config import create_engine
from herald.domain import Build
from herald.outbox import UnitOfWork, append, sync_catalogue
from herald.outbox.farm import finish_build
from herald.schema import migrate

BEGIN_MARK, END_MARK = markers("bench.unit_of_work")
TITLE: Final = "## Unit of work: saving a build finish (issue #3)"

APPEND: Final = "append"
UOW: Final = "uow"
#: the variants, in the order a round runs them (then the reverse)
VARIANTS: Final = (APPEND, UOW)
LABELS: Final = {APPEND: "append", UOW: "unit of work"}
BACKEND_LABELS: Final = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}

#: the build ids the append variant puts in its payloads (no such builds exist)
APPEND_IDS_FROM: Final = 1_000_000_000
#: the prepared builds' jobset
BENCH_JOBSET: Final = 1
#: builds queued and started per bulk transaction while preparing
PREPARE_CHUNK: Final = 2000
#: how long a writer takes to receive a segment and run its first transaction
LEAD: Final = 0.5
READY: Final = "ready"


# -- SQL statement counting -------------------------------------------------------


QUOTES: Final = '"`'


def statement_kind(sql: str) -> str:
    """``"INSERT herald_events"``, ``"SELECT herald_events"``, ``"BEGIN IMMEDIATE"``."""
    words = sql.split()
    if not words:
        return "?"
    verb = words[0].upper()
    if verb in ("INSERT", "DELETE") and len(words) > 2:
        table = words[2]
    elif verb == "UPDATE" and len(words) > 1:
        table = words[1]
    elif verb in ("SELECT", "WITH"):
        found = re.search(r"\bFROM\s+([\w\"]+)", sql, re.IGNORECASE)
        table = found.group(1) if found else "?"
    else:
        return " ".join(words[:2])
    return f"{verb} {table.split('(')[0].strip(QUOTES)}"


class StatementLog:
    """Counts the statements an engine sends to its driver, by kind.

    One count per ``cursor.execute`` / ``cursor.executemany`` call (SQLAlchemy's
    ``before_cursor_execute`` event). What herald sends on the driver's own
    connection is not seen: the ``COPY`` it uses for a run of at least
    ``COPY_MIN_ROWS`` rows (:mod:`herald.outbox.append`). The transactions
    counted here write one event and one projection row, so they send none.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        #: driver calls, by statement kind
        self.kinds: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def _before(
        self, _conn: sa.Connection, _cursor: object, statement: str, *_args: object
    ) -> None:
        self.kinds[statement_kind(statement)] += 1

    def __enter__(self) -> StatementLog:
        sa.event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *_exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._before)


# -- the two transactions ---------------------------------------------------------


def append_transaction(engine: sa.Engine, build_id: int) -> None:
    """The raw append of issue #2: one ``build_finished`` row, nothing else."""
    with engine.begin() as conn:
        append(conn, "build_finished", {"build_id": build_id, "dependent_ids": [], "status": 0})


def uow_transaction(engine: sa.Engine, build_id: int) -> None:
    """Finish running build ``build_id`` through the domain."""
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        finish_build(uow, build_id, 0)
        uow.save()


def prepare_builds(engine: sa.Engine, build_ids: Sequence[int]) -> None:
    """Queue and start ``build_ids`` through the unit of work, in bulk transactions."""
    for i in range(0, len(build_ids), PREPARE_CHUNK):
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            for build_id in build_ids[i : i + PREPARE_CHUNK]:
                build = Build(
                    build_id,
                    BENCH_JOBSET,
                    f"bench.job{build_id}",
                    f"/nix/store/{build_id:032x}-bench-{build_id}.drv",
                    "x86_64-linux",
                )
                uow.add(build).start()
            uow.save()


# -- the writers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """One timed stretch of one variant, for one writer."""

    variant: str  # one of VARIANTS
    #: time.monotonic() at which the warm-up starts (CLOCK_MONOTONIC is system-wide)
    start_at: float
    warmup: float
    seconds: float
    number: int
    #: running builds this writer may finish (the unit of work variant), in order
    build_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """What one writer did in one segment."""

    writer: int
    variant: str
    #: committed in the measured window
    transactions: int
    #: seconds per transaction, measured ones only
    durations: list[float]
    #: CPU seconds this writer's thread spent in the measured window
    cpu: float
    #: builds of ``Segment.build_ids`` finished (committed), warm-up included
    used: int = 0
    #: the writer ran out of builds before the segment ended
    exhausted: bool = False
    error: str | None = None


class Writer:
    """One writer: an engine from herald's config, and its transactions."""

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.engine = create_engine(url)
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        self.appended = 0

    def transaction(self, segment: Segment) -> tuple[Callable[[], bool], Callable[[], int]]:
        """``(run one transaction, False if there was nothing left to do; builds used)``."""
        if segment.variant == APPEND:

            def run_append() -> bool:
                self.appended += 1
                build_id = APPEND_IDS_FROM + self.index * 10_000_000 + self.appended
                append_transaction(self.engine, build_id)
                return True

            return run_append, lambda: 0
        ids = iter(segment.build_ids)
        used = 0

        def run_uow() -> bool:
            nonlocal used
            build_id = next(ids, None)
            if build_id is None:
                return False
            uow_transaction(self.engine, build_id)
            used += 1
            return True

        return run_uow, lambda: used


def run_segment(writer: Writer, segment: Segment) -> SegmentResult:
    """Run one segment: warm up, then count the commits that end in the window."""
    transaction, used = writer.transaction(segment)
    exhausted = not transaction()  # the first of a kind pays for preparing
    delay = segment.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    measure_from = segment.start_at + segment.warmup
    stop_at = measure_from + segment.seconds
    durations: list[float] = []
    cpu_start: float | None = None
    cpu_end = 0.0
    while not exhausted:
        started = time.monotonic()
        if started >= stop_at:
            break
        if cpu_start is None and started >= measure_from:
            cpu_start = time.thread_time()
        if not transaction():
            exhausted = True
            break
        ended = time.monotonic()
        if started >= measure_from and ended <= stop_at:
            durations.append(ended - started)
            cpu_end = time.thread_time()
    cpu = cpu_end - cpu_start if cpu_start is not None and durations else 0.0
    return SegmentResult(
        writer.index, segment.variant, len(durations), durations, cpu, used(), exhausted
    )


def writer_main(
    index: int, url: str, commands: Channel[Segment | None], results: Channel[SegmentResult]
) -> None:
    """A writer's life: connect once, run the segments it is sent, stop on None."""
    try:
        writer = Writer(index, url)
    except Exception as exc:
        results.put(SegmentResult(index, READY, 0, [], 0.0, error=f"connect: {exc!r}"))
        return
    results.put(SegmentResult(index, READY, 0, [], 0.0))
    try:
        while (segment := commands.get()) is not None:
            try:
                results.put(run_segment(writer, segment))
            except Exception as exc:
                results.put(SegmentResult(index, segment.variant, 0, [], 0.0, error=repr(exc)))
    finally:
        writer.engine.dispose()


class WriterPool:
    """``size`` long-lived writer processes (spawned), each with its own engine."""

    def __init__(self, size: int, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.results: Channel[SegmentResult] = ctx.Queue()
        self.commands: list[Channel[Segment | None]] = []
        self._processes: list[mp.process.BaseProcess] = []
        for index in range(size):
            commands: Channel[Segment | None] = ctx.Queue()
            proc = ctx.Process(
                target=writer_main,
                args=(index, url, commands, self.results),
                name=f"bench-writer-{index}",
                daemon=True,
            )
            proc.start()
            self.commands.append(commands)
            self._processes.append(proc)
        ready = [self.results.get(timeout=120) for _ in range(size)]
        errors = [f"writer {r.writer}: {r.error}" for r in ready if r.error]
        if errors:
            self.close()
            raise RuntimeError("; ".join(errors))

    def run(self, segments: Sequence[Segment]) -> list[SegmentResult]:
        """Send ``segments[i]`` to writer ``i``, all with one start time; their results."""
        start_at = time.monotonic() + LEAD
        for index, segment in enumerate(segments):
            self.commands[index].put(
                Segment(
                    segment.variant,
                    start_at,
                    segment.warmup,
                    segment.seconds,
                    segment.number,
                    segment.build_ids,
                )
            )
        first = segments[0]
        deadline = LEAD + first.warmup + first.seconds + 60
        found = [self.results.get(timeout=deadline) for _ in segments]
        errors = [f"writer {r.writer}: {r.error}" for r in found if r.error]
        if errors:
            raise RuntimeError("; ".join(errors))
        return sorted(found, key=lambda r: r.writer)

    def close(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for proc in self._processes:
            proc.join(timeout=10)


# -- throughput -------------------------------------------------------------------


@dataclass(slots=True)
class Cell:
    """One (backend, writers, variant) figure, over all its segments."""

    backend: str
    writers: int
    variant: str
    seconds: float = 0.0
    transactions: int = 0
    cpu: float = 0.0
    durations: list[float] = field(default_factory=list)
    #: tx/s of each segment, in the order run
    segments: list[float] = field(default_factory=list)

    def add(self, seconds: float, results: Sequence[SegmentResult]) -> None:
        count = sum(r.transactions for r in results)
        self.seconds += seconds
        self.transactions += count
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


def round_ratios(num: Cell, den: Cell) -> list[float]:
    """num/den within each round (each variant has two segments a round)."""
    ratios = []
    for i in range(0, min(len(num.segments), len(den.segments)) - 1, 2):
        base = den.segments[i] + den.segments[i + 1]
        ratios.append((num.segments[i] + num.segments[i + 1]) / base if base else 0.0)
    return ratios


def ratio(num: Cell, den: Cell) -> float:
    return num.rate / den.rate if den.rate else 0.0


@dataclass(slots=True)
class Builds:
    """The running builds prepared for the writers, and what preparing them cost."""

    engine: sa.Engine
    next_id: int = 1
    #: the builds each writer has left, in the order it will finish them
    queues: list[deque[int]] = field(default_factory=list)
    prepared: int = 0
    seconds: float = 0.0
    #: builds finished through the unit of work (committed), warm-ups included
    finished: int = 0
    top_ups: int = 0

    def ensure(self, writers: int, per_writer: int) -> int:
        """Give each of the first ``writers`` writers ``per_writer`` builds at least."""
        while len(self.queues) < writers:
            self.queues.append(deque())
        wanted = [max(0, per_writer - len(self.queues[w])) for w in range(writers)]
        total = sum(wanted)
        if not total:
            return 0
        ids = list(range(self.next_id, self.next_id + total))
        self.next_id += total
        started = time.perf_counter()
        prepare_builds(self.engine, ids)
        self.seconds += time.perf_counter() - started
        self.prepared += total
        offset = 0
        for w, count in enumerate(wanted):
            self.queues[w].extend(ids[offset : offset + count])
            offset += count
        return total

    def take(self, writer: int) -> tuple[int, ...]:
        return tuple(self.queues[writer])

    def used(self, writer: int, count: int) -> None:
        for _ in range(count):
            self.queues[writer].popleft()
        self.finished += count

    @property
    def rate(self) -> float:
        return self.prepared / self.seconds if self.seconds else 0.0


def analyze(engine: sa.Engine) -> None:
    """What autovacuum would do soon after a bulk load (PostgreSQL): fresh statistics."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE herald_events, herald_builds"))
        conn.commit()


def measure_throughput(
    backend: str,
    pool: WriterPool,
    builds: Builds,
    writers: int,
    per_writer_rate: float,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> tuple[dict[str, Cell], int]:
    """``rounds`` × (append, uow, uow, append); ``args.seconds`` per variant in all.

    ``per_writer_rate`` is the unit of work tx/s one writer is expected to reach
    (to prepare its builds). Returns the cells and the segments run again.
    """
    cells = {v: Cell(backend, writers, v) for v in VARIANTS}
    warmup: float = args.warmup
    length: float = args.seconds / (2 * args.rounds)
    order = (*VARIANTS, *reversed(VARIANTS)) * args.rounds
    uow_segments = order.count(UOW)

    def need(rate: float, segments: int) -> int:
        """Builds a writer at ``rate`` tx/s may finish in ``segments`` segments, with room."""
        return math.ceil(rate * (warmup + length + LEAD) * segments * 1.3) + 3 * segments

    made = builds.ensure(writers, need(per_writer_rate, uow_segments))
    if made:
        log(f"  prepared {made} running builds ({builds.rate:.0f} builds/s so far)")
        analyze(builds.engine)
    estimate = per_writer_rate
    reruns = 0
    for number, variant in enumerate(order):
        for attempt in itertools.count():
            if variant == UOW:
                left = order[number:].count(UOW)
                if min(len(builds.queues[w]) for w in range(writers)) < need(estimate, 1):
                    made = builds.ensure(writers, need(estimate, left))
                    builds.top_ups += 1
                    log(f"  topped up: {made} more running builds")
            segments = [
                Segment(
                    variant,
                    0.0,
                    args.warmup,
                    length,
                    number,
                    builds.take(w) if variant == UOW else (),
                )
                for w in range(writers)
            ]
            results = pool.run(segments)
            for result in results:
                builds.used(result.writer, result.used)
            if variant == UOW:
                busy = args.warmup + length
                estimate = max(estimate, *(r.used / busy for r in results))
            if not any(r.exhausted for r in results):
                break
            reruns += 1
            estimate *= 2
            log(f"  a writer ran out of running builds: segment {number} again")
            if attempt >= 3:
                raise RuntimeError("writers keep running out of prepared builds")
        cells[variant].add(length, results)
        log(
            f"  {BACKEND_LABELS[backend]:10} {writers} writer(s) {LABELS[variant]:12}: "
            f"{cells[variant].segments[-1]:8.0f} tx/s"
        )
    return cells, reruns


@dataclass(slots=True)
class Calibration:
    """One writer in this process, a few transactions of each variant, statements counted."""

    uow_rate: float = 0.0
    #: statements per transaction, by variant
    statements: dict[str, float] = field(default_factory=dict)
    #: the statements of one transaction, by variant
    kinds: dict[str, Counter[str]] = field(default_factory=dict)


def calibrate(engine: sa.Engine, builds: Builds, count: int) -> Calibration:
    """Run ``count`` transactions of each variant here, to count their statements and to
    estimate the unit of work's rate (so as to prepare enough builds)."""
    found = Calibration()
    builds.ensure(1, count)
    ids = builds.take(0)[:count]
    for variant in VARIANTS:
        with StatementLog(engine) as statements:
            started = time.perf_counter()
            for i, build_id in enumerate(ids):
                if variant == UOW:
                    uow_transaction(engine, build_id)
                else:
                    append_transaction(engine, APPEND_IDS_FROM - count + i)
                if i == 0:
                    found.kinds[variant] = Counter(statements.kinds)
            elapsed = time.perf_counter() - started
        found.statements[variant] = statements.count / count
        if variant == UOW:
            found.uow_rate = count / elapsed
    builds.used(0, count)
    return found


# -- the databases ----------------------------------------------------------------


def _quote(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise SystemExit(f"--database: {name!r} is not a plain lower-case name")
    return f'"{name}"'


def migrated(url: str) -> None:
    """Migrate ``url`` as ``herald db upgrade`` does (schema, then the catalogue)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn)
            with conn.begin():
                sync_catalogue(conn)
    finally:
        engine.dispose()


@contextmanager
def scratch_postgresql(admin: URL, name: str) -> Iterator[str]:
    """A fresh, migrated database ``name``; dropped on the way out."""
    with psycopg.connect(conninfo(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {_quote(name)}")
    try:
        url = admin.set(database=name, drivername="postgresql").render_as_string(
            hide_password=False
        )
        migrated(url)
        yield url
    finally:
        with psycopg.connect(conninfo(admin), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")


@contextmanager
def scratch_sqlite(directory: Path | None) -> Iterator[str]:
    """A fresh, migrated SQLite file in a temporary directory; deleted on the way out."""
    with tempfile.TemporaryDirectory(prefix="herald-bench-", dir=directory) as where:
        url = f"sqlite:///{Path(where) / 'herald-bench.db'}"
        migrated(url)
        yield url


def host_machine() -> Machine:
    """The machine without a PostgreSQL server (a run on SQLite only)."""
    ram, model = 0.0, platform.processor() or "unknown"
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
    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=model,
        ram_gib=ram,
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        sqlalchemy=sa.__version__,
        psycopg=f"{psycopg.__version__} (libpq {psycopg.pq.version()}, {psycopg.pq.__impl__})",
        server_version="-",
        settings={},
        load=os.getloadavg(),
        other_sessions=0,
    )


# -- one backend ------------------------------------------------------------------


@dataclass(slots=True)
class BackendRun:
    backend: str
    cells: list[Cell] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    prepared: int = 0
    prepare_rate: float = 0.0
    top_ups: int = 0
    reruns: int = 0
    #: builds finished through the unit of work, and what the projection says
    finished: int = 0
    finished_in_projection: int = 0
    still_running: int = 0
    running_in_projection: int = 0
    log_rows: int = 0


def _count(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def run_backend(
    backend: str,
    url: str,
    writer_counts: Sequence[int],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> BackendRun:
    """Everything measured on one database: calibration, then the writer counts."""
    run = BackendRun(backend)
    engine = create_engine(url)
    try:
        builds = Builds(engine)
        run.calibration = calibrate(engine, builds, args.calibration)
        log(
            f"  calibration: unit of work {run.calibration.uow_rate:.0f} tx/s here; "
            f"statements/tx: append {run.calibration.statements[APPEND]:g}, "
            f"unit of work {run.calibration.statements[UOW]:g}"
        )
        pool = WriterPool(max(writer_counts), url)
        try:
            # The unit of work's tx/s, all writers together: from the calibration,
            # then from the best writer count measured so far (more writers on a
            # few cores gain little; a low guess costs a top-up, not a wrong figure).
            aggregate = run.calibration.uow_rate
            for writers in writer_counts:
                guess = aggregate * (1.2 if writers == 1 else 1.6)
                cells, reruns = measure_throughput(
                    backend, pool, builds, writers, guess / writers, args, log
                )
                run.cells.extend(cells.values())
                run.reruns += reruns
                aggregate = max(aggregate, cells[UOW].rate)
        finally:
            pool.close()
        run.prepared, run.prepare_rate, run.top_ups = builds.prepared, builds.rate, builds.top_ups
        run.finished = builds.finished
        run.still_running = sum(len(q) for q in builds.queues)
        run.finished_in_projection = _count(
            engine, "SELECT count(*) FROM herald_builds WHERE state = 'finished'"
        )
        run.running_in_projection = _count(
            engine, "SELECT count(*) FROM herald_builds WHERE state = 'running'"
        )
        run.log_rows = _count(engine, "SELECT count(*) FROM herald_events")
    finally:
        engine.dispose()
    return run


# -- report -----------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    args: argparse.Namespace
    machine: Machine
    runs: list[BackendRun]
    sqlite_version: str = sqlite3.sqlite_version
    sqlite_filesystem: str = "?"
    elapsed: float = 0.0
    revision: str = "?"
    digests: tuple[str, str] = ("?", "?")
    load_after: float = 0.0
    other_sessions_after: int | None = None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _groups(report: Report) -> list[tuple[str, int, dict[str, Cell]]]:
    groups: dict[tuple[str, int], dict[str, Cell]] = {}
    for run in report.runs:
        for cell in run.cells:
            groups.setdefault((cell.backend, cell.writers), {})[cell.variant] = cell
    return [
        (backend, writers, cells)
        for (backend, writers), cells in groups.items()
        if all(v in cells for v in VARIANTS)
    ]


def _ratio_cell(num: Cell, den: Cell) -> str:
    rounds = round_ratios(num, den)
    shown = f"{ratio(num, den):.2f}"
    if len(rounds) > 1:
        shown += " (" + ", ".join(f"{x:.2f}" for x in rounds) + ")"
    return shown


def _statements(report: Report, backend: str, variant: str) -> str:
    for run in report.runs:
        if run.backend == backend and variant in run.calibration.statements:
            return f"{run.calibration.statements[variant]:g}"
    return "?"


SUMMARY_HEADER: Final = [
    "backend",
    "writers",
    "append tx/s",
    "unit of work tx/s",
    "unit of work / append",
    "append ms p50 / p99",
    "unit of work ms p50 / p99",
    "client CPU µs/tx: append / unit of work",
]


def summary_rows(report: Report) -> list[list[str]]:
    rows = []
    for backend, writers, cells in _groups(report):
        a, u = cells[APPEND], cells[UOW]
        rows.append(
            [
                BACKEND_LABELS[backend],
                str(writers),
                f"{a.rate:,.0f}",
                f"{u.rate:,.0f}",
                _ratio_cell(u, a),
                f"{_ms(percentile(a.durations, 0.5))} / {_ms(percentile(a.durations, 0.99))}",
                f"{_ms(percentile(u.durations, 0.5))} / {_ms(percentile(u.durations, 0.99))}",
                f"{a.cpu_us_per_tx:.0f} / {u.cpu_us_per_tx:.0f}",
            ]
        )
    return rows


DETAIL_HEADER: Final = [
    "backend",
    "writers",
    "variant",
    "tx/s",
    "ms/tx p50 / p99",
    "client CPU µs/tx",
    "SQL statements/tx",
    "segments tx/s (in the order run)",
]


def detail_rows(report: Report) -> list[list[str]]:
    rows = []
    for backend, writers, cells in _groups(report):
        for variant in VARIANTS:
            cell = cells[variant]
            rows.append(
                [
                    BACKEND_LABELS[backend],
                    str(writers),
                    LABELS[variant],
                    f"{cell.rate:,.0f}",
                    (
                        f"{_ms(percentile(cell.durations, 0.5))} / "
                        f"{_ms(percentile(cell.durations, 0.99))}"
                    ),
                    f"{cell.cpu_us_per_tx:.0f}",
                    _statements(report, backend, variant),
                    " ".join(f"{x:.0f}" for x in cell.segments),
                ]
            )
    return rows


def _one_tx(kinds: Counter[str]) -> str:
    return ", ".join(f"`{k}`" + (f" ×{n}" if n > 1 else "") for k, n in kinds.items())


def throughput_notes(report: Report) -> list[str]:
    """Sentences computed from the figures: what a finish through the unit of work costs."""
    notes = []
    for backend, writers, cells in _groups(report):
        a, u = cells[APPEND], cells[UOW]
        a50, u50 = percentile(a.durations, 0.5), percentile(u.durations, 0.5)
        rounds = round_ratios(u, a)
        spread = f" (rounds {min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else ""
        extra_cpu = u.cpu_us_per_tx - a.cpu_us_per_tx
        note = (
            f"{BACKEND_LABELS[backend]}, {writers} writer(s): the unit of work commits "
            f"{ratio(u, a):.2f}× as many finishes per second as the raw append"
            f"{spread}: {u.rate:,.0f} against {a.rate:,.0f} tx/s. A finish takes "
            f"{_ms(u50)} ms at p50 against {_ms(a50)} ms ({1000 * (u50 - a50):+.1f} ms), and "
            f"{u.cpu_us_per_tx:,.0f} µs of client CPU against {a.cpu_us_per_tx:,.0f} "
            f"({extra_cpu:+,.0f} µs)"
        )
        # CPU per transaction is a mean: compare it with the mean time, not the p50.
        extra_time = 1e6 * (_mean(u.durations) - _mean(a.durations))
        if writers == 1 and extra_time > 0:
            note += (
                f": the extra client CPU is {100 * extra_cpu / extra_time:.0f} % of the "
                f"extra mean time per transaction ({extra_time / 1000:+.2f} ms)"
            )
        elif writers > 1:
            # client CPU × tx/s: how many cores' worth of CPU the writers used themselves
            note += (
                f"; the writers' own CPU came to {u.cpu_us_per_tx * u.rate / 1e6:.2f} "
                f"cores' worth (unit of work) and {a.cpu_us_per_tx * a.rate / 1e6:.2f} "
                f"(append), of {report.machine.cores} cores"
            )
        notes.append(note + ".")
    for run in report.runs:
        cal = run.calibration
        if APPEND in cal.kinds and UOW in cal.kinds:
            notes.append(
                f"Statements one transaction sends on {BACKEND_LABELS[run.backend]}: append "
                f"{_one_tx(cal.kinds[APPEND])}; unit of work {_one_tx(cal.kinds[UOW])}."
            )
    return notes


def checks(report: Report) -> list[str]:
    notes = []
    for run in report.runs:
        ok = (
            run.finished == run.finished_in_projection
            and run.still_running == run.running_in_projection
        )
        notes.append(
            f"{BACKEND_LABELS[run.backend]}: {run.prepared:,} builds were queued and started "
            f"beforehand through the unit of work, in transactions of {PREPARE_CHUNK:,} "
            f"({run.prepare_rate:,.0f} builds/s; {run.top_ups} top-up(s) between segments, "
            f"{run.reruns} segment(s) run again after a writer ran out); "
            f"{run.finished:,} were finished through the unit of work (calibration and "
            f"warm-ups included), and `herald_builds` says {run.finished_in_projection:,} "
            f"finished, {run.running_in_projection:,} running ({run.still_running:,} "
            f"expected) — {'consistent' if ok else '**inconsistent**'}. The log held "
            f"{run.log_rows:,} rows after the throughput runs."
        )
    return notes


def markdown(report: Report) -> str:
    m, args = report.machine, report.args
    dated = (
        f"Date: {date.today().isoformat()}. Script: `bench/unit_of_work.py` "
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
        "**Reproduce.** `make bench` (after B1), or `.venv/bin/python -m bench.unit_of_work` "
        "(options: `--seconds`, `--warmup`, `--rounds`, `--writers`, `--sqlite-writers`, "
        "`--backends`, `--help`; the PostgreSQL server from "
        f"`{URL_SETTING}`, default `{DEFAULT_URL}`). This run: `--seconds {args.seconds:g} "
        f"--warmup {args.warmup:g} --rounds {args.rounds} --writers "
        f"{' '.join(str(w) for w in args.writers)} --sqlite-writers "
        f"{' '.join(str(w) for w in args.sqlite_writers)} --backends "
        f"{' '.join(backends)}`."
    )
    length = args.seconds / (2 * args.rounds)
    measured = (
        "**What is measured.** Two ways of recording that a build finished, each one "
        "transaction, committed:"
    )
    variants = [
        (
            "*append*: the raw append of issue #2, `with engine.begin() as conn: "
            'herald.outbox.append(conn, "build_finished", {"build_id": id, '
            '"dependent_ids": [], "status": 0})`: one log row and nothing else (no build is '
            "read, no projection written)."
        ),
        (
            "*unit of work*: `with engine.begin() as conn: uow = UnitOfWork(conn); "
            "herald.outbox.farm.finish_build(uow, build_id, 0); uow.save()`: the build is "
            "loaded from its log events (`build_queued`, `build_started`) and replayed, "
            "`finish` is applied, its `build_finished` is appended with the aggregate's id "
            "and version, and the projections are updated (its `herald_builds` row; the statements "
            "are listed below). Every transaction finishes "
            "a different running build, queued and started beforehand through the unit of "
            f"work (`Build(...)` + `start()`, saved {PREPARE_CHUNK:,} a transaction)."
        ),
    ]
    method = (
        "Engines from `herald.config.create_engine`; writers are processes, each with its "
        f"own engine. Each writer count runs {args.rounds} mirrored round(s) (append, unit "
        f"of work, unit of work, append), each segment {length:g} s measured after a "
        f"{args.warmup:g} s warm-up, so each figure is {args.seconds:g} s of commits. "
        "ms/tx is the client-side time of one whole transaction (begin to commit); client "
        "CPU is the writer thread's CPU time (`time.thread_time()`) per transaction, so "
        "PostgreSQL's share is left out (SQLite runs inside the writer: its work counts). "
        "Both variants write to the same, growing log; "
        "on PostgreSQL `ANALYZE` runs after the builds are prepared (what autovacuum "
        "would do). No sequencer runs. Statements per transaction were counted with a "
        "`before_cursor_execute` listener, in this process, before the timed runs. Ratio "
        "cells give the ratio over the whole run, then each round's in parentheses."
    )
    where = (
        f"{m.cores} cores shared by the writers and PostgreSQL"
        if "postgresql" in backends
        else f"{m.cores} cores"
    )
    reading = (
        "**What the figures mean.** Issue #3 sets no target; these are costs. A raw append "
        "writes one log row and nothing else. A finish through the unit of work also reads "
        "the build's events and replays them in Python (the `eventsourcing` aggregate), "
        "appends with the aggregate's version (checked by the unique `(aggregate_id, "
        "aggregate_version)` index against a concurrent writer), and writes the "
        "projections, all in the same transaction; the commit (the WAL flush, on both "
        "backends) is paid once either way. So the ratio is the price of the state and its "
        "events committing together and of the version check, and the notes above say how "
        f"much of it is client CPU. The tx/s are the ceilings of this machine ({where}), "
        "not of a farm: the writers do nothing but finish builds."
    )
    bulk = (
        "The unit of work's other end, one evaluation adding 50,000 builds in one "
        "transaction, is B2: `bench/bulk.py`, against a raw `COPY` of the same rows."
    )
    lines = [
        BEGIN_MARK,
        "",
        TITLE,
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
        md_table(SUMMARY_HEADER, summary_rows(report)),
        "",
        *(f"- {note}" for note in throughput_notes(report)),
        "",
        "Per variant:",
        "",
        md_table(DETAIL_HEADER, detail_rows(report)),
        "",
        *(f"- {note}" for note in checks(report)),
        "",
    ]
    lines.extend([reading, "", bulk, "", END_MARK])
    return "\n".join(lines) + "\n"


def print_report(report: Report) -> None:
    print()
    print("Unit of work (issue #3) — saving a build finish: raw append vs the unit of work")
    print(text_table(SUMMARY_HEADER, summary_rows(report)))
    print()
    print(text_table(DETAIL_HEADER, detail_rows(report)))
    print()
    for note in [*throughput_notes(report), *checks(report)]:
        print(f"- {note.replace('**', '')}")


# -- main -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.unit_of_work",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="measured seconds per variant and writer count, split over the segments (default: 10)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="warm-up seconds before each segment"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds (append, unit of work, unit of work, append) per writer count; a "
        "segment lasts seconds / (2 × rounds) (default: 2)",
    )
    parser.add_argument(
        "--writers",
        type=int,
        nargs="+",
        default=[1, 8],
        metavar="N",
        help="concurrent writer processes on PostgreSQL (default: 1 8)",
    )
    parser.add_argument(
        "--sqlite-writers",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="concurrent writer processes on SQLite (default: 1)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("postgresql", "sqlite"),
        default=["postgresql", "sqlite"],
        help="the databases to measure (default: postgresql sqlite)",
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=200,
        help="transactions of each variant run first, to count statements and size the "
        "prepared builds (default: 200)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(URL_SETTING, DEFAULT_URL),
        help=f"the PostgreSQL server (default: ${URL_SETTING} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--database", default="herald_bench_uow", help="scratch PostgreSQL database name"
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
        default=True,
        help="rewrite the section of --output",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--seconds and --rounds must be positive, --warmup not negative")
    if min(args.writers + args.sqlite_writers) < 1:
        parser.error("writer counts must be at least 1")
    if args.calibration < 1:
        parser.error("--calibration must be at least 1")
    args.writers = sorted(set(args.writers))
    args.sqlite_writers = sorted(set(args.sqlite_writers))
    args.backends = list(dict.fromkeys(args.backends))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()

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
    runs: list[BackendRun] = []
    sqlite_filesystem = "?"
    for backend in args.backends:
        if backend == "postgresql":
            log(f"PostgreSQL: {args.database} on {admin.render_as_string(hide_password=True)}")
            with scratch_postgresql(admin, args.database) as url:
                runs.append(run_backend(backend, url, args.writers, args, log))
        else:
            with scratch_sqlite(args.sqlite_dir) as url:
                path = Path(make_url(url).database or ".")
                sqlite_filesystem = f"{filesystem_of(path.parent)}, `{path.parent.parent}`"
                log(f"SQLite: {path}")
                runs.append(run_backend(backend, url, args.sqlite_writers, args, log))
    report = Report(args, machine, runs, revision=revision, sqlite_filesystem=sqlite_filesystem)
    report.digests = (digest, source_digest())
    if report.digests[0] != report.digests[1]:
        log("WARNING: herald's sources changed during the run")
    report.load_after = os.getloadavg()[0]
    if use_pg:
        report.other_sessions_after = describe_machine(admin, args.database).other_sessions
    report.elapsed = time.monotonic() - began
    print_report(report)
    if args.write:
        write_section(args.output, "bench.unit_of_work", markdown(report))
        log(f"\nwrote {args.output}")


if __name__ == "__main__":
    run_script(main)
