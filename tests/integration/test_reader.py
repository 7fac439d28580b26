"""Reading the log: offsets, pages, topic filters."""

from __future__ import annotations

import logging

import psycopg
import pytest
import sqlalchemy as sa

from herald.consumers import store
from herald.errors import InvalidTopic, TransientDatabaseError, UsageError
from herald.outbox import (
    LogReader,
    NewEvent,
    Sequencer,
    TopicFilter,
    append,
    append_many,
    read_page,
)
from herald.outbox.reader import MAX_SEQ
from herald.schema import events, log_order
from herald.schema.dberrors import translated
from tests.integration.helpers import read_all

TOPICS = ["build_started", "build_finished", "step_started", "acme.deploy", "acme.cache.pushed"]


def _payload(topic: str, i: int) -> dict[str, object]:
    if topic == "build_finished":
        return {"build_id": i, "dependent_ids": []}
    if topic == "step_started":
        return {"build_id": i, "step_nr": 1}
    return {"build_id": i}


@pytest.fixture
def filled(engine: sa.Engine) -> sa.Engine:
    """30 events, topics cycling through TOPICS; event i has seq i."""
    with engine.begin() as conn:
        append_many(
            conn, [NewEvent(TOPICS[i % 5], _payload(TOPICS[i % 5], i + 1)) for i in range(30)]
        )
    return engine


def test_after_is_exclusive_and_pages_are_bounded(filled: sa.Engine) -> None:
    reader = LogReader(filled)
    page = reader.read(after=10, limit=5)
    assert [e.seq for e in page.entries] == [11, 12, 13, 14, 15]
    assert page.next_after == 15
    assert not page.at_head
    last = reader.read(after=28, limit=5)
    assert [e.seq for e in last.entries] == [29, 30]
    assert last.at_head
    assert last.next_after == 30
    assert reader.read(after=30).entries == []


def test_exact_and_pattern_filters(filled: sa.Engine) -> None:
    exact = read_all(filled, topics=TopicFilter(["build_finished"]))
    assert [e.seq for e in exact] == [2, 7, 12, 17, 22, 27]
    pattern = read_all(filled, topics=TopicFilter(["build_*"]))
    assert {e.topic for e in pattern} == {"build_started", "build_finished"}
    assert len(pattern) == 12
    dotted = read_all(filled, topics=TopicFilter(["acme.*", "step_started"]))
    assert {e.topic for e in dotted} == {"acme.deploy", "acme.cache.pushed", "step_started"}


def test_underscore_in_a_pattern_is_literal(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        append_many(
            conn,
            [NewEvent("acme.build_x", {}), NewEvent("acme.buildzx", {}), NewEvent("acme.b", {})],
        )
    got = read_all(engine, topics=TopicFilter(["acme.build_*"]))
    assert [e.topic for e in got] == ["acme.build_x"]


def test_filtered_pages_scan_a_bounded_window(filled: sa.Engine) -> None:
    """A rare topic costs bounded pages: each scans at most scan_limit seqs."""
    with filled.connect() as conn:
        Sequencer().cycle(conn)  # read_page reads only what is ordered (PostgreSQL)
        topics = TopicFilter(["build_finished"])
        page = read_page(conn, after=0, limit=100, topics=topics, scan_limit=4)
        assert [e.seq for e in page.entries] == [2]
        assert page.next_after == 4
        assert not page.at_head
        page = read_page(conn, after=4, limit=100, topics=topics, scan_limit=2)
        assert page.entries == []
        assert page.next_after == 6
        seqs, after = [], 0
        while True:
            page = read_page(conn, after=after, limit=100, topics=topics, scan_limit=3)
            seqs += [e.seq for e in page.entries]
            after = page.next_after
            if page.at_head:
                break
        assert seqs == [2, 7, 12, 17, 22, 27]


def test_read_page_sees_only_ordered_events(engine: sa.Engine) -> None:
    """On PostgreSQL an event is readable once a sequencer cycle ordered it;
    LogReader runs that cycle itself when no daemon does."""
    with engine.begin() as conn:
        append_many(conn, [NewEvent("build_started", {"build_id": 1})])
    with engine.connect() as conn:
        before = read_page(conn, after=0).entries
    assert len(before) == (1 if engine.dialect.name == "sqlite" else 0)
    assert [e.seq for e in LogReader(engine).read().entries] == [1]


def test_bad_reads_are_usage_errors(filled: sa.Engine) -> None:
    with filled.connect() as conn:
        with pytest.raises(UsageError, match="seqs start at 1"):
            read_page(conn, after=-1)
        with pytest.raises(UsageError, match="limit"):
            read_page(conn, after=0, limit=0)
        with pytest.raises(UsageError, match="seqs end at"):
            read_page(conn, after=MAX_SEQ + 1)
        assert read_page(conn, after=MAX_SEQ).entries == []
    with pytest.raises(InvalidTopic):
        TopicFilter(["buld_finished"])
    with pytest.raises(InvalidTopic):
        TopicFilter(["build-*"])


# -- pages that cover the log exactly, whatever the order of positions ---------------


def _matching(
    conn: sa.Connection, topics: TopicFilter, after: int, upto: int
) -> list[tuple[int, int, str]]:
    """(seq, position, topic) of the log's entries in (after, upto] that the filter lets
    through, straight from the tables (the oracle the pages are checked against)."""
    rows = conn.execute(
        sa.text(
            "SELECT l.seq, l.position, e.topic FROM herald_log l "
            "JOIN herald_events e ON e.position = l.position "
            "WHERE l.seq > :after AND l.seq <= :upto ORDER BY l.seq"
        ),
        {"after": after, "upto": upto},
    ).all()
    exact, patterns = set(topics.exact), [p.replace("*", "") for p in topics.patterns]
    return [
        (seq, position, topic)
        for seq, position, topic in rows
        if topics.every or topic in exact or any(topic.startswith(p) for p in patterns)
    ]


def _check_every_page(
    engine: sa.Engine, topics: TopicFilter, limits: list[int], scan_limits: list[int]
) -> int:
    """Every page from every offset: exactly the matching entries up to where it says
    it stopped, never past the window, and at the head exactly when it reached it.
    Returns how many pages were checked."""
    checked = 0
    with engine.connect() as conn:
        top = head_of(conn)
        for limit in limits:
            for scan_limit in scan_limits:
                for after in range(top + 1):
                    page = read_page(conn, after, limit, topics, scan_limit=scan_limit)
                    got = [(e.seq, e.position, e.topic) for e in page.entries]
                    assert got == _matching(conn, topics, after, page.next_after), (
                        f"after={after} limit={limit} scan_limit={scan_limit}"
                    )
                    assert len(got) <= limit
                    assert page.next_after <= max(after, top)
                    if topics:
                        assert page.next_after <= after + scan_limit
                    assert page.at_head == (page.next_after >= top)
                    if after < top:
                        assert page.next_after > after, "a page that does not move on"
                    conn.rollback()
                    checked += 1
    return checked


def head_of(conn: sa.Connection) -> int:
    return int(conn.execute(sa.text("SELECT coalesce(max(seq), 0) FROM herald_log")).scalar_one())


def test_a_rare_topic_far_from_the_head(engine: sa.Engine) -> None:
    """A topic seen at the start of the log and again only near its head: a page
    window in between holds none of it, and each holds exactly its own."""
    rare = "build_cancelled"
    with engine.begin() as conn:
        batch = [NewEvent(rare, {"build_id": 0})]
        batch += [NewEvent("build_queued", {"build_id": i}) for i in range(1, 300)]
        batch += [NewEvent(rare, {"build_id": 300}), NewEvent("build_queued", {"build_id": 301})]
        append_many(conn, batch)
    with engine.connect() as conn:
        Sequencer().cycle(conn)
        conn.commit()
        page = read_page(conn, after=100, limit=10, topics=TopicFilter([rare]), scan_limit=50)
        assert (page.entries, page.next_after, page.at_head) == ([], 150, False)
        page = read_page(conn, after=290, limit=10, topics=TopicFilter([rare]), scan_limit=50)
        assert [e.seq for e in page.entries] == [301]
        assert page.at_head
    got = read_all(engine, topics=TopicFilter([rare]))
    assert [(e.seq, e.payload["build_id"]) for e in got] == [(1, 0), (301, 300)]


@pytest.mark.postgresql
def test_pages_of_a_window_whose_positions_are_out_of_seq_order(pg_engine: sa.Engine) -> None:
    """A long transaction appends first and commits last: its event has the smallest
    position of the log but a seq after the others'. Every page, from every offset,
    with every kind of filter, holds exactly the entries of its range."""
    with pg_engine.connect() as late:
        late.begin()
        append(late, "build_cancelled", {"build_id": 0})
        append(late, "build_finished", {"build_id": 0, "dependent_ids": []})
        with pg_engine.begin() as conn:
            append_many(
                conn, [NewEvent(TOPICS[i % 5], _payload(TOPICS[i % 5], i)) for i in range(1, 25)]
            )
        LogReader(pg_engine).read(0, 1)  # orders the 24 that committed
        late.commit()
    with pg_engine.begin() as conn:
        append_many(
            conn,
            [NewEvent(TOPICS[i % 5], _payload(TOPICS[i % 5], i)) for i in range(25, 35)]
            + [NewEvent("build_cancelled", {"build_id": 35})],
        )
    LogReader(pg_engine).read(0, 1)
    with pg_engine.connect() as conn:
        order = conn.execute(sa.text("SELECT seq, position FROM herald_log ORDER BY seq")).all()
    positions = [position for _, position in order]
    assert positions[24:26] == [1, 2], "the long transaction's events were not ordered late"
    assert positions[:24] == list(range(3, 27))
    filters = [
        TopicFilter(["build_cancelled"]),
        TopicFilter(["build_finished", "build_cancelled"]),
        TopicFilter(["build_*"]),
        TopicFilter(["acme.*", "build_cancelled"]),
        TopicFilter(["*"]),
        TopicFilter(),
    ]
    for topics in filters:
        assert _check_every_page(pg_engine, topics, [1, 2, 3, 1000], [4, 25, 10_000]) > 0


def test_every_page_of_every_filter(filled: sa.Engine) -> None:
    """The same check on both backends, over the 30-event log of the other tests."""
    with filled.connect() as conn:
        Sequencer().cycle(conn)
        conn.commit()
    for topics in (
        TopicFilter(["build_finished"]),
        TopicFilter(["step_started", "acme.deploy"]),
        TopicFilter(["acme.*"]),
        TopicFilter(["*"]),
        TopicFilter(),
    ):
        _check_every_page(filled, topics, [1, 4, 1000], [3, 10_000])


def test_a_star_lets_every_topic_through() -> None:
    assert TopicFilter().every
    assert TopicFilter(["*"]).every
    assert TopicFilter(["build_finished", "*"]).every
    assert not TopicFilter(["build_*"]).every
    assert not TopicFilter(["build_finished"]).every


def test_pages_skip_the_seqs_a_prune_took(engine: sa.Engine) -> None:
    """Seqs are dense until a prune takes some (it keeps an aggregate's events while
    the aggregate has younger ones): a page still holds ``limit`` entries."""
    with engine.begin() as conn:
        append_many(conn, [NewEvent("build_queued", {"build_id": i}) for i in range(1, 41)])
    with engine.connect() as conn:
        Sequencer().cycle(conn)
        conn.commit()
    gone = [*range(1, 11), *range(13, 30)]  # seqs 11, 12 and 30..40 stay
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL herald.prune = 'on'"))
        # As a prune deletes: the order rows, then their events.
        positions = [
            p
            for (p,) in conn.execute(
                sa.select(log_order.c.position).where(log_order.c.seq.in_(gone))
            )
        ]
        conn.execute(log_order.delete().where(log_order.c.seq.in_(gone)))
        conn.execute(events.delete().where(events.c.position.in_(positions)))
    with engine.connect() as conn:
        page = read_page(conn, after=0, limit=5)
        assert [e.seq for e in page.entries] == [11, 12, 30, 31, 32]
        assert (page.next_after, page.at_head) == (32, False)
        page = read_page(conn, after=12, limit=3)
        assert [e.seq for e in page.entries] == [30, 31, 32]
        page = read_page(conn, after=36, limit=10)
        assert [e.seq for e in page.entries] == [37, 38, 39, 40]
        assert (page.next_after, page.at_head) == (40, True)
    assert [e.seq for e in read_all(engine)] == [11, 12, *range(30, 41)]


@pytest.mark.postgresql
@pytest.mark.parametrize("read", ["read_page", "look"])
def test_a_read_on_a_killed_connection_fails_cleanly_and_the_pool_drops_it(
    pg_engine: sa.Engine, read: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads that run on the driver itself (the daemon's pages and looks, on an
    autocommit connection) leave a connection the server killed invalidated: the
    pool drops it, instead of failing, with a traceback in the log, to roll it back."""
    with pg_engine.begin() as conn:
        append(conn, "acme.deploy", {"build_id": 1})
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pg_engine.connect() as killer, killer.begin():
            assert killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        with pytest.raises(TransientDatabaseError):
            if read == "read_page":
                read_page(conn, 0, 10)
            else:
                store.look(conn, "nobody")
        assert conn.invalidated
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    # The pool hands out a working connection afterwards.
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM herald_events").scalar_one() == 1


def test_a_connection_left_in_pipeline_mode_by_a_failure_is_dropped_not_reset(
    pg_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection the server kills while a pipeline (a look, a fence) waits for its
    results may fail to leave pipeline mode before psycopg marks it broken. The pool
    could not roll it back (no plain query in pipeline mode) and would log a
    traceback: it is invalidated instead, and dropped."""
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        with pytest.raises(TransientDatabaseError), translated(conn):
            pipeline = driver.pipeline()  # kept: dropped, it would leave pipeline mode
            pipeline.__enter__()
            driver.execute("SELECT 1")  # sent; its result still to be read
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")
        assert not driver.broken, "the case is a connection psycopg does not know is lost"
        assert conn.invalidated
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
