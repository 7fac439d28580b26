"""Appending, on SQLite and PostgreSQL: atomic with the caller's transaction."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from herald.config import create_engine
from herald.errors import InvalidPayload, InvalidTopic, PayloadTooLarge, VersionConflict
from herald.outbox import NewEvent, append, append_many
from herald.outbox.append import _SQLITE_COLUMNS
from herald.schema import events
from tests.integration.helpers import count_events, read_all

FINISHED = {"build_id": 42, "dependent_ids": [1, 2]}


def test_append_returns_the_position_and_the_reader_sees_it(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        first = append(conn, "build_finished", FINISHED, trace_id="t1")
        second = append(conn, "acme.deploy", {"env": "prod"})
    assert second > first
    entries = read_all(engine)
    assert [(e.seq, e.position, e.topic) for e in entries] == [
        (1, first, "build_finished"),
        (2, second, "acme.deploy"),
    ]
    assert entries[0].payload == FINISHED
    assert entries[0].delivery == "at_least_once"
    assert entries[0].trace_id == "t1"
    assert entries[0].recorded_at.tzinfo is not None
    assert abs(entries[0].recorded_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_rollback_leaves_no_trace(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE builds (id INTEGER PRIMARY KEY, status INTEGER)"))
        conn.execute(sa.text("INSERT INTO builds VALUES (42, NULL)"))
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE builds SET status = 0 WHERE id = 42"))
        append(conn, "build_finished", FINISHED)
        raise RuntimeError("the caller fails after appending")
    assert count_events(engine) == 0
    assert read_all(engine) == []
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM builds")).scalar_one() is None


def test_append_through_an_orm_session(engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        position = append(session, "build_started", {"build_id": 7})
    assert [e.position for e in read_all(engine)] == [position]


def test_duplicate_dedupe_key_is_a_no_op(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        first = append(conn, "acme.deploy", {"n": 1}, dedupe_key="deploy-1")
    with engine.begin() as conn:
        again = append(conn, "acme.deploy", {"n": 2}, dedupe_key="deploy-1")
        other = append(conn, "acme.deploy", {"n": 3}, dedupe_key="deploy-2")
    assert again == first
    assert other != first
    assert [e.payload["n"] for e in read_all(engine)] == [1, 3]


def test_dedupe_within_one_batch_keeps_the_first(engine: sa.Engine) -> None:
    batch = [
        NewEvent("build_started", {"build_id": 1}),
        NewEvent("acme.x", {"n": 1}, dedupe_key="k"),
        NewEvent("acme.x", {"n": 2}, dedupe_key="k"),
        NewEvent("build_started", {"build_id": 2}),
    ]
    with engine.begin() as conn:
        positions = append_many(conn, batch)
    assert positions[1] == positions[2]
    assert [(e.topic, e.payload) for e in read_all(engine)] == [
        ("build_started", {"build_id": 1}),
        ("acme.x", {"n": 1}),
        ("build_started", {"build_id": 2}),
    ]


def test_once_per_eval_topics_get_their_key(engine: sa.Engine) -> None:
    payload = {"eval_id": 9, "build_id": 5}
    with engine.begin() as conn:
        first = append(conn, "cached_build_finished", payload)
        assert append(conn, "cached_build_finished", payload) == first
        other_eval = append(conn, "cached_build_finished", {"eval_id": 10, "build_id": 5})
    assert other_eval != first
    entries = read_all(engine)
    assert [e.dedupe_key for e in entries] == [
        "cached_build_finished:9:5",
        "cached_build_finished:10:5",
    ]


def test_same_aggregate_version_twice_is_a_version_conflict(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1}, aggregate_id="build-1", aggregate_version=1)
    with pytest.raises(VersionConflict) as info, engine.begin() as conn:
        append(conn, "step_started", {"build_id": 1, "step_nr": 1})
        append(conn, "build_started", {"build_id": 1}, aggregate_id="build-1", aggregate_version=1)
    assert info.value.aggregate_id == "build-1"
    assert info.value.version == 1
    assert count_events(engine) == 1, "the conflicting transaction wrote nothing"


@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        ("buld_finished", {}, InvalidTopic),
        ("Build", {}, InvalidTopic),
        ("build_finished", [1], InvalidPayload),
        ("build_finished", {"build_id": 1}, InvalidPayload),
        ("acme.big", {"s": "x" * (1024 * 1024)}, PayloadTooLarge),
    ],
)
def test_bad_input_in_a_batch_writes_nothing(
    engine: sa.Engine, topic: str, payload: Any, error: type[Exception]
) -> None:
    good = NewEvent("build_started", {"build_id": 1})
    with pytest.raises(error), engine.begin() as conn:
        append_many(conn, [good, NewEvent(topic, payload), good])
    assert count_events(engine) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dedupe_key": ""},
        {"dedupe_key": "k" * 201},
        {"trace_id": 7},
        {"trace_id": "\ud800"},
        {"aggregate_id": "build-1"},
        {"occurred_at": datetime(2026, 1, 1)},
    ],
)
def test_bad_metadata_writes_nothing(engine: sa.Engine, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidPayload), engine.begin() as conn:
        append(conn, "acme.x", {}, **kwargs)
    assert count_events(engine) == 0


def test_bulk_append_is_not_a_round_trip_per_event(engine: sa.Engine) -> None:
    """50,000 events in one transaction, in order, in a few dozen statements."""
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    n = 50_000
    batch = [NewEvent("build_queued", {"build_id": i}) for i in range(1, n + 1)]
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.begin() as conn:
            positions = append_many(conn, batch)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert len(positions) == n
    assert positions == sorted(positions)
    assert statements <= n // 500, f"{statements} statements for {n} events"
    entries = read_all(engine)
    assert [e.payload["build_id"] for e in entries] == list(range(1, n + 1))
    assert [e.seq for e in entries] == list(range(1, n + 1))


def test_big_payload_round_trips(engine: sa.Engine) -> None:
    dependents = list(range(100_000, 110_000))
    with engine.begin() as conn:
        append(conn, "build_finished", {"build_id": 1, "dependent_ids": dependents})
    (entry,) = read_all(engine)
    assert entry.payload["dependent_ids"] == dependents


def test_occurred_at_is_kept(engine: sa.Engine) -> None:
    when = datetime(2026, 11, 1, 12, 30, tzinfo=UTC)
    with engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1}, occurred_at=when)
    (entry,) = read_all(engine)
    assert entry.occurred_at == when


def test_occurred_at_with_an_offset_is_the_same_instant(engine: sa.Engine) -> None:
    when = datetime(2026, 11, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    with engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1}, occurred_at=when)
        append_many(conn, [NewEvent("build_started", {"build_id": 2}, occurred_at=when)] * 20)
    entries = read_all(engine)
    assert len(entries) == 21
    # The same instant (10:30 UTC) on both backends and on every write path.
    assert {entry.occurred_at for entry in entries} == {when}
    assert all(entry.occurred_at.utcoffset() == timedelta(0) for entry in entries)


@pytest.fixture
def psycopg_conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    conninfo = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo) as conn:
        yield conn


@pytest.mark.postgresql
def test_append_through_a_plain_psycopg_connection(
    pg_engine: sa.Engine, psycopg_conn: psycopg.Connection[Any]
) -> None:
    """Writers that use psycopg directly get the same appends, in their transaction."""
    first = append(psycopg_conn, "build_finished", FINISHED, trace_id="t")
    batch = [
        NewEvent("build_queued", {"build_id": 1}),
        NewEvent("acme.x", {"n": 1}, dedupe_key="k"),
        NewEvent("acme.x", {"n": 2}, dedupe_key="k"),
        NewEvent("cached_build_finished", {"eval_id": 1, "build_id": 1}),
        *[NewEvent("build_queued", {"build_id": i}) for i in range(2, 2002)],
    ]
    positions = append_many(psycopg_conn, batch)
    assert read_all(pg_engine) == [], "nothing is visible before the writer commits"
    psycopg_conn.commit()
    assert positions[1] == positions[2]
    again = append_many(psycopg_conn, [NewEvent("acme.x", {"n": 3}, dedupe_key="k")])
    assert again == [positions[1]]
    append(psycopg_conn, "build_started", {"build_id": 9})
    psycopg_conn.rollback()
    entries = read_all(pg_engine)
    assert [e.position for e in entries] == [first, *positions[:2], *positions[3:]]
    assert entries[0].payload == FINISHED
    assert entries[0].trace_id == "t"
    assert entries[3].dedupe_key == "cached_build_finished:1:1"
    assert [e.payload["build_id"] for e in entries[4:]] == list(range(2, 2002))


@pytest.mark.postgresql
def test_psycopg_errors_are_herald_errors(
    pg_engine: sa.Engine, psycopg_conn: psycopg.Connection[Any]
) -> None:
    append(psycopg_conn, "build_started", {"build_id": 1}, aggregate_id="b-1", aggregate_version=1)
    psycopg_conn.commit()
    with pytest.raises(VersionConflict) as info:
        append(
            psycopg_conn, "build_started", {"build_id": 1}, aggregate_id="b-1", aggregate_version=1
        )
    assert (info.value.aggregate_id, info.value.version) == ("b-1", 1)
    psycopg_conn.rollback()
    with pytest.raises(InvalidTopic):
        append(psycopg_conn, "buld_started", {"build_id": 1})
    assert count_events(pg_engine) == 1


def test_dedupe_keys_old_and_new_in_one_batch(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        (old,) = append_many(conn, [NewEvent("acme.x", {"n": 1}, dedupe_key="a")])
    batch = [
        NewEvent("acme.x", {"n": 2}, dedupe_key="b"),
        NewEvent("acme.x", {"n": 3}, dedupe_key="a"),
        NewEvent("acme.x", {"n": 4}, dedupe_key="c"),
    ]
    with engine.begin() as conn:
        positions = append_many(conn, batch)
    assert positions[1] == old
    assert len({old, positions[0], positions[2]}) == 3
    entries = read_all(engine)
    assert [(e.seq, e.position, e.payload["n"]) for e in entries] == [
        (1, old, 1),
        (2, positions[0], 2),
        (3, positions[2], 4),
    ]


# -- SQLite: the append's own SQL writes what SQLAlchemy's Core insert wrote ---------

#: columns compared as SQLite stores them (quote() shows the storage class too)
_STORED = ", ".join(
    f"quote({name})"
    for name in (
        "topic",
        "payload",
        "delivery",
        "dedupe_key",
        "aggregate_id",
        "aggregate_version",
        "trace_id",
        "occurred_at",
        "recorded_at",
    )
)


@pytest.mark.sqlite
@pytest.mark.parametrize(
    "serializer",
    [None, lambda value: json.dumps(value, sort_keys=True, ensure_ascii=False)],
    ids=["default-json", "engine-json-serializer"],
)
def test_sqlite_rows_are_what_a_core_insert_writes(
    sqlite_url: str, serializer: Callable[[Any], str] | None
) -> None:
    """The payload goes through the engine's JSON serializer and the timestamps are
    stored in SQLAlchemy's text form, exactly as ``insert(events)`` stores them."""
    engine = create_engine(sqlite_url, **({"json_serializer": serializer} if serializer else {}))
    when = datetime(2026, 11, 1, 12, 30, 5, 123456, tzinfo=UTC)
    batch = [
        NewEvent("acme.x", {"z": "é\u2603", "a": [1, 2.5, None, True]}, trace_id="t-1"),
        NewEvent("build_started", {"build_id": 3}, aggregate_id="b-3", aggregate_version=7),
        NewEvent("cached_build_queued", {"eval_id": 2, "build_id": 3}, occurred_at=when),
        NewEvent("acme.y", {}, dedupe_key="k-1", occurred_at=when),
    ]
    core = events.to_metadata(sa.MetaData(), name="core_events")
    core.indexes.clear()  # their names are herald_events' own
    try:
        with engine.begin() as conn:
            positions = append_many(conn, batch)
        core.create(engine)
        with engine.begin() as conn:
            written = conn.execute(
                sa.select(events).where(events.c.position.in_(positions)).order_by("position")
            ).mappings()
            rows = [
                {k: v for k, v in row.items() if k not in ("position", "tx")} for row in written
            ]
            assert [row["occurred_at"] for row in rows[2:]] == [when.replace(tzinfo=None)] * 2
            conn.execute(sa.insert(core), rows)
            ours = conn.exec_driver_sql(f"SELECT {_STORED} FROM herald_events ORDER BY position")
            theirs = conn.exec_driver_sql(f"SELECT {_STORED} FROM core_events ORDER BY position")
            assert ours.all() == theirs.all()
    finally:
        engine.dispose()


@pytest.mark.sqlite
def test_sqlite_binds_only_json_and_timestamps() -> None:
    """The SQLite append converts only the payload and the timestamps itself: every
    other column it writes has no conversion on SQLite to apply."""
    dialect = sa.create_engine("sqlite://").dialect
    converted = {
        name
        for name in _SQLITE_COLUMNS
        if events.c[name].type.dialect_impl(dialect).bind_processor(dialect) is not None
    }
    assert converted == {"payload", "occurred_at", "recorded_at"}
