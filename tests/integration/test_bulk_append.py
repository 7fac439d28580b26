"""Bulk writes: on PostgreSQL long runs of events and projection rows go by binary COPY.

Three paths, chosen by patching the thresholds: *insert* (the INSERTs COPY
replaces), *copy* (every run of two rows or more by COPY, the events checked
first) and *stream* (the same, each event checked as its row is sent, inside
a savepoint). Every test compares the paths or checks a guarantee on each:
dedupe keys, version conflicts, errors translated, nothing written when
anything fails. They run on SQLite too, where there is no COPY and every
"path" must give the same log anyway.
"""

from __future__ import annotations

import importlib
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from herald.domain import Evaluation
from herald.errors import DatabaseError, InvalidPayload, VersionConflict
from herald.outbox import NewEvent, UnitOfWork, append, append_many
from herald.outbox.farm import NewBuild, add_evaluation
from herald.schema import build_dependencies, builds, evaluations, events, log_order
from tests.integration.helpers import count_events, read_all

append_module = importlib.import_module("herald.outbox.append")
projector_module = importlib.import_module("herald.outbox.projector")

WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

#: Each path's thresholds: (COPY_MIN_ROWS, STREAM_MIN_ROWS).
PATHS = {"insert": (10**9, 10**9), "copy": (2, 10**9), "stream": (2, 2)}


def _path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    copy_from, stream_from = PATHS[path]
    for module in (append_module, projector_module):
        monkeypatch.setattr(module, "COPY_MIN_ROWS", copy_from)
    monkeypatch.setattr(append_module, "STREAM_MIN_ROWS", stream_from)


def _snapshot(conn: sa.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the log and the projections, in order, as this transaction sees them.

    Positions and seqs differ between runs (sequences are not rolled back), so
    the log is given in position order without them; ``tx`` and
    ``recorded_at`` as whether they are this transaction's own.
    """
    postgresql = conn.dialect.name == "postgresql"
    tx = sa.func.pg_current_xact_id() if postgresql else sa.null()
    now = sa.func.now() if postgresql else events.c.recorded_at
    log = conn.execute(
        sa.select(
            events.c.topic,
            events.c.payload,
            events.c.delivery,
            events.c.dedupe_key,
            events.c.aggregate_id,
            events.c.aggregate_version,
            events.c.trace_id,
            events.c.occurred_at,
            sa.func.coalesce(events.c.tx == tx, True),
            events.c.recorded_at == now,
        ).order_by(events.c.position)
    )
    found: dict[str, list[tuple[Any, ...]]] = {"herald_events": [_timed(r) for r in log]}
    positions = conn.execute(sa.select(events.c.position).order_by(events.c.position))
    found["positions"] = [(p,) for p in positions.scalars()]
    for table in (builds, build_dependencies, evaluations):
        keys = list(table.primary_key.columns)
        found[table.name] = [tuple(r) for r in conn.execute(sa.select(table).order_by(*keys))]
    if not postgresql:
        ordered = conn.execute(sa.select(log_order.c.position).order_by(log_order.c.seq))
        found["herald_log"] = [(p,) for p in ordered.scalars()]
    return found


def _timed(row: Any) -> tuple[Any, ...]:
    """A log row with its ``occurred_at`` as "now" if it is recent: an event the writer
    gave no time takes the time of the append, which differs from run to run."""
    values = list(row)
    when = values[7] if values[7].tzinfo else values[7].replace(tzinfo=UTC)
    if abs(datetime.now(UTC) - when) < timedelta(minutes=5):
        values[7] = "now"
    return tuple(values)


def _without_positions(snapshot: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
    return {k: v for k, v in snapshot.items() if k not in ("positions", "herald_log")}


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every domain event happens at WHEN, so that two runs make the same rows."""
    monkeypatch.setattr("eventsourcing.domain.datetime_now_with_tzinfo", lambda: WHEN)


def _mixed_batch(tag: str) -> list[NewEvent]:
    """Runs with and without dedupe keys, of every length around the threshold."""
    batch = [
        NewEvent(
            "build_queued",
            {"build_id": i, "note": f"ü{i}"},
            aggregate_id=f"{tag}-b{i}",
            aggregate_version=1,
            occurred_at=WHEN + timedelta(seconds=i),
            trace_id=f"trace-{i % 3}",
        )
        for i in range(1, 31)
    ]
    batch += [
        NewEvent("acme.once", {"n": 1}, dedupe_key=f"{tag}-k1"),
        NewEvent("acme.once", {"n": 2}, dedupe_key=f"{tag}-k1"),  # earlier in the call
        NewEvent("cached_build_queued", {"eval_id": 9, "build_id": 1}),
        NewEvent("acme.once", {"n": 3}, dedupe_key=f"{tag}-k0"),  # already in the log
    ]
    batch += [NewEvent("acme.note", {"i": i}, delivery="ephemeral") for i in range(7)]
    batch += [NewEvent("acme.once", {"n": 4}, dedupe_key=f"{tag}-k2")]
    batch += [NewEvent("build_started", {"build_id": i}, occurred_at=WHEN) for i in range(2)]
    return batch


@pytest.mark.parametrize("writer", ["connection", "session"])
def test_the_copy_path_writes_what_the_insert_path_wrote(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    with engine.begin() as conn:
        existing = append(conn, "acme.once", {"n": 0}, dedupe_key="t-k0")
    snapshots, returned = {}, {}
    for path in PATHS:
        _path(monkeypatch, path)
        if writer == "session":
            with Session(engine) as session:
                returned[path] = append_many(session, _mixed_batch("t"))
                snapshots[path] = _snapshot(session.connection())
                session.rollback()
            continue
        with engine.connect() as conn:
            returned[path] = append_many(conn, _mixed_batch("t"))
            snapshots[path] = _snapshot(conn)
            conn.rollback()
    for path in ("copy", "stream"):
        assert _without_positions(snapshots[path]) == _without_positions(snapshots["insert"])
    for path in PATHS:
        new = [p for (p,) in snapshots[path]["positions"] if p != existing]
        # the duplicates (earlier in the call, and in the log) return the first's position
        expected = [*new[:31], new[30], new[31], existing, *new[32:]]
        assert returned[path] == expected
        if "herald_log" in snapshots[path]:
            assert snapshots[path]["herald_log"] == snapshots[path]["positions"]
    assert len(snapshots["copy"]["herald_events"]) == 1 + 30 + 2 + 7 + 1 + 2


_PG_LOG = (
    "SELECT topic, payload, delivery, dedupe_key, aggregate_id, aggregate_version, trace_id,"
    " occurred_at, tx = pg_current_xact_id(), recorded_at = now(), position"
    " FROM herald_events ORDER BY position"
)


@pytest.mark.postgresql
def test_plain_psycopg_writers_get_the_same_copy_path(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    conninfo = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with pg_engine.begin() as conn:
        existing = append(conn, "acme.once", {"n": 0}, dedupe_key="t-k0")
    logs, returned = {}, {}
    with psycopg.connect(conninfo) as raw:
        for path in PATHS:
            _path(monkeypatch, path)
            returned[path] = append_many(raw, _mixed_batch("t"))
            logs[path] = raw.execute(_PG_LOG).fetchall()
            raw.rollback()
    for path in ("copy", "stream"):
        assert [_timed(r[:-1]) for r in logs[path]] == [_timed(r[:-1]) for r in logs["insert"]]
    for path in PATHS:
        new = [r[-1] for r in logs[path] if r[-1] != existing]
        assert returned[path] == [*new[:31], new[30], new[31], existing, *new[32:]]


def test_an_evaluation_saves_the_same_rows_on_both_paths(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, fixed_clock: None
) -> None:
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("earlier", 1))
        uow.add(Evaluation("big", 1))
        uow.save()
        # builds 1000-1002, which the next evaluation finds again (cached)
        add_evaluation(uow, "earlier", 5, [NewBuild(b, "j", "/d", "s") for b in (1000, 1001, 1002)])
        uow.save()
    snapshots, returned = {}, {}
    for path in PATHS:
        _path(monkeypatch, path)
        with engine.connect() as conn:
            uow = UnitOfWork(conn)
            uow.builds([1000])[1000].start()
            uow.save()
            returned[path] = _evaluation_of(conn, 300, cached=(1000, 1001, 1002))
            snapshots[path] = _snapshot(conn)
            conn.rollback()
    for path in ("copy", "stream"):
        assert _without_positions(snapshots[path]) == _without_positions(snapshots["insert"])
    assert len(snapshots["copy"]["herald_builds"]) == 3 + 297
    assert len(snapshots["copy"]["herald_build_dependencies"]) == 2 * (297 - 10)
    for path in PATHS:
        positions = [p for (p,) in snapshots[path]["positions"]]
        assert returned[path] == positions[-len(returned[path]) :]


def _evaluation_of(conn: sa.Connection, count: int, cached: tuple[int, ...] = ()) -> list[int]:
    """The evaluation "big": ``count`` - 3 new builds from 1003 on, and ``cached``."""
    uow = UnitOfWork(conn)
    new = [
        NewBuild(
            1003 + i,
            f"job{i}",
            f"/nix/store/{i:032x}-job{i}.drv",
            "aarch64-linux" if i % 2 else "x86_64-linux",
            priority=i % 7,
            dependencies=() if i < 10 else (1003 + i % 10, 1003 + (i + 3) % 10),
        )
        for i in range(count - 3)
    ]
    add_evaluation(uow, "big", 6, new, cached)
    return uow.save()


@pytest.mark.parametrize("path", PATHS)
def test_dedupe_keys_on_the_bulk_path_return_the_existing_position(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    _path(monkeypatch, path)
    with engine.begin() as conn:
        first = append_many(conn, [NewEvent("acme.x", {"n": -1}, dedupe_key="k")])[0]
    batch = [NewEvent("acme.x", {"n": i}) for i in range(20)]
    batch += [NewEvent("acme.x", {"n": 100}, dedupe_key="k")]
    batch += [NewEvent("acme.x", {"n": i}) for i in range(20, 40)]
    with engine.begin() as conn:
        positions = append_many(conn, batch)
    assert positions[20] == first
    entries = read_all(engine)
    assert [e.payload["n"] for e in entries] == [-1, *range(40)]
    assert [e.position for e in entries][1:] == positions[:20] + positions[21:]


@pytest.mark.parametrize("path", PATHS)
def test_a_version_taken_in_the_log_is_a_version_conflict_on_the_bulk_path(
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    _path(monkeypatch, path)
    with engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1}, aggregate_id="agg-x", aggregate_version=5)
    batch = [
        NewEvent("build_started", {"build_id": i}, aggregate_id=f"agg-{i}", aggregate_version=1)
        for i in range(100)
    ]
    batch[60] = NewEvent(
        "build_started", {"build_id": 1}, aggregate_id="agg-x", aggregate_version=5
    )
    with pytest.raises(VersionConflict) as info, engine.begin() as conn:
        append_many(conn, batch)
    assert (info.value.aggregate_id, info.value.version) == ("agg-x", 5)
    assert count_events(engine) == 1, "the conflicting transaction wrote nothing"


@pytest.mark.parametrize("path", PATHS)
def test_the_same_version_twice_in_one_bulk_append_is_a_version_conflict(
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    _path(monkeypatch, path)
    batch = [
        NewEvent(
            "build_started", {"build_id": i}, aggregate_id=f"agg-{i % 50}", aggregate_version=1
        )
        for i in range(60)
    ]
    with pytest.raises(VersionConflict) as info, engine.begin() as conn:
        append_many(conn, batch)
    assert info.value.aggregate_id == "agg-0"
    assert info.value.version == 1
    assert count_events(engine) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("path", PATHS)
def test_a_concurrent_writer_of_the_same_version_makes_the_bulk_append_conflict(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The COPY waits for the other writer's row like the INSERT would, and fails when it
    commits."""
    _path(monkeypatch, path)
    batch = [
        NewEvent("build_started", {"build_id": i}, aggregate_id=f"agg-{i}", aggregate_version=1)
        for i in range(100)
    ]
    outcome: list[BaseException | None] = []
    with pg_engine.connect() as other:
        append(other, "build_started", {"build_id": 70}, aggregate_id="agg-70", aggregate_version=1)

        def bulk() -> None:
            try:
                with pg_engine.begin() as conn:
                    append_many(conn, batch)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=bulk)
        thread.start()
        _wait_until_blocked(pg_engine)
        other.commit()
        thread.join(timeout=60)
    assert len(outcome) == 1
    assert isinstance(outcome[0], VersionConflict)
    assert (outcome[0].aggregate_id, outcome[0].version) == ("agg-70", 1)
    assert count_events(pg_engine) == 1


def _wait_until_blocked(engine: sa.Engine) -> None:
    """Until some session waits for a lock (the bulk append, on the other's row)."""
    with engine.connect() as conn:
        for _ in range(6000):
            waiting = conn.execute(
                sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the bulk append never waited for the other writer")


@pytest.mark.parametrize("path", PATHS)
def test_bad_input_late_in_a_bulk_append_writes_nothing_and_keeps_the_transaction(
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    _path(monkeypatch, path)
    batch = [NewEvent("build_queued", {"build_id": i}) for i in range(300)]
    batch[250] = NewEvent("build_queued", {"build_id": "250"})
    with engine.begin() as conn:
        with pytest.raises(InvalidPayload):
            append_many(conn, batch)
        # Nothing of it was written (checked first, or rolled back to the savepoint
        # it was sent in): the transaction goes on.
        append(conn, "acme.after", {"n": 1})
    assert [e.topic for e in read_all(engine)] == ["acme.after"]


@pytest.mark.parametrize(
    "event",
    [
        NewEvent("acme.x", {}, aggregate_id="a", aggregate_version=True),
        NewEvent("acme.x", {}, aggregate_id="a", aggregate_version=2**31),
        NewEvent("acme.x", {}, aggregate_id="a", aggregate_version="1"),  # type: ignore[arg-type]
        NewEvent("acme.x", {}, occurred_at="2026-11-01"),  # type: ignore[arg-type]
    ],
)
def test_metadata_a_column_might_take_otherwise_is_refused(
    engine: sa.Engine, event: NewEvent
) -> None:
    batch = [NewEvent("acme.x", {"n": i}) for i in range(20)] + [event]
    with pytest.raises(InvalidPayload), engine.begin() as conn:
        append_many(conn, batch)
    assert count_events(engine) == 0


@pytest.mark.parametrize("path", PATHS)
def test_a_failure_while_the_rows_are_written_writes_nothing(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    _path(monkeypatch, path)

    def failing() -> None:
        raise RuntimeError("planning failed")

    batch = [NewEvent("build_queued", {"build_id": i}) for i in range(100)]
    with pytest.raises(RuntimeError, match="planning failed"), engine.begin() as conn:
        append_many(conn, batch, while_writing=failing)
    assert count_events(engine) == 0


@pytest.mark.parametrize("size", [0, 1, 3, 100])
def test_while_writing_is_called_once(engine: sa.Engine, size: int) -> None:
    calls: list[str] = []
    batch = [NewEvent("acme.x", {"n": i}) for i in range(size)]
    with engine.begin() as conn:
        positions = append_many(conn, batch, while_writing=lambda: calls.append("called"))
    assert calls == ["called"]
    assert len(positions) == size
    assert count_events(engine) == size


def test_a_projection_row_refused_midway_writes_nothing(engine: sa.Engine) -> None:
    """A build row already in the projection (left there by hand) fails the evaluation's
    bulk insert of builds; the log rows written before it in the transaction go too."""
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("big", 1))
        uow.save()
        conn.execute(
            sa.insert(builds).values(
                build_id=1150,
                aggregate_id="by-hand",
                jobset_id=1,
                job="x",
                drv_path="x",
                system="x",
                priority=0,
                dependencies=[],
                state="queued",
                generation=1,
                substituted=False,
                version=1,
                queued_at=WHEN,
                updated_at=WHEN,
            )
        )
    before = count_events(engine)
    with pytest.raises(DatabaseError), engine.begin() as conn:
        _evaluation_of(conn, 300)
    assert count_events(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(builds)).scalar_one() == 1


def test_a_big_evaluation_reads_back_intact(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("big", 1))
        uow.save()
    with engine.begin() as conn:
        saved = _evaluation_of(conn, 2000)
    entries = read_all(engine)
    assert [e.position for e in entries][1:] == saved
    queued = [e for e in entries if e.topic == "build_queued"]
    assert [e.payload["build_id"] for e in queued] == list(range(1003, 1003 + 1997))
    assert all(e.aggregate_version == 1 for e in queued)
    with engine.connect() as conn:
        states = conn.execute(sa.select(builds.c.state, sa.func.count()).group_by(builds.c.state))
        assert dict(states.all()) == {"queued": 1997}
        row = conn.execute(sa.select(builds).where(builds.c.build_id == 1003 + 15)).one()
        assert row.dependencies == [1003 + 5, 1003 + 8]
        added = conn.execute(sa.select(evaluations.c.state, evaluations.c.new_builds)).one()
        assert tuple(added) == ("added", 1997)


@pytest.mark.postgresql
@pytest.mark.parametrize("autocommit", [False, True])
def test_a_streamed_append_refused_late_leaves_the_writers_transaction_as_it_was(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, autocommit: bool
) -> None:
    """A plain psycopg writer, in a transaction or in autocommit (where there is no
    savepoint to roll back to, so the events are checked before anything is sent)."""
    _path(monkeypatch, "stream")
    conninfo = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    batch = [NewEvent("acme.x", {"n": i}) for i in range(50)]
    batch += [NewEvent("acme.y", {"n": i}, dedupe_key=f"k{i}") for i in range(5)]
    batch += [NewEvent("acme.x", {"n": i}) for i in range(50)]
    batch[90] = NewEvent("acme.x", {"n": float("nan")})
    with psycopg.connect(conninfo, autocommit=autocommit) as raw:
        append(raw, "acme.before", {"n": 0})
        with pytest.raises(InvalidPayload):
            append_many(raw, batch)
        append(raw, "acme.after", {"n": 1})
        if not autocommit:
            raw.commit()
    assert [e.topic for e in read_all(pg_engine)] == ["acme.before", "acme.after"]


@pytest.mark.postgresql
def test_a_conflict_in_a_streamed_append_leaves_the_transaction_failed(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal by the database is not undone to the savepoint: the caller must roll back,
    so that it cannot commit its other writes without the events."""
    _path(monkeypatch, "stream")
    with pg_engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1}, aggregate_id="agg-3", aggregate_version=1)
    batch = [
        NewEvent("build_started", {"build_id": i}, aggregate_id=f"agg-{i}", aggregate_version=1)
        for i in range(10)
    ]
    with pg_engine.connect() as conn:
        append(conn, "acme.mine", {"n": 1})
        with pytest.raises(VersionConflict):
            append_many(conn, batch)
        with pytest.raises(DatabaseError, match="aborted"):
            append(conn, "acme.after", {"n": 1})
        conn.rollback()
    assert count_events(pg_engine) == 1
