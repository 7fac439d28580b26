"""The audit queries on a log of a million events read what they report, not the log.

One PostgreSQL database (for the module) is filled with SQL, straight into
the tables: 100,000 builds of 10 aggregate events each (their real aggregate
ids, interleaved as concurrent builds are), their order rows, and delivery
records of two consumers; then VACUUM ANALYZE. Each audit query is run with
every statement it sends captured (SQLAlchemy's ``before_cursor_execute``),
and each statement is run again under ``EXPLAIN (ANALYZE, FORMAT JSON)``
with the same parameters: no plan may scan the big tables sequentially, and
the rows the plans touch must stay small. The same measure applied to a
query no index serves shows a sequential scan of the whole log, so the
measure can tell the two apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

import pytest
import sqlalchemy as sa

from herald.audit import build_timeline, consumer_report, pending, topic_counts
from herald.config import create_engine
from herald.domain import Build
from herald.outbox import TopicFilter
from tests.conftest import _scratch_database

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

BUILDS: Final = 100_000
#: Each build's events, in version order (build_finished: at least once, the rest ephemeral).
TOPICS: Final = (
    "build_queued",
    "build_started",
    "step_started",
    "step_finished",
    "step_started",
    "step_finished",
    "step_started",
    "step_finished",
    "herald.build_waiting",
    "build_finished",
)
EVENTS: Final = BUILDS * len(TOPICS)
#: Builds that progress together: their events interleave in the log.
WAVE: Final = 500
#: The time between two events' recorded_at (a million events: about 35 days).
STEP: Final = timedelta(seconds=3)
#: "status" (build_started, build_finished) has finished all but the last LAG seqs; a
#: failed first attempt every FLAKY seqs; the build_finished of every PARKED_EVERY-th
#: build parked.
STATUS_TOPICS: Final = ("build_started", "build_finished")
LAG: Final = 2_000
FLAKY: Final = 101
PARKED_EVERY: Final = 5_000
#: "archive" (every topic) has delivered the last ARCHIVED seqs (it started late).
ARCHIVED: Final = 100_000
BIG_TABLES: Final = frozenset({"herald_events", "herald_log", "herald_deliveries"})
#: A build near the head: its events have records of both consumers.
PROBE: Final = BUILDS - 700

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Filled:
    """The filled database."""

    url: str
    #: the newest seq (= the number of events)
    head: int
    #: the newest event's recorded_at
    newest: datetime


def _fill(conn: sa.Connection) -> None:
    """The log, its order rows, the consumers, their records and parked events.

    Loaded as pg_restore loads: the rows first, then the secondary indexes and the
    foreign keys, rebuilt from their own definitions (one sort each instead of a
    million insertions into each index, one join instead of a million checks).
    """
    conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
    conn.execute(sa.text("SET LOCAL maintenance_work_mem = '256MB'"))
    tables = ["herald_events", "herald_log", "herald_deliveries"]
    indexes = conn.execute(
        sa.text(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = ANY (:tables) "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        ),
        {"tables": tables},
    ).all()
    foreign_keys = conn.execute(
        sa.text(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE contype = 'f' AND conrelid::regclass::text = ANY (:tables)"
        ),
        {"tables": tables},
    ).all()
    assert len(indexes) >= 7, indexes  # the test would be measuring a schema without them
    for table, name, _ in foreign_keys:
        conn.execute(sa.text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    for name, _ in indexes:
        conn.execute(sa.text(f'DROP INDEX "{name}"'))
    _rows(conn)
    for _, definition in indexes:
        conn.execute(sa.text(definition))
    for table, name, definition in foreign_keys:
        conn.execute(sa.text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))


def _rows(conn: sa.Connection) -> None:
    ids = [str(Build.id_for(b)) for b in range(1, BUILDS + 1)]
    # Positions in log order: wave by wave, version by version, build by build. tx is
    # NULL: no sequencer cycle will ever order these rows again.
    conn.execute(
        sa.text(
            """
            INSERT INTO herald_events (position, tx, topic, payload, delivery, aggregate_id,
                                       aggregate_version, occurred_at, recorded_at)
            SELECT s.p, NULL, (CAST(:topics AS text[]))[s.v],
                   jsonb_build_object('build_id', s.b, 'generation', 1),
                   CASE WHEN s.v = :last THEN 'at_least_once' ELSE 'ephemeral' END,
                   s.id, s.v, s.t, s.t
            FROM (
                SELECT b, id, v, p,
                       CAST(:origin AS timestamptz) + p * CAST(:step AS interval) AS t
                FROM (
                    SELECT b, id, v, row_number() OVER (ORDER BY (b - 1) / :wave, v, b) AS p
                    FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS a(id, b),
                         generate_series(1, :last) AS v
                ) AS numbered
            ) AS s
            ORDER BY s.p
            """
        ),
        {
            "topics": list(TOPICS),
            "last": len(TOPICS),
            "ids": ids,
            "origin": datetime.fromisoformat("2026-01-01T00:00:00+00:00"),
            "step": STEP,
            "wave": WAVE,
        },
    )
    conn.execute(
        sa.text("SELECT setval(pg_get_serial_sequence('herald_events', 'position'), :n)"),
        {"n": EVENTS},
    )
    conn.execute(
        sa.text(
            "INSERT INTO herald_log (seq, position) SELECT position, position "
            "FROM herald_events ORDER BY position"
        )
    )
    conn.execute(sa.text("UPDATE herald_sequencer SET last_seq = :n"), {"n": EVENTS})
    conn.execute(
        sa.text(
            "INSERT INTO herald_consumers (name, offset_seq) "
            "VALUES ('status', :status), ('archive', :head)"
        ),
        {"status": EVENTS - LAG, "head": EVENTS},
    )
    # status: one delivered record a seq; every FLAKY-th seq first failed once; the
    # build_finished of every PARKED_EVERY-th build failed twice and was parked.
    conn.execute(
        sa.text(
            """
            INSERT INTO herald_deliveries (consumer, seq, attempt, outcome, kind, started_at,
                                           duration_ms, error)
            SELECT 'status', l.seq, a.n,
                   CASE WHEN parked AND a.n = 2 THEN 'parked'
                        WHEN a.n < tries THEN 'failed' ELSE 'delivered' END,
                   'live', e.recorded_at + a.n * interval '50 ms', (l.seq % 997) * 0.5,
                   CASE WHEN a.n < tries OR parked THEN 'HTTP 502 from the status page' END
            FROM herald_log l
            JOIN herald_events e ON e.position = l.position
            CROSS JOIN LATERAL (
                SELECT e.topic = 'build_finished'
                       AND CAST(e.payload ->> 'build_id' AS int) % :parked_every = 0 AS parked
            ) AS p
            CROSS JOIN LATERAL (
                SELECT CASE WHEN p.parked OR l.seq % :flaky = 0 THEN 2 ELSE 1 END AS tries
            ) AS r
            CROSS JOIN LATERAL generate_series(1, r.tries) AS a(n)
            WHERE e.topic = ANY (CAST(:topics AS text[])) AND l.seq <= :offset
            ORDER BY l.seq, a.n
            """
        ),
        {
            "topics": list(STATUS_TOPICS),
            "offset": EVENTS - LAG,
            "flaky": FLAKY,
            "parked_every": PARKED_EVERY,
        },
    )
    conn.execute(
        sa.text(
            """
            INSERT INTO herald_parked (consumer, seq, key, attempts, error, parked_at)
            SELECT 'status', seq, 'build:' || (e.payload ->> 'build_id'), 2, d.error,
                   d.started_at
            FROM herald_deliveries d
            JOIN herald_log l USING (seq)
            JOIN herald_events e ON e.position = l.position
            WHERE d.consumer = 'status' AND d.outcome = 'parked'
            """
        )
    )
    conn.execute(
        sa.text(
            """
            INSERT INTO herald_deliveries (consumer, seq, attempt, outcome, kind, started_at,
                                           duration_ms)
            SELECT 'archive', l.seq, 1, 'delivered', 'live',
                   e.recorded_at + interval '10 ms', (l.seq % 89) * 0.1
            FROM herald_log l JOIN herald_events e ON e.position = l.position
            WHERE l.seq > :first
            ORDER BY l.seq
            """
        ),
        {"first": EVENTS - ARCHIVED},
    )


@pytest.fixture(scope="module")
def filled(pg_template: str) -> Iterator[Filled]:
    for url in _scratch_database(pg_template):
        engine = create_engine(url)
        try:
            started = time.perf_counter()
            with engine.begin() as conn:
                _fill(conn)
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    sa.text(
                        "VACUUM ANALYZE herald_events, herald_log, herald_deliveries, "
                        "herald_parked, herald_consumers"
                    )
                )
            print(f"filled {EVENTS} events in {time.perf_counter() - started:.1f} s")
            with engine.connect() as conn:
                head, newest = conn.execute(
                    sa.text(
                        "SELECT max(seq), max(recorded_at) FROM herald_log "
                        "JOIN herald_events USING (position)"
                    )
                ).one()
        finally:
            engine.dispose()
        yield Filled(url, int(head), newest)


# -- measuring a query ----------------------------------------------------------------


@dataclass(slots=True)
class Plans:
    """The plans of the statements one call sent, as EXPLAIN ANALYZE ran them."""

    statements: list[str] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)

    def nodes(self) -> Iterator[dict[str, Any]]:
        for plan in self.plans:
            yield from _walk(plan)

    def seq_scans(self) -> list[str]:
        """The big tables read by a sequential scan."""
        return [
            str(node.get("Relation Name"))
            for node in self.nodes()
            if "Seq Scan" in node["Node Type"] and node.get("Relation Name") in BIG_TABLES
        ]

    def rows_touched(self) -> int:
        """Rows read by the scans: returned plus removed by a filter, times the loops."""
        total = 0.0
        for node in self.nodes():
            if "Scan" in node["Node Type"]:
                rows = (
                    node.get("Actual Rows", 0)
                    + node.get("Rows Removed by Filter", 0)
                    + node.get("Rows Removed by Index Recheck", 0)
                )
                total += rows * node.get("Actual Loops", 1)
        return round(total)

    def indexes(self) -> set[str]:
        return {str(node["Index Name"]) for node in self.nodes() if "Index Name" in node}

    def describe(self) -> str:
        return "\n\n".join(
            f"{sql}\n{json.dumps(plan, indent=1)[:4000]}"
            for sql, plan in zip(self.statements, self.plans, strict=True)
        )


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def explained(url: str, call: Callable[[sa.Connection], T]) -> tuple[T, Plans]:
    """Run ``call`` on a connection, then every SELECT it sent under EXPLAIN ANALYZE."""
    engine = create_engine(url)
    sent: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        sent.append((statement, parameters))

    try:
        with engine.connect() as conn:
            sa.event.listen(engine, "before_cursor_execute", capture)
            try:
                result = call(conn)
            finally:
                sa.event.remove(engine, "before_cursor_execute", capture)
            conn.rollback()
            plans = Plans()
            for statement, parameters in sent:
                if not statement.lstrip().upper().startswith("SELECT"):
                    continue
                explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
                (document,) = conn.exec_driver_sql(explain, parameters).one()
                conn.rollback()
                if isinstance(document, str):
                    document = json.loads(document)
                plans.statements.append(statement)
                plans.plans.append(document[0]["Plan"])
    finally:
        engine.dispose()
    assert plans.plans, "the call sent no SELECT: the test measures nothing"
    return result, plans


def rows_of(url: str, sql: str, **params: Any) -> list[sa.Row[Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


# -- the measure itself ------------------------------------------------------------------


def test_the_measure_sees_a_query_no_index_serves(filled: Filled) -> None:
    """A filter on a payload field has no index: a sequential scan of the whole log."""
    count, plans = explained(
        filled.url,
        lambda conn: conn.execute(
            sa.text("SELECT count(*) FROM herald_events WHERE payload ->> 'job' = 'nope'")
        ).scalar_one(),
    )
    assert count == 0
    assert plans.seq_scans() == ["herald_events"], plans.describe()
    # Rows per loop are averages over the parallel workers: rounding may lose a few.
    assert plans.rows_touched() >= 0.99 * EVENTS, plans.describe()


def test_the_log_is_as_big_as_promised(filled: Filled) -> None:
    (row,) = rows_of(
        filled.url,
        "SELECT (SELECT count(*) FROM herald_events) AS events, "
        "(SELECT count(*) FROM herald_log) AS log, "
        "(SELECT count(*) FROM herald_deliveries) AS records",
    )
    assert row.events == row.log == EVENTS >= 1_000_000
    assert filled.head == EVENTS
    assert row.records > 250_000


# -- the audit queries ------------------------------------------------------------------


def test_a_build_timeline_reads_its_own_rows_only(filled: Filled) -> None:
    timeline, plans = explained(filled.url, lambda conn: build_timeline(conn, PROBE))
    assert not plans.seq_scans(), plans.describe()
    assert plans.rows_touched() < 1_000, plans.describe()
    assert "uq_herald_events_aggregate_id_aggregate_version" in plans.indexes()
    assert "ix_herald_deliveries_seq" in plans.indexes()

    expected = rows_of(
        filled.url,
        "SELECT l.seq, e.topic FROM herald_events e JOIN herald_log l USING (position) "
        "WHERE e.aggregate_id = :id ORDER BY l.seq",
        id=str(Build.id_for(PROBE)),
    )
    assert [(e.seq, e.topic) for e in timeline.events] == [tuple(r) for r in expected]
    assert len(timeline.events) == len(TOPICS)
    records = rows_of(
        filled.url,
        "SELECT d.id, d.seq FROM herald_deliveries d JOIN herald_log l USING (seq) "
        "JOIN herald_events e USING (position) WHERE e.aggregate_id = :id "
        "ORDER BY d.seq, d.consumer, d.id",
        id=str(Build.id_for(PROBE)),
    )
    assert [(r.id, e.seq) for e in timeline.events for r in e.deliveries] == [
        tuple(r) for r in records
    ]
    assert {r.consumer for e in timeline.events for r in e.deliveries} == {"status", "archive"}


def test_pending_reads_the_lag_not_the_log(filled: Filled) -> None:
    result, plans = explained(
        filled.url, lambda conn: pending(conn, "status", TopicFilter(STATUS_TOPICS), 20)
    )
    assert not plans.seq_scans(), plans.describe()
    # The order rows and events after the offset (each read by the count and the
    # page), not the million before it.
    assert plans.rows_touched() < 10 * LAG, plans.describe()

    (row,) = rows_of(
        filled.url,
        "SELECT count(*) AS n, count(*) FILTER (WHERE topic = 'build_finished') AS finished "
        "FROM herald_log JOIN herald_events USING (position) "
        "WHERE seq > :offset AND topic = ANY (:topics)",
        offset=EVENTS - LAG,
        topics=list(STATUS_TOPICS),
    )
    assert (result.count, result.build_finished) == (row.n, row.finished)
    assert result.complete
    assert result.offset == EVENTS - LAG
    assert len(result.events) == 20
    assert all(e.seq > result.offset and e.topic in STATUS_TOPICS for e in result.events)
    parked = rows_of(filled.url, "SELECT seq FROM herald_parked ORDER BY seq")
    assert [p.seq for p in result.parked] == [r.seq for r in parked]
    assert parked, "the fill parked nothing: the test checks no parked event"


def test_a_consumer_report_since_an_hour_reads_that_hour(filled: Filled) -> None:
    since = filled.newest - timedelta(hours=1)
    report, plans = explained(filled.url, lambda conn: consumer_report(conn, "archive", since))
    assert not plans.seq_scans(), plans.describe()
    assert "ix_herald_deliveries_consumer_started_at" in plans.indexes()
    hour = int(timedelta(hours=1) / STEP)
    assert plans.rows_touched() < 20 * hour, plans.describe()
    (row,) = rows_of(
        filled.url,
        "SELECT count(*) AS n FROM herald_deliveries "
        "WHERE consumer = 'archive' AND started_at >= :since",
        since=since,
    )
    assert report.records == report.outcomes["delivered"] == row.n > 0


def test_a_consumer_report_of_a_flaky_consumer_counts_its_failures(filled: Filled) -> None:
    since = filled.newest - timedelta(days=1)
    report, plans = explained(filled.url, lambda conn: consumer_report(conn, "status", since))
    assert not plans.seq_scans(), plans.describe()
    (row,) = rows_of(
        filled.url,
        "SELECT count(*) FILTER (WHERE outcome = 'delivered') AS delivered, "
        "count(*) FILTER (WHERE outcome = 'failed') AS failed, "
        "count(*) FILTER (WHERE outcome = 'parked') AS parked "
        "FROM herald_deliveries WHERE consumer = 'status' AND started_at >= :since",
        since=since,
    )
    assert report.outcomes["delivered"] == row.delivered
    assert report.outcomes["failed"] == row.failed > 0
    assert report.attempts == row.delivered + row.failed + row.parked
    assert report.failure_rate == pytest.approx((row.failed + row.parked) / report.attempts)
    assert len(report.slowest) == 10
    assert report.slowest[0][0].duration_ms >= report.slowest[-1][0].duration_ms
    assert all(topic in STATUS_TOPICS for _, topic in report.slowest)
    assert report.errors
    assert all(r.error for r, _ in report.errors)


def test_topic_counts_since_an_hour_use_the_time_index(filled: Filled) -> None:
    since = filled.newest - timedelta(hours=1)
    counts, plans = explained(filled.url, lambda conn: topic_counts(conn, since))
    assert not plans.seq_scans(), plans.describe()
    assert "ix_herald_events_recorded_at" in plans.indexes(), plans.describe()
    hour = int(timedelta(hours=1) / STEP)
    assert plans.rows_touched() < 20 * hour, plans.describe()
    expected = rows_of(
        filled.url,
        "SELECT topic, count(*) AS n FROM herald_events WHERE recorded_at >= :since "
        "GROUP BY topic ORDER BY topic",
        since=since,
    )
    assert [(t.topic, t.events) for t in counts.topics] == [tuple(r) for r in expected]
    (archived,) = rows_of(
        filled.url,
        "SELECT count(*) AS n FROM herald_deliveries d JOIN herald_log l USING (seq) "
        "JOIN herald_events e USING (position) WHERE e.recorded_at >= :since "
        "AND d.consumer = 'archive'",
        since=since,
    )
    assert sum(t.deliveries["delivered"] for t in counts.topics) >= archived.n > 0
