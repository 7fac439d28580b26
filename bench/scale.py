"""B7: append and read rates with 10,000,000 events in the log, against the same at 100,000.

Run with ``make bench`` or ``.venv/bin/python -m bench.scale``.

Two scratch databases (``herald_bench_scale_small`` and ``herald_bench_scale_big``,
dropped first and at the end) are migrated as ``herald db upgrade`` does and
filled with ``--small`` and ``--big`` events, ``--chunk`` a transaction, by
``INSERT ... SELECT generate_series``: builds' lifecycles (``build_queued``,
``build_started``, three ``step_started`` / ``step_finished`` pairs with a log
path, ``build_finished`` with zero to three ``dependent_ids``), build ids from
1,000,000 (the same row sizes in both logs), every event of a build but
``build_finished`` under the build's aggregate id and its version
(``build_finished`` as the queue runner appends it, with no aggregate), one
event in ``--rare-every`` a ``build_cancelled`` (the rare topic),
``occurred_at`` 10 ms apart. Each chunk is given its seqs in log order, and
after each the script does what autovacuum would have done by then (with the
server's thresholds, or a table's own: every 100,000 inserts for the log and
its order, migrations 0007 and 0008); what a log's free space map holds, and
so where the next appends go, depends on it. Then the sequencer's stored state
is set to the snapshot after the fill (so that a sequencer finds nothing left
to order: the script checks that it does).

Then ``--rounds`` rounds. Each has a turn on each log (the two logs
alternating, mirrored: small big, big small, ...) for what changes the log,
then measures what can be measured on both logs side by side:

* **read** (what a consumer does; side by side): :func:`herald.outbox.read_page`,
  pages of ``--page`` each bounded by the head (as a reader's are), through
  ``--window`` seqs from ``--window`` before the head and from the start of the
  log (an old offset), with no topic filter, with ``build_finished`` (one
  event in nine) and with the rare topic; the rate is seqs of log gone
  through per second. Each window is read ``--read-trials`` times on each
  log, and more until each log's reads of it add up to ``--read-seconds``
  (a rare topic's window takes 30 ms, every topic's 2 s), the logs
  alternating (mirrored); the round's figure is the median of a log's reads
  (the first read's rate is in the notes);
* **daemon** (in the turn): a :class:`herald.consumers.Daemon` (as ``herald run`` runs it) with a
  consumer whose handler does nothing, ``topics=["*"]``, at_least_once, its offset
  set ``--window`` seqs before the head and at the start of the log; timed
  from ``start()`` until :func:`herald.consumers.wait_for` sees the window's
  last seq finished (start-up included, as in B3);
* **append** (in the turn) as B1 does it (:mod:`bench.append_throughput`'s ``herald
  (psycopg)`` writer processes: ``UPDATE bench_builds`` + one
  ``build_finished`` through :func:`herald.outbox.append` on a psycopg
  connection, committed), ``--writers`` writers, ``--seconds`` after
  ``--warmup``: first with no sequencer (the backlog they leave is then
  ordered, untimed); then again with the sequencer running
  (:func:`herald.outbox.run_sequencer`, what ``herald run`` runs, in a thread of
  this process) ordering as the writers commit;
* **ordering** (side by side, after the reads):
  the writers append to each log with no sequencer as above, leaving a
  backlog in each; then ``--ordering-trials`` calls of
  ``herald_sequence_v1()`` (what a sequencer cycle runs), and more until each
  log's calls add up to ``--ordering-seconds``, order each backlog,
  each call rolled back, the logs alternating (mirrored); the rate is the
  backlog's events over the median call (events/s). Then a sequencer orders
  the backlogs for real (it must order as many as every call did).

This server may run without autovacuum; between turns the script does what
autovacuum would have done by then (``VACUUM`` / ``ANALYZE`` of the tables past
the server's own autovacuum thresholds), untimed, so that neither log is read
with statistics from before the appends; and each turn starts with a
``CHECKPOINT`` (untimed), so that neither log's turn runs during a checkpoint
of the fill or of the other log's turn.

Each figure is the median of the rounds, with the spread (min–max); the ratio
is big / small; the target is within 1.25×: the big log's rate at least
1 / 1.25 = 0.8 of the small one's. It also reports the tables' and indexes'
sizes, and where the rows of each log's newest ``--window`` seqs lie in
``herald_events``'s heap at the end (how many pages a read of them reads, and how
many of the rows went to pages the fill had written: the free space map sends an
append to any page with room for it), and writes its section of ``BENCHMARKS.md``
(between the ``bench.scale`` markers).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from bench.append_throughput import (
    Machine,
    Segment,
    WriterPool,
    conninfo,
    create_scratch,
    describe_machine,
    drop_scratch,
    git_revision,
    md_table,
    text_table,
)
from bench.common import add_server_options, markers, run_script, write_section
from herald.config import create_engine
from herald.consumers import Consumer, Daemon, wait_for
from herald.consumers import store as consumer_store
from herald.outbox import LogEntry, Sequencer, TopicFilter, head, read_page, run_sequencer
from herald.schema.queries import QUERIES

BEGIN_MARK, END_MARK = markers("bench.scale")
TARGET: Final = 1.25
#: rows of bench_builds, B1's table (each writer updates its own share)
BUILD_ROWS: Final = 1000
RARE_TOPIC: Final = "build_cancelled"
#: The first build id of the fill. Ids of the same number of digits in both logs keep
#: their rows the same sizes: the room a full heap page has left, which later appends
#: may fill (the free space map sends an insert to any page with room), is then the
#: same in both, and only the size of the log differs.
FIRST_BUILD: Final = 1_000_000
#: the topic filters a read is measured with (label → filter)
FILTERS: Final = {
    "every topic": (),
    "build_finished": ("build_finished",),
    f"rare ({RARE_TOPIC})": (RARE_TOPIC,),
}

#: One chunk of the fill: event g (from 1) is event g % 9 of build FIRST_BUILD + g / 9;
#: every rare-th event is a build_cancelled. The build's events are its aggregate's,
#: except build_finished, appended by the queue runner (herald_append: no aggregate),
#: like B1's. %(lo)s..%(hi)s are the chunk's event numbers, %(count)s all of them (the
#: newest occurred now, each 10 ms after the last).
FILL_CHUNK: Final = """
INSERT INTO herald_events
    (topic, payload, delivery, aggregate_id, aggregate_version, occurred_at, recorded_at)
SELECT
    CASE WHEN s.rare THEN %(rare_topic)s
         WHEN s.k = 0 THEN 'build_queued'
         WHEN s.k = 1 THEN 'build_started'
         WHEN s.k = 8 THEN 'build_finished'
         WHEN s.k %% 2 = 0 THEN 'step_started'
         ELSE 'step_finished' END,
    CASE WHEN s.rare OR s.k < 2 THEN jsonb_build_object('build_id', s.b)
         WHEN s.k = 8 THEN jsonb_build_object('build_id', s.b, 'dependent_ids',
             to_jsonb(ARRAY(SELECT s.b + i FROM generate_series(1, s.b %% 4) AS i)))
         WHEN s.k %% 2 = 0 THEN jsonb_build_object('build_id', s.b, 'step_nr', s.k / 2)
         ELSE jsonb_build_object('build_id', s.b, 'step_nr', s.k / 2, 'log_path',
             '/nix/var/log/nix/drvs/' || substr(md5(s.b::text), 1, 2) || '/'
             || substr(md5(s.b::text), 3) || '-hello-2.12.1.drv.bz2') END,
    CASE WHEN s.rare OR s.k = 8 THEN 'at_least_once' ELSE 'ephemeral' END,
    CASE WHEN s.k = 8 AND NOT s.rare THEN NULL ELSE md5('herald:build:' || s.b)::uuid::text END,
    CASE WHEN s.k = 8 AND NOT s.rare THEN NULL ELSE s.k + 1 END,
    s.at,
    s.at
FROM (
    SELECT g, CAST(%(first_build)s AS bigint) + (g - 1) / 9 AS b, (g - 1) %% 9 AS k,
           g %% CAST(%(rare)s AS bigint) = 0 AS rare,
           now() - (CAST(%(count)s AS bigint) - g) * interval '10 milliseconds' AS at
    FROM generate_series(CAST(%(lo)s AS bigint), CAST(%(hi)s AS bigint)) AS g
) AS s
"""
#: The chunk's seqs: in position order, after the last seq given.
FILL_ORDER: Final = """
INSERT INTO herald_log (seq, position)
SELECT (SELECT coalesce(max(seq), 0) FROM herald_log) + row_number() OVER (ORDER BY position),
       position
FROM herald_events WHERE position > (SELECT coalesce(max(position), 0) FROM herald_log)
"""
#: After the fill: everything committed so far is ordered (the migration stored the
#: snapshot of before the fill, from which a sequencer would order it all again).
FILL_STATE: Final = """
UPDATE herald_sequencer
SET snapshot = pg_current_snapshot()::text, last_seq = %(last_seq)s, updated_at = now()
WHERE id = 1
"""


def _autovacuum_setting(name: str) -> str:
    """The table's own ``name`` (``ALTER TABLE ... SET``) or else the server's."""
    return (
        f"coalesce((SELECT option_value FROM pg_options_to_table(c.reloptions)"
        f" WHERE option_name = '{name}'), current_setting('{name}'))::float8"
    )


def _autovacuum_bound(setting: str) -> str:
    base = _autovacuum_setting(f"autovacuum_{setting}_threshold")
    scale = _autovacuum_setting(f"autovacuum_{setting}_scale_factor")
    return f"{base} + {scale} * greatest(c.reltuples, 0)"


#: What autovacuum would do now, with the server's thresholds (``pg_settings``) or the
#: table's own where it sets them (migrations 0007 and 0008 do for the log and its order).
AUTOVACUUM_DUE: Final = f"""
SELECT s.relname,
       s.n_dead_tup > {_autovacuum_bound("vacuum")}
       OR s.n_ins_since_vacuum > {_autovacuum_bound("vacuum_insert")} AS vacuum,
       s.n_mod_since_analyze > {_autovacuum_bound("analyze")} AS analyze
FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
"""
SIZES: Final = """
SELECT c.relname, '(heap)' AS part, pg_relation_size(c.oid), pg_total_relation_size(c.oid)
FROM pg_class AS c WHERE c.relname IN ('herald_events', 'herald_log')
UNION ALL
SELECT c.relname, i.relname, pg_relation_size(i.oid), pg_total_relation_size(c.oid)
FROM pg_index AS x
JOIN pg_class AS c ON c.oid = x.indrelid
JOIN pg_class AS i ON i.oid = x.indexrelid
WHERE c.relname IN ('herald_events', 'herald_log')
ORDER BY 1, 2
"""


def log(line: str) -> None:
    print(line, flush=True)


# -- the logs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the rows of a log's newest seqs lie in ``herald_events``'s heap."""

    rows: int
    pages: int
    #: of the rows, those on pages the fill had written (0 if the log was reused)
    on_fill_pages: int
    first_page: int
    last_page: int


@dataclass(slots=True)
class Log:
    """One scratch database and what the run keeps open on it."""

    label: str
    database: str
    url: URL
    events: int
    fill_seconds: float = 0.0
    engine: sa.Engine = field(init=False)
    pool: WriterPool | None = None
    #: (table, index or "(heap)", bytes, the table's total bytes) at the end
    sizes: list[tuple[str, str, int, int]] = field(default_factory=list)
    #: what the script did for autovacuum between turns
    maintenance: list[str] = field(default_factory=list)
    #: what it did for autovacuum during the fill
    fill_maintenance: list[str] = field(default_factory=list)
    #: heap pages of ``herald_events`` after the fill (None: the log was reused)
    fill_pages: int | None = None
    #: where the newest window's rows lie at the end (:func:`measure_placement`)
    placement: Placement | None = None

    def __post_init__(self) -> None:
        self.engine = create_engine(self.text_url)

    @property
    def text_url(self) -> str:
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def dsn(self) -> str:
        return conninfo(self.url)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.engine.dispose()


def fill(dsn: str, count: int, chunk: int, rare: int) -> tuple[float, list[str]]:
    """``count`` events, ``chunk`` a transaction, ordered; the seconds it took, and what
    the autovacuum of the fill did.

    After each chunk, what autovacuum would do by then (:func:`autovacuum`): a log is
    not vacuumed once when it holds millions of events, but every so many inserts (for
    ``herald_events`` and ``herald_log`` every 100,000: migrations 0007 and 0008), and
    what the free space map holds of a log (the room later appends go to first) depends
    on it."""
    started = time.perf_counter()
    maintenance: list[str] = []
    with psycopg.connect(dsn) as conn:
        done = 0
        while done < count:
            hi = min(count, done + chunk)
            params = {
                "lo": done + 1,
                "hi": hi,
                "count": count,
                "rare": rare,
                "first_build": FIRST_BUILD,
            }
            conn.execute(FILL_CHUNK, {**params, "rare_topic": RARE_TOPIC})
            conn.execute(FILL_ORDER)
            conn.commit()
            # The chunk's inserts into the statistics autovacuum reads, before it looks.
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.commit()
            maintenance += autovacuum(dsn)
            done = hi
            if done % max(chunk, count // 10) < chunk or done == count:
                log(f"  {done:>12,} / {count:,} events ({time.perf_counter() - started:.0f} s)")
        conn.execute(FILL_STATE, {"last_seq": count})
        conn.commit()
    return time.perf_counter() - started, maintenance


def prepare(args: argparse.Namespace, label: str, count: int) -> Log:
    admin = make_url(args.admin)
    name = f"{args.database}_{label}"
    if args.reuse:
        try:
            url = admin.set(database=name)
            with psycopg.connect(conninfo(url)) as conn:
                row = conn.execute("SELECT last_seq FROM herald_sequencer").fetchone()
            if row is not None and row[0] >= count:
                log(f"{name}: reused, {row[0]:,} events")
                return Log(label, name, url, int(row[0]))
        except psycopg.Error:
            pass
    log(f"{name}: creating and filling {count:,} events, {args.chunk:,} a transaction")
    url = create_scratch(admin, name, BUILD_ROWS)
    seconds, maintenance = fill(conninfo(url), count, args.chunk, args.rare_every)
    log(f"{name}: filled in {seconds:.1f} s")
    scale = Log(label, name, url, count, seconds)
    scale.fill_maintenance = maintenance
    with psycopg.connect(scale.dsn) as conn:
        row = conn.execute(HEAP_PAGES).fetchone()
        assert row is not None
        scale.fill_pages = int(row[0])
    with scale.engine.connect() as conn:
        found = Sequencer().cycle(conn)
        if found:
            raise SystemExit(f"{name}: a sequencer ordered {found} events again after the fill")
        if head(conn) != count:
            raise SystemExit(f"{name}: the log's head is {head(conn)}, not {count}")
        conn.rollback()
    return scale


def autovacuum(dsn: str) -> list[str]:
    """VACUUM / ANALYZE what autovacuum would have by now (untimed); what it did."""
    done = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, vacuum, analyze in conn.execute(AUTOVACUUM_DUE).fetchall():
            what = " ".join(w for w, due in (("VACUUM", vacuum), ("ANALYZE", analyze)) if due)
            if what:
                conn.execute(f'{what} "{table}"')
                done.append(f"{what} {table}")
    return done


def checkpoint(scale: Log) -> None:
    """Write the server's dirty pages out before a turn (untimed): each log's turn starts
    from the same state, not in the middle of a checkpoint of what came before."""
    with psycopg.connect(scale.dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def measure_sizes(scale: Log) -> None:
    with psycopg.connect(scale.dsn) as conn:
        scale.sizes = [
            (table, part, int(size), int(total))
            for table, part, size, total in conn.execute(SIZES).fetchall()
        ]


#: Heap pages of ``herald_events``.
HEAP_PAGES: Final = "SELECT pg_relation_size('herald_events') / current_setting('block_size')::int"
#: The heap pages the rows of the newest %(window)s seqs lie on (a ctid is (page, item)).
PLACEMENT: Final = """
SELECT count(*), count(DISTINCT p.page),
       count(*) FILTER (WHERE p.page < %(fill_pages)s), min(p.page), max(p.page)
FROM (SELECT (e.ctid::text::point)[0]::bigint AS page
      FROM herald_log AS l JOIN herald_events AS e ON e.position = l.position
      WHERE l.seq > (SELECT max(seq) FROM herald_log) - %(window)s) AS p
"""


def measure_placement(scale: Log, window: int) -> None:
    """Where the newest ``window`` seqs' rows lie: a read of them reads these pages."""
    with psycopg.connect(scale.dsn) as conn:
        row = conn.execute(
            PLACEMENT, {"window": window, "fill_pages": scale.fill_pages or 0}
        ).fetchone()
    assert row is not None
    scale.placement = Placement(*(int(v or 0) for v in row))


def placement_text(scale: Log, window: int) -> str:
    where = scale.placement
    if where is None:
        return f"{scale.label} log: not measured"
    fill = (
        "the fill's pages unknown (the log was reused)"
        if scale.fill_pages is None
        else f"{where.on_fill_pages:,} of them on the {scale.fill_pages:,} pages the fill wrote"
    )
    return (
        f"{scale.label} log: the newest {window:,} seqs' {where.rows:,} rows on "
        f"{where.pages:,} heap pages ({where.rows / max(where.pages, 1):.1f} rows a page; "
        f"pages {where.first_page:,}–{where.last_page:,}), {fill}"
    )


def counts(scale: Log) -> tuple[int, int, int]:
    """(events, log rows, head): every event ordered once at the end of the run."""
    with psycopg.connect(scale.dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM herald_events), (SELECT count(*) FROM herald_log), "
            "(SELECT coalesce(max(seq), 0) FROM herald_log)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# -- the measurements ----------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    """Every measured rate: (measurement, log label) → one rate per round."""

    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: measurement → its unit
    units: dict[str, str] = field(default_factory=dict)
    #: what was read or appended, for the text (measurement, log) → notes per round
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, name: str, scale: Log, rate: float, unit: str, note: str = "") -> None:
        self.rates.setdefault((name, scale.label), []).append(rate)
        self.units[name] = unit
        if note:
            self.notes.setdefault((name, scale.label), []).append(note)
        log(f"  {scale.label:5} {name:48} {rate:>10,.0f} {unit}{f'  ({note})' if note else ''}")

    @property
    def names(self) -> list[str]:
        """The measurements in the table's order: reads, the daemon, then per writer
        count the appends with no sequencer, the ordering of their backlog, and the
        appends with the sequencer running."""
        return sorted(dict.fromkeys(name for name, _ in self.rates), key=_table_place)


def _table_place(name: str) -> tuple[int, int, int]:
    if name.startswith("read_page"):
        return (0, 0, 0)
    if name.startswith("daemon"):
        return (1, 0, 0)
    writers = int(name.split(" writer", maxsplit=1)[0].rsplit(" ", 1)[-1])
    kind = 1 if name.startswith("sequencer ordering") else 2 if "running" in name else 0
    return (2, writers, kind)


def read_window(engine: sa.Engine, after: int, window: int, page: int, topics: TopicFilter) -> Run:
    """``read_page`` from ``after``, page by page, until ``window`` seqs are behind.

    As a consumer reads: each page is bounded by the head (not by the window's
    end), so the statement is the one a consumer that far behind sends.
    """
    start, entries, pages = after, 0, 0
    with engine.connect() as conn:
        started = time.perf_counter()
        while after < start + window:
            found = read_page(conn, after, page, topics or None)
            conn.rollback()
            entries += len(found.entries)
            pages += 1
            after = found.next_after
            if found.at_head:
                break
        seconds = time.perf_counter() - started
    return Run(after - start, entries, pages, seconds)


@dataclass(frozen=True, slots=True)
class Run:
    seqs: int
    entries: int
    pages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.seqs / self.seconds


#: No more sweeps than this over both logs, however short a read or a call is.
MAX_TRIALS: Final = 41


def _trials(least: int, seconds: float, spent: dict[str, float]) -> Iterator[int]:
    """Sweep numbers over both logs: ``least`` of them, then more until each log's
    measurements add up to ``seconds`` (``spent``, by log, kept by the caller; at
    most :data:`MAX_TRIALS`).

    A window read in 30 ms, or a sequencer call of 50 ms, is one sample of a
    noisy machine; a 2 s read is many. Measuring each for about the same time
    gives the short ones as many chances as the long ones to see both logs
    alike.
    """
    trial = 0
    while trial < MAX_TRIALS and (trial < least or min(spent.values()) < seconds):
        yield trial
        trial += 1


def measure_reads(order: Sequence[Log], figures: Figures, args: argparse.Namespace) -> None:
    """Every read on both logs side by side, ``--read-trials`` times each and more
    until a log's add up to ``--read-seconds``, the logs alternating (mirrored); a
    round's figure is the median of a log's reads.

    A read changes nothing, so both logs can be read in the same moments: a
    window of 100,000 seqs takes 30 ms to 2 s to read, and one read a turn
    measured whichever log's turn the machine was slow in.
    """
    starts: dict[str, dict[str, int]] = {"newest": {}, "start of the log": {}}
    for scale in order:
        with scale.engine.connect() as conn:
            starts["newest"][scale.label] = max(0, head(conn) - args.window)
            conn.rollback()
        starts["start of the log"][scale.label] = 0
    for where, afters in starts.items():
        for label, topics in FILTERS.items():
            runs: dict[str, list[Run]] = {scale.label: [] for scale in order}
            spent = dict.fromkeys(runs, 0.0)
            for trial in _trials(args.read_trials, args.read_seconds, spent):
                for scale in order if trial % 2 == 0 else reversed(order):
                    run = read_window(
                        scale.engine,
                        afters[scale.label],
                        args.window,
                        args.page,
                        TopicFilter(topics),
                    )
                    runs[scale.label].append(run)
                    spent[scale.label] += run.seconds
            for scale in order:
                found = runs[scale.label]
                figures.add(
                    f"read_page, {where}, {label}",
                    scale,
                    _median([run.rate for run in found]),
                    "seqs/s",
                    f"{found[0].entries:,} entries in {found[0].pages} pages; {len(found)} reads, "
                    f"the first {found[0].rate:,.0f} seqs/s",
                )


def _noop(_entry: LogEntry) -> None:
    return None


def measure_daemon(scale: Log, figures: Figures, args: argparse.Namespace, number: int) -> None:
    with scale.engine.connect() as conn:
        top = head(conn)
        conn.rollback()
    starts = {"newest": max(0, top - args.window), "start of the log": 0}
    for where, after in starts.items():
        name = f"scale-{number}-{'new' if after else 'old'}"
        with scale.engine.begin() as conn:
            consumer_store.ensure_consumer(conn, name)
            consumer_store.reset_offset(conn, name, after)
        consumer = Consumer(name, ["*"], _noop, delivery="at_least_once")
        started = time.perf_counter()
        daemon = Daemon(scale.engine, [consumer]).start()
        try:
            wait_for(scale.engine, name, after + args.window, timeout=600)
            seconds = time.perf_counter() - started
        finally:
            daemon.stop()
        figures.add(f"daemon (no-op consumer), {where}", scale, args.window / seconds, "events/s")


def _segment(pool: WriterPool, writers: int, args: argparse.Namespace, number: int) -> float:
    seconds: float = args.seconds
    results = pool.run(Segment("herald_psycopg", writers, 0.0, args.warmup, seconds, number))
    return sum(r.transactions for r in results) / seconds


def _order_all(scale: Log) -> int:
    """Order what has committed (one sequencer, cycles until nothing is left); how many."""
    ordered = 0
    with scale.engine.connect() as conn:
        sequencer = Sequencer()
        while found := sequencer.cycle(conn):
            ordered += found
    return ordered


def measure_appends(scale: Log, figures: Figures, args: argparse.Namespace, number: int) -> None:
    pool = _pool(scale, args)
    for writers in args.writers:
        who = f"{writers} writer{'s' if writers > 1 else ''}"
        rate = _segment(pool, writers, args, number)
        figures.add(f"append, {who}, no sequencer", scale, rate, "tx/s")
        _order_all(scale)  # the backlog those left (its ordering: measure_ordering)

        stop, active = threading.Event(), threading.Event()
        running = Sequencer()
        engine = create_engine(scale.text_url)
        thread = threading.Thread(
            target=run_sequencer,
            args=(engine, stop),
            kwargs={"on_active": active, "sequencer": running},
            name="bench-sequencer",
            daemon=True,
        )
        thread.start()
        try:
            if not active.wait(30):
                raise SystemExit(f"{scale.database}: the sequencer did not become active")
            rate = _segment(pool, writers, args, number)
        finally:
            stop.set()
            thread.join(30)
            engine.dispose()
        figures.add(
            f"append, {who}, sequencer running",
            scale,
            rate,
            "tx/s",
            f"{running.stats.sequenced:,} events ordered in {running.stats.cycles:,} cycles",
        )
        _order_all(scale)  # what committed after the sequencer stopped


def _pool(scale: Log, args: argparse.Namespace) -> WriterPool:
    if scale.pool is None:
        scale.pool = WriterPool("process", max(args.writers), scale.dsn, scale.text_url, BUILD_ROWS)
    return scale.pool


def _ordering_trial(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    """One call of the sequencer's function, rolled back: (events it ordered, seconds)."""
    started = time.perf_counter()
    row = conn.execute(QUERIES["sequence"]).fetchone()
    seconds = time.perf_counter() - started
    conn.rollback()
    assert row is not None
    return int(row[0]), seconds


def measure_ordering(
    order: Sequence[Log], figures: Figures, args: argparse.Namespace, number: int
) -> None:
    """The sequencer ordering a backlog, on both logs side by side (after a round's turns).

    For each writer count, the writers append to each log with no sequencer
    (``--seconds``, as in the append turn), leaving a backlog in both. Then
    ``--ordering-trials`` calls of ``herald_sequence_v1()`` (what a cycle
    runs), and more until a log's add up to ``--ordering-seconds``, each
    rolled back, so each orders the same backlog again, the logs alternating
    (mirrored: small big big small ...): a drift of the machine during the
    round falls on both logs alike, where one cycle a turn measured whichever
    log's turn ran while the machine was slow. A round's figure is
    the median of a log's trials. Then one sequencer orders the backlogs for real,
    and what autovacuum would do next is done (the rolled-back trials leave
    dead rows in the log's order).
    """
    for writers in args.writers:
        who = f"{writers} writer{'s' if writers > 1 else ''}"
        for scale in order:
            _segment(_pool(scale, args), writers, args, number)
        trials: dict[str, list[tuple[int, float]]] = {scale.label: [] for scale in order}
        # One session a log, as the sequencer's own: the function is compiled and its
        # statements planned once, on the first call, in both logs alike.
        with ExitStack() as stack:
            sessions = {s.label: stack.enter_context(psycopg.connect(s.dsn)) for s in order}
            spent = dict.fromkeys(trials, 0.0)
            for trial in _trials(args.ordering_trials, args.ordering_seconds, spent):
                for scale in order if trial % 2 == 0 else reversed(order):
                    trial_result = _ordering_trial(sessions[scale.label])
                    trials[scale.label].append(trial_result)
                    spent[scale.label] += trial_result[1]
        for scale in order:
            found = trials[scale.label]
            sizes = {count for count, _ in found}
            if len(sizes) != 1 or not found[0][0]:
                raise SystemExit(f"{scale.database}: the trials ordered {sorted(sizes)} events")
            ordered = found[0][0]
            seconds = [s for _, s in found]
            committed = _order_all(scale)
            if committed != ordered:
                raise SystemExit(f"{scale.database}: {committed} ordered, not {ordered}")
            figures.add(
                f"sequencer ordering the backlog of {who}",
                scale,
                ordered / _median(seconds),
                "events/s",
                f"{ordered:,} events in {1000 * min(seconds):.0f}–{1000 * max(seconds):.0f} ms "
                f"({len(seconds)} calls)",
            )
    for scale in order:
        scale.maintenance += autovacuum(scale.dsn)


# -- the report --------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{_median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def result_rows(figures: Figures, small: Log, big: Log) -> list[list[str]]:
    rows = []
    for name in figures.names:
        a = figures.rates.get((name, small.label), [])
        b = figures.rates.get((name, big.label), [])
        ratio = _median(b) / _median(a) if a and b else float("nan")
        verdict = "meets" if ratio >= 1 / TARGET else "**misses**"
        rows.append([name, figures.units[name], _cell(a), _cell(b), f"{ratio:.2f}", verdict])
    return rows


def size_rows(small: Log, big: Log) -> list[list[str]]:
    small_sizes = {(t, p): s for t, p, s, _ in small.sizes}
    rows = []
    for table, part, size, _total in big.sizes:
        rows.append(
            [f"`{table}`", f"`{part}`", _mib(small_sizes.get((table, part), 0)), _mib(size)]
        )
    for table in dict.fromkeys(t for t, _, _, _ in big.sizes):
        totals = [total for t, _, _, total in big.sizes if t == table]
        small_totals = [total for t, _, _, total in small.sizes if t == table]
        rows.append(
            [
                f"`{table}`",
                "**total** (`pg_total_relation_size`)",
                _mib(small_totals[0] if small_totals else 0),
                _mib(totals[0]),
            ]
        )
    return rows


def notes_list(figures: Figures, small: Log, big: Log) -> str:
    """What each measurement noted (cycle sizes, first reads), by log, round by round."""
    lines = [
        f"- {name}, {scale.label} log: " + "; ".join(notes)
        for name in figures.names
        for scale in (small, big)
        if (notes := figures.notes.get((name, scale.label)))
    ]
    return "\n".join(lines) or "- none"


def _maintenance(done_list: list[str]) -> str:
    done = Counter(done_list)
    return ", ".join(f"{what} ×{count}" for what, count in sorted(done.items())) or "nothing"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


RESULT_HEADER: Final = ("measurement", "unit", "small log", "big log", "big / small", "verdict")
SIZE_HEADER: Final = ("table", "part", "small log", "big log")


@dataclass(slots=True)
class Report:
    args: argparse.Namespace
    machine: Machine
    figures: Figures
    small: Log
    big: Log
    #: (events, log rows, head) of each log at the end
    final: dict[str, tuple[int, int, int]]
    settings: dict[str, str]
    elapsed: float = 0.0


def server_settings(dsn: str) -> dict[str, str]:
    names = ("shared_buffers", "effective_cache_size", "work_mem", "autovacuum", "max_wal_size")
    found = {}
    with psycopg.connect(dsn) as conn:
        for name in names:
            row = conn.execute(f"SHOW {name}").fetchone()
            found[name] = str(row[0]) if row else "?"
    return found


def markdown(report: Report) -> str:
    args, m, small, big = report.args, report.machine, report.small, report.big
    rows = result_rows(report.figures, small, big)
    missed = [row[0] for row in rows if "misses" in row[5]]
    verdict = (
        "every rate is within 1.25× (**meets**)"
        if not missed
        else f"**misses** on {len(missed)} of {len(rows)}: " + "; ".join(missed)
    )
    settings = ", ".join(f"`{k}={v}`" for k, v in report.settings.items())
    fills = "; ".join(
        f"{s.label} log: {s.events:,} events"
        + (f" in {s.fill_seconds:.1f} s" if s.fill_seconds else " (reused)")
        for s in (small, big)
    )
    ends = "; ".join(
        f"{s.label}: {report.final[s.label][0]:,} events, {report.final[s.label][1]:,} "
        f"ordered, head {report.final[s.label][2]:,}"
        for s in (small, big)
    )
    maintenance = "; ".join(f"{s.label} log: {_maintenance(s.maintenance)}" for s in (small, big))
    fill_maintenance = "; ".join(
        f"{s.label} log: {_maintenance(s.fill_maintenance)}" for s in (small, big)
    )
    writers = " ".join(str(w) for w in args.writers)
    return f"""{BEGIN_MARK}

## B7 — append and read rates with {args.big:,} events in the log (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/scale.py` (whole run {report.elapsed:.0f} s).
{git_revision()}.

**Machine.** {m.cores} cores ({m.cpu_model}), {m.ram_gib:.1f} GiB RAM, PostgreSQL
{m.server_version} on the same machine, {settings}; other client sessions on the server at
the start: {m.other_sessions}; load average (1 min) {m.load[0]:.2f} at the start.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.scale --small {args.small}
--big {args.big} --rounds {args.rounds} --window {args.window} --seconds {args.seconds:g}
--writers {writers}` (`--chunk`, `--page`, `--warmup`, `--read-trials`, `--read-seconds`,
`--ordering-trials`, `--ordering-seconds`, `--rare-every`, `--no-daemon`, `--admin`,
`--database`, `--help`).

**The logs.** Filled by `INSERT ... SELECT generate_series`, {args.chunk:,} events a
transaction, each ordered, and after each what autovacuum would have done by then
({fill_maintenance}): {fills}. Builds' lifecycles (`build_queued`,
`build_started`, three `step_started`/`step_finished` with a log path, `build_finished` with
0–3 `dependent_ids`); build ids from {FIRST_BUILD:,}, so that rows are the same sizes in
both logs and so is the room left in full heap pages (the free space map sends later
appends to any page with room); each build an aggregate (its events versioned) but
`build_finished`, appended as the queue runner does, with no aggregate; one event in
{args.rare_every:,} a `{RARE_TOPIC}` (the rare topic). At the end: {ends}. Between turns
the script did what autovacuum would have (the server runs with `autovacuum` as shown above;
its thresholds, or a table's own):
{maintenance}. Each turn starts with a `CHECKPOINT` (untimed): the fill of the big log leaves
gigabytes of dirty buffers and WAL behind, and a checkpoint writing them out during the big
log's turns would be counted as the big log's cost.

**What is measured**, {args.rounds} rounds, each with a turn on each log (the logs
alternating, mirrored) for what changes the log, then what can be measured on both logs
side by side:

- *read_page* (side by side, after both logs' turns of the round and a `CHECKPOINT` of each):
  `herald.outbox.read_page` page by page ({args.page:,} a page, each bounded by the head as a
  reader's is) through {args.window:,} seqs from {args.window:,} before the head and from the
  start of the log, with no topic filter (what `LogReader` sends), with `build_finished` (one
  event in nine of the fill) and with the rare topic (a filtered page spans at most 10,000
  seqs); seqs of log gone through per second. Each window is read {args.read_trials} times on
  each log, and more until a log's reads of it add up to {args.read_seconds:g} s (at most
  {MAX_TRIALS}), the logs alternating (small big big small ...), and a round's figure is the
  median of a log's reads: a window takes 30 ms to 2 s to read, and a read a turn measured
  whichever log's turn the machine was slow in; a short read is one sample of a noisy
  machine, and is repeated until it has had about as much time as a long one. The first read
  of each (the newest rows read cold) and the count of reads are in the notes below the table;
- *daemon* (in each log's turn): `herald.consumers.Daemon` with one no-op consumer
  (`topics=["*"]`, at_least_once, batch 500, a delivery record per event) from an offset
  {args.window:,} before the head and from the start, until `wait_for` sees the
  {args.window:,}th seq finished; start-up included;
- *append* (in each log's turn): B1's `herald (psycopg)` writer processes
  (`UPDATE bench_builds` + one `build_finished` by `herald.outbox.append` on a psycopg
  connection, committed), {args.seconds:g} s after {args.warmup:g} s of warm-up: with no
  sequencer (the backlog they leave is ordered, untimed); then again while `run_sequencer`
  (what `herald run` runs) orders the events as they commit;
- *sequencer ordering*: after both logs' turns of a round, the same writers append to each
  log for {args.seconds:g} s with no sequencer, leaving a backlog in both; then
  {args.ordering_trials} calls of `herald_sequence_v1()` (what a sequencer cycle runs, on one
  session a log), and more until a log's calls add up to {args.ordering_seconds:g} s (at most
  {MAX_TRIALS}), order each backlog, each call rolled back, the logs alternating (small big
  big small ...), so that a drift of the machine falls on both logs alike (one cycle a turn
  measured whichever log's turn the machine was slow in); the first call of each reads the
  backlog's rows cold, the others warm. A round's rate is the backlog's events over the
  median call; then a sequencer orders both backlogs for real (as many events as each call
  ordered, or the run stops), and what autovacuum would do next is done (the calls leave
  dead rows in `herald_log`).

Each cell: the median of the rounds (min–max); the target is big / small ≥ {1 / TARGET:.2f}.

{md_table(RESULT_HEADER, rows)}

Result: {verdict}.

Notes, a log's rounds in the order run:

{notes_list(report.figures, small, big)}

Sizes at the end of the run (`pg_relation_size` of the heap and of each index):

{md_table(SIZE_HEADER, size_rows(small, big))}

Where the newest window lies at the end (the heap pages of `herald_events` that a read of the
newest {args.window:,} seqs reads; `ctid`):

- {placement_text(small, args.window)};
- {placement_text(big, args.window)}.

{END_MARK}
"""


def print_report(report: Report) -> None:
    print()
    rows = [
        [c.replace("**", "") for c in row]
        for row in result_rows(report.figures, report.small, report.big)
    ]
    print(text_table(RESULT_HEADER, rows))
    print()
    print(
        text_table(
            SIZE_HEADER,
            [[c.replace("`", "") for c in row] for row in size_rows(report.small, report.big)],
        )
    )
    print()
    for scale in (report.small, report.big):
        print(placement_text(scale, report.args.window))


# -- main ----------------------------------------------------------------------------------


def add_fill_options(parser: argparse.ArgumentParser) -> None:
    """How the scratch logs are filled (:func:`prepare` reads these) and whether kept."""
    parser.add_argument(
        "--chunk",
        type=int,
        default=50_000,
        help="Events per fill transaction (after each, what autovacuum would do).",
    )
    parser.add_argument(
        "--rare-every", type=int, default=10_000, help="One event in N has the rare topic."
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Use the scratch databases as they are if they hold enough events (no refill).",
    )
    parser.add_argument(
        "--keep", action="store_true", help="Leave the scratch databases (to investigate)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument("--small", type=int, default=100_000, help="Events in the small log.")
    parser.add_argument("--big", type=int, default=10_000_000, help="Events in the big log.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds (each log once a round).")
    parser.add_argument("--window", type=int, default=100_000, help="Seqs read per read run.")
    parser.add_argument("--page", type=int, default=1000, help="Entries per read_page.")
    parser.add_argument(
        "--writers", type=int, nargs="+", default=[1, 4], help="Writer process counts."
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="Seconds per append run.")
    parser.add_argument("--warmup", type=float, default=0.5, help="Warm-up per append run.")
    parser.add_argument(
        "--read-trials",
        type=int,
        default=3,
        help="Reads of each window per log and round, the logs alternating.",
    )
    parser.add_argument(
        "--ordering-trials",
        type=int,
        default=5,
        help="Rolled-back sequencer calls per log and writer count, the logs alternating.",
    )
    parser.add_argument(
        "--read-seconds",
        type=float,
        default=0.5,
        help="More reads of a window, past --read-trials, until each log's add up to this.",
    )
    parser.add_argument(
        "--ordering-seconds",
        type=float,
        default=0.5,
        help="More sequencer calls, past --ordering-trials, until each log's add up to this.",
    )
    parser.add_argument(
        "--daemon", action=argparse.BooleanOptionalAction, default=True, help="Measure the daemon."
    )
    add_fill_options(parser)
    add_server_options(parser, "herald_bench_scale")
    args = parser.parse_args(argv)
    if (
        min(args.small, args.big, args.chunk, args.rounds, args.page, args.rare_every) < 1
        or min(args.read_trials, args.ordering_trials) < 1
    ):
        parser.error(
            "sizes, --chunk, --rounds, --page, --rare-every, --read-trials and "
            "--ordering-trials must be at least 1"
        )
    if args.window > args.small:
        parser.error("--window must not be larger than --small")
    if min(args.read_seconds, args.ordering_seconds) < 0:
        parser.error("--read-seconds and --ordering-seconds must not be negative")
    if args.seconds <= 0 or args.warmup < 0 or min(args.writers) < 1:
        parser.error("--seconds must be positive, --warmup not negative, --writers at least 1")
    args.writers = sorted(set(args.writers))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()
    admin = make_url(args.admin)
    logs: list[Log] = []
    try:
        small = prepare(args, "small", args.small)
        logs.append(small)
        big = prepare(args, "big", args.big)
        logs.append(big)
        machine = describe_machine(admin, big.database)
        settings = server_settings(big.dsn)
        figures = Figures()
        steps: list[Callable[[Log, int], None]] = [
            *([lambda s, n: measure_daemon(s, figures, args, n)] if args.daemon else []),
            lambda s, n: measure_appends(s, figures, args, n),
        ]
        for number in range(args.rounds):
            order = (small, big) if number % 2 == 0 else (big, small)
            for scale in order:
                log(f"round {number + 1}/{args.rounds}: {scale.label} log ({scale.database})")
                checkpoint(scale)
                for step in steps:
                    step(scale, number)
                scale.maintenance += autovacuum(scale.dsn)
            for scale in order:
                checkpoint(scale)
            measure_reads(order, figures, args)
            measure_ordering(order, figures, args, number)
        for scale in logs:
            measure_sizes(scale)
            measure_placement(scale, args.window)
        final = {s.label: counts(s) for s in logs}
        for label, (events, ordered, top) in final.items():
            if not events == ordered == top:
                raise SystemExit(f"{label} log: {events} events, {ordered} ordered, head {top}")
        report = Report(args, machine, figures, small, big, final, settings)
    finally:
        for scale in logs:
            scale.close()
        if not args.keep:
            for label in ("small", "big"):
                drop_scratch(admin, f"{args.database}_{label}")
    report.elapsed = time.monotonic() - began
    print_report(report)
    section = markdown(report)
    write_section(Path(args.markdown), "bench.scale", section)
    log(f"wrote {args.markdown}")


if __name__ == "__main__":
    run_script(main)
