"""Reading the log: offsets, pages, topic filters."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from herald.errors import InvalidTopic, UsageError
from herald.outbox import LogReader, NewEvent, Sequencer, TopicFilter, append_many, read_page
from herald.outbox.reader import MAX_SEQ
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
