"""Wake-ups and query plans: what keeps the sequencer and readers fast on PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.outbox import (
    LogEntry,
    LogReader,
    NewEvent,
    TopicFilter,
    Waker,
    append,
    append_many,
    read_page,
    run_sequencer,
)
from herald.schema.queries import QUERIES

pytestmark = pytest.mark.postgresql


def test_waker_returns_on_notify_and_on_timeout(pg_engine: sa.Engine) -> None:
    waker = Waker(pg_engine)
    try:
        started = time.monotonic()
        assert waker.wait(0.2) is False
        assert 0.15 < time.monotonic() - started < 2

        def notify() -> None:
            time.sleep(0.2)
            with pg_engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_notify('herald_log', 'not trusted')"))

        notifier = threading.Thread(target=notify)
        notifier.start()
        started = time.monotonic()
        assert waker.wait(10) is True
        assert time.monotonic() - started < 2, "woken by the timeout, not by the NOTIFY"
        notifier.join(5)
    finally:
        waker.close()


def test_follow_is_woken_by_the_sequencer(pg_engine: sa.Engine) -> None:
    """With a 30 s poll, only the sequencer's NOTIFY can deliver within a second."""
    stop = threading.Event()
    active = threading.Event()
    daemon = threading.Thread(
        target=run_sequencer, args=(pg_engine, stop), kwargs={"on_active": active}
    )
    daemon.start()
    received: list[tuple[float, LogEntry]] = []

    def follow() -> None:
        received.extend(
            (time.monotonic(), entry)
            for entry in LogReader(pg_engine).follow(0, poll_interval=30, stop=stop)
        )

    follower = threading.Thread(target=follow)
    try:
        assert active.wait(5)
        follower.start()
        time.sleep(0.5)  # the follower is now waiting on its NOTIFY
        committed: list[float] = []
        for i in range(5):
            with pg_engine.begin() as conn:
                append(conn, "build_started", {"build_id": i})
            committed.append(time.monotonic())
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while len(received) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        daemon.join(5)
        # The follower leaves its wait within its 30 s poll; a notification ends it sooner.
        with pg_engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_notify('herald_log', '')"))
        if follower.ident is not None:
            follower.join(35)
    assert [e.payload["build_id"] for _, e in received] == [0, 1, 2, 3, 4]
    delays = [got - sent for (got, _), sent in zip(received, committed, strict=True)]
    assert max(delays) < 1.0, f"delays {delays}: the follower was not woken by NOTIFY"


def test_a_cycle_reads_the_log_through_the_tx_index(pg_engine: sa.Engine) -> None:
    """A cycle's cost follows the new events, not the size of the log: both of its
    looks at herald_events (is anything new? order it) are index scans on tx."""
    with pg_engine.begin() as conn:
        append_many(conn, [NewEvent("build_queued", {"build_id": i}) for i in range(20_000)])
    LogReader(pg_engine).read(0, 1)
    with pg_engine.begin() as conn:
        conn.execute(sa.text("ANALYZE herald_events"))
    # A realistic stored snapshot: a writer's transaction was in progress when it was
    # taken (so the cycle also looks up the in-progress list), and commits afterwards.
    with pg_engine.connect() as writer:
        writer.begin()
        append(writer, "build_queued", {"build_id": -1})
        with pg_engine.begin() as conn:
            append(conn, "build_queued", {"build_id": -2})
        LogReader(pg_engine).read(0, 1)
        writer.commit()
    with pg_engine.begin() as conn:
        append_many(conn, [NewEvent("build_queued", {"build_id": -3 - i}) for i in range(5)])
    with pg_engine.connect() as conn, conn.begin():
        ordered, newest = conn.execute(sa.text(QUERIES["sequence"])).one()
        seq_scans = conn.execute(
            sa.text("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'herald_events'")
        ).scalar_one()
        tx_scans = conn.execute(
            sa.text("SELECT pg_stat_get_xact_numscans(CAST('ix_herald_events_tx' AS regclass))")
        ).scalar_one()
    assert (ordered, newest) == (6, 20_007), "the cycle did not order the six new events"
    assert seq_scans == 0, "the cycle read all of herald_events"
    # The ordering has a branch for "after prev" and one for "in progress at prev",
    # each an index scan on tx; the look (LIMIT 1) stops at its first branch's hit.
    assert tx_scans >= 3


def test_a_rare_topic_page_reads_its_window_not_the_log(pg_engine: sa.Engine) -> None:
    """A filtered page reads the topic index over its window's span of positions only:
    the entries of the window, however many events of the topic the log holds
    elsewhere (here twenty times as many), and the window's order rows."""
    rare = "build_cancelled"
    with pg_engine.begin() as conn:
        append_many(
            conn,
            [
                NewEvent(rare if i % 100 == 0 else "build_queued", {"build_id": i})
                for i in range(20_000)
            ],
        )
    LogReader(pg_engine).read(0, 1)
    with pg_engine.begin() as conn:
        conn.execute(sa.text("ANALYZE herald_events, herald_log"))
    with pg_engine.connect() as conn, conn.begin():
        before = _reads(conn)
        # Two steps: the first 100 seqs (one entry), then the rest of the window.
        page = read_page(conn, after=18_000, limit=100, topics=TopicFilter([rare]), scan_limit=1000)
        after = _reads(conn)
    read = {what: after[what] - before[what] for what in before}
    assert [e.seq for e in page.entries] == list(range(18_001, 19_000, 100))
    assert (page.next_after, page.at_head) == (19_000, False)
    assert read["topic index entries"] <= 12, read
    assert read["herald_events scans"] == read["herald_log scans"] == 0, read
    # The page's ten payloads, and the heap's word on the visibility of the index
    # entries it found (no VACUUM has marked the pages all-visible).
    assert read["herald_events rows"] <= 40, f"{read}: events read beyond the page's own"
    # The window's order rows, once for its span and once for the page (and the head).
    assert read["herald_log rows"] <= 2 * 1000 + 20, read


def _reads(conn: sa.Connection) -> dict[str, int]:
    """What this backend has read so far (not yet flushed to the cumulative statistics,
    so only differences within one transaction are meaningful)."""
    found = {
        "topic index entries": conn.execute(
            sa.text("SELECT pg_stat_get_xact_tuples_returned(CAST(:index AS regclass))"),
            {"index": "ix_herald_events_topic"},
        ).scalar_one()
    }
    for name, scans, rows in conn.execute(
        sa.text(
            "SELECT relname, seq_scan, coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
            "WHERE relname IN ('herald_events', 'herald_log')"
        )
    ):
        found[f"{name} scans"], found[f"{name} rows"] = scans, rows
    return {what: int(count) for what, count in found.items()}


def test_herald_connections_run_without_parallel_workers(pg_url: str) -> None:
    """Every herald connection has SERVER_OPTIONS; options in the URL come after them."""

    def settings(url: str) -> tuple[str, str]:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text(
                        "SELECT current_setting('max_parallel_workers_per_gather'), "
                        "current_setting('work_mem')"
                    )
                ).one()
        finally:
            engine.dispose()
        return str(row[0]), str(row[1])

    assert settings(pg_url)[0] == "0"
    assert settings(f"{pg_url}?options=-c%20work_mem%3D5MB") == ("0", "5MB")
    assert settings(f"{pg_url}?options=-c%20max_parallel_workers_per_gather%3D3")[0] == "3"
