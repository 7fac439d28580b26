"""``herald audit``, run for real against a farm's day and its consumers' records.

The database is seeded in-process as a farm would fill it: builds saved
through the unit of work (a restart, a message kept until the build waits,
one ignored after it finished), two consumers run by a real
:class:`herald.consumers.Daemon` (one handler fails once for one build and
always for another, which parks that build's events), operator actions
recorded through :mod:`herald.operations`, and one more build written after
the daemon stopped (pending work). The real ``herald audit`` command then
answers, and every check compares its ``--json`` with the rows the tables
hold, read here with SQL of the test's own.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.consumers import Consumer, Daemon, Delivered
from herald.domain import Build
from herald.operations import record
from herald.outbox import LogEntry, Sequencer, UnitOfWork, head
from herald.outbox.farm import finish_build, receive_message, wait_for_message
from herald.schema import consumers

from .conftest import (
    Call,
    assert_ok,
    assert_one_line_error,
    connect,
    describe,
    herald,
    herald_many,
    seeded_databases,
    wait_until,
)

pytestmark = pytest.mark.acceptance

#: The tests on the shared PostgreSQL farm.
PG = pytest.mark.postgresql

#: The consumers' topics, as herald.toml configures them.
STATUS_TOPICS = ("build_started", "build_finished")
CONFIG = """
[consumers.archive]
type = "jsonl"
topics = ["*"]
path = "archive.jsonl"

[consumers.status]
type = "jsonl"
topics = ["build_started", "build_finished"]
path = "status.jsonl"

[consumers.fresh]
type = "jsonl"
topics = ["build_finished"]
path = "fresh.jsonl"
"""

#: Build 42 waits for a message; 43 fails, is restarted and succeeds; 44's status
#: deliveries always fail (parked); 45 is written after the consumers stopped.
WAITING, RESTARTED, PARKED, LATE = 42, 43, 44, 45

TIMELINE_KEYS = {"build_id", "aggregate_id", "build", "events", "messages"}
EVENT_KEYS = {
    "seq",
    "position",
    "topic",
    "aggregate_version",
    "delivery",
    "recorded_at",
    "occurred_at",
    "generation",
    "payload",
    "deliveries",
}
RECORD_KEYS = {
    "id",
    "consumer",
    "seq",
    "attempt",
    "outcome",
    "kind",
    "started_at",
    "duration_ms",
    "error",
    "http_status",
    "detail",
}
PENDING_KEYS = {"consumer", "topics", "has_run", "offset", "head", "lag", "parked", "pending"}
REPORT_KEYS = {
    "consumer",
    "since",
    "offset",
    "head",
    "lag",
    "parked",
    "records",
    "attempts",
    "failed_attempts",
    "failure_rate",
    "outcomes",
    "kinds",
    "held",
    "slowest",
    "errors",
    "operations",
}
OUTCOMES = ("delivered", "failed", "parked", "expired", "discarded")


# -- seeding ----------------------------------------------------------------------------------


@contextmanager
def unit_of_work(engine: sa.Engine) -> Iterator[UnitOfWork]:
    """A unit of work saved in one committed transaction on leaving the block."""
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        yield uow
        uow.save()


def queue(uow: UnitOfWork, build_id: int) -> Build:
    return uow.add(
        Build(build_id, 1, f"job-{build_id}", f"/nix/store/{build_id}.drv", "x86_64-linux")
    )


def farm_day(engine: sa.Engine) -> None:
    """Builds 42, 43 and 44 through the domain, one change a transaction."""
    with unit_of_work(engine) as uow:
        for build_id in (WAITING, RESTARTED, PARKED):
            queue(uow, build_id)
    with unit_of_work(engine) as uow:
        for build_id in (WAITING, RESTARTED, PARKED):
            uow.build(build_id).start()
    with unit_of_work(engine) as uow:
        receive_message(uow, WAITING, "early", "pass")  # kept: the build is not waiting yet
    with unit_of_work(engine) as uow:
        build = uow.build(WAITING)
        build.start_step(1, "builder-1")
        build.finish_step(1, 0, "/log/42-1")
    with unit_of_work(engine) as uow:
        wait_for_message(uow, WAITING)  # applies "early": finished, status 0
    with unit_of_work(engine) as uow:
        receive_message(uow, WAITING, "late", "fail")  # ignored: already finished
    with unit_of_work(engine) as uow:
        finish_build(uow, RESTARTED, 1)
        finish_build(uow, PARKED, 0)
    with unit_of_work(engine) as uow:
        uow.build(RESTARTED).restart()
    with unit_of_work(engine) as uow:
        uow.build(RESTARTED).start()
    with unit_of_work(engine) as uow:
        finish_build(uow, RESTARTED, 0)


def late_build(engine: sa.Engine) -> None:
    """Build 45, queued, started and finished while no consumer runs."""
    with unit_of_work(engine) as uow:
        queue(uow, LATE)
    with unit_of_work(engine) as uow:
        uow.build(LATE).start()
    with unit_of_work(engine) as uow:
        finish_build(uow, LATE, 0)


def ordered_head(engine: sa.Engine) -> int:
    """Order what has committed (PostgreSQL) and return the newest seq."""
    with engine.connect() as conn:
        Sequencer().cycle(conn)
        return head(conn)


class StatusPage:
    """The status consumer's handler: fails once for build 43's events, always for 44's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[int] = Counter()

    def __call__(self, entry: LogEntry) -> Delivered:
        with self.lock:
            self.calls[entry.seq] += 1
            calls = self.calls[entry.seq]
        build_id = entry.payload["build_id"]
        if build_id == PARKED:
            raise RuntimeError(f"status page refused build {build_id}")
        if build_id == RESTARTED and calls == 1:
            raise RuntimeError("status page busy, try again")
        return Delivered(http_status=201)


def archive(entry: LogEntry) -> Delivered:
    """Delivers everything; slow for build 42's build_finished (the slowest delivery)."""
    if entry.topic == "build_finished" and entry.payload.get("build_id") == WAITING:
        time.sleep(0.05)
    return Delivered(detail={"topic": entry.topic})


def run_consumers(engine: sa.Engine, until_seq: int) -> None:
    """The status and archive consumers, in a daemon, until both have finished ``until_seq``."""
    fast: dict[str, Any] = {"retry_initial": 0.01, "retry_max": 0.02, "max_attempts": 2}
    members = [
        Consumer("status", STATUS_TOPICS, StatusPage(), delivery="at_least_once", **fast),
        Consumer("archive", ["*"], archive, **fast),
    ]

    def offsets() -> list[int]:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(consumers.c.offset_seq)).scalars().all()
        return [int(value) for value in rows]

    with Daemon(engine, members, poll_interval=0.05, claim_interval=0.1):
        wait_until(
            lambda: len(offsets()) == 2 and min(offsets()) >= until_seq,
            30,
            f"both consumers finishing seq {until_seq}",
        )


def seed(url: str) -> None:
    engine = create_engine(url)
    try:
        farm_day(engine)
        run_consumers(engine, ordered_head(engine))
        with engine.begin() as conn:
            record(conn, "reset", "status", {"from": 5, "to": 3, "how": "--to-seq"})
            record(conn, "replay", "archive", {"from": 1, "to": 4})
            record(conn, "prune", None, {"deleted": 0})
        late_build(engine)
        ordered_head(engine)
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class Farm:
    url: str
    #: where herald.toml is (the commands' working directory)
    configured: Path
    #: a directory without herald.toml
    bare: Path


@pytest.fixture(scope="module")
def farm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Farm]:
    """The seeded PostgreSQL database, shared by the module's tests (audit only reads)."""
    directory = tmp_path_factory.mktemp("audit")
    configured = directory / "configured"
    bare = directory / "bare"
    configured.mkdir()
    bare.mkdir()
    (configured / "herald.toml").write_text(CONFIG, encoding="utf-8")
    with seeded_databases(request, "postgresql", ["farm"], seed, directory) as urls:
        yield Farm(urls["farm"], configured, bare)


# -- reading the tables -------------------------------------------------------------------------


def rows(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    with connect(url) as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]


def check_timeline(url: str, build_id: int, timeline: dict[str, Any]) -> None:
    """The timeline is exactly what the tables hold for the build."""
    assert set(timeline) == TIMELINE_KEYS
    aggregate_id = str(Build.id_for(build_id))
    assert (timeline["build_id"], timeline["aggregate_id"]) == (build_id, aggregate_id)
    expected_events = rows(
        url,
        "SELECT l.seq, e.position, e.topic, e.aggregate_version, e.payload FROM herald_events e "
        "JOIN herald_log l USING (position) WHERE e.aggregate_id = :id ORDER BY l.seq",
        id=aggregate_id,
    )
    assert expected_events, f"build {build_id} has no events: the seed is wrong"
    events = timeline["events"]
    assert all(set(event) == EVENT_KEYS for event in events)
    assert [
        (e["seq"], e["position"], e["topic"], e["aggregate_version"], e["payload"]) for e in events
    ] == [
        (r["seq"], r["position"], r["topic"], r["aggregate_version"], r["payload"])
        for r in expected_events
    ]
    assert [e["generation"] for e in events] == [
        r["payload"].get("generation") for r in expected_events
    ]
    records = rows(
        url,
        "SELECT id, consumer, seq, attempt, outcome, kind, error, http_status, detail "
        "FROM herald_deliveries WHERE seq = ANY (:seqs) ORDER BY seq, consumer, id",
        seqs=[r["seq"] for r in expected_events],
    )
    shown = [record for event in events for record in event["deliveries"]]
    assert all(set(record) == RECORD_KEYS for record in shown)
    assert all(record["seq"] == event["seq"] for event in events for record in event["deliveries"])
    keys = ("id", "consumer", "seq", "attempt", "outcome", "kind", "error", "http_status", "detail")
    assert [tuple(r[k] for k in keys) for r in shown] == [
        tuple(r[k] for k in keys) for r in records
    ]
    (build,) = rows(
        url,
        "SELECT state, status, generation FROM herald_builds WHERE build_id = :id",
        id=build_id,
    )
    assert {k: timeline["build"][k] for k in ("state", "status", "generation")} == build
    messages = rows(
        url,
        "SELECT message_id, type, generation, state, reason FROM herald_build_messages "
        "WHERE build_id = :id ORDER BY received_at, message_id",
        id=build_id,
    )
    assert [
        {k: m[k] for k in ("message_id", "type", "generation", "state", "reason")}
        for m in timeline["messages"]
    ] == messages


# -- herald audit build -----------------------------------------------------------------------


@PG
def test_a_build_timeline_is_what_the_tables_hold(farm: Farm) -> None:
    results = herald_many(
        [Call(("audit", "build", str(b), "--json"), farm.url) for b in (42, 43, 44, 45)],
        cwd=farm.bare,
    )
    timelines = {}
    for build_id, result in zip((42, 43, 44, 45), results, strict=True):
        assert_ok(result)
        timelines[build_id] = json.loads(result.stdout)
        check_timeline(farm.url, build_id, timelines[build_id])

    waiting = timelines[WAITING]
    assert [m["message_id"] for m in waiting["messages"]] == ["early", "late"]
    assert [m["state"] for m in waiting["messages"]] == ["applied", "ignored"]
    assert waiting["build"] == {
        "state": "finished",
        "status": 0,
        "status_name": "succeeded",
        "generation": 1,
    }
    # Every event reached the archive; build_started and build_finished reached status too.
    for event in waiting["events"]:
        by = {(r["consumer"], r["outcome"]) for r in event["deliveries"]}
        assert ("archive", "delivered") in by
        assert (("status", "delivered") in by) == (event["topic"] in STATUS_TOPICS)

    restarted = timelines[RESTARTED]
    finished = [e for e in restarted["events"] if e["topic"] == "build_finished"]
    assert [(e["generation"], e["payload"]["status"]) for e in finished] == [(1, 1), (2, 0)]
    for event in finished:
        status = [
            (r["attempt"], r["outcome"]) for r in event["deliveries"] if r["consumer"] == "status"
        ]
        assert status == [(1, "failed"), (2, "delivered")]

    parked = timelines[PARKED]
    started, done = (e for e in parked["events"] if e["topic"] in STATUS_TOPICS)
    status_records = [
        [(r["attempt"], r["outcome"]) for r in e["deliveries"] if r["consumer"] == "status"]
        for e in (started, done)
    ]
    assert status_records == [[(1, "failed"), (2, "parked")], [(0, "parked")]]

    # Written after the consumers stopped: no records yet.
    assert all(not e["deliveries"] for e in timelines[LATE]["events"])


@PG
def test_a_build_timeline_as_a_table(farm: Farm) -> None:
    result = herald(farm.url, "audit", "build", str(RESTARTED), cwd=farm.bare)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"build {RESTARTED}: finished, generation 2, status 0 (succeeded)"
    events = rows(
        farm.url,
        "SELECT l.seq, e.topic FROM herald_events e JOIN herald_log l USING (position) "
        "WHERE e.aggregate_id = :id ORDER BY l.seq",
        id=str(Build.id_for(RESTARTED)),
    )
    event_lines = [
        line.split() for line in lines if line.split()[:1] in ([str(r["seq"])] for r in events)
    ]
    assert [(cells[0], cells[3]) for cells in event_lines] == [
        (str(r["seq"]), r["topic"]) for r in events
    ], describe(result)
    # Each event's deliveries are indented under it.
    table = lines[lines.index(next(line for line in lines if line.startswith("SEQ"))) + 1 :]
    current: str | None = None
    seen: list[tuple[str, str]] = []
    for line in table:
        cells = line.split()
        if not cells or cells[0] == "messages:":
            break
        if "↳" in cells:
            assert current is not None, describe(result)
            seen.append((current, cells[cells.index("↳") + 1]))
        else:
            current = cells[0]
    records = rows(
        farm.url,
        "SELECT seq, consumer FROM herald_deliveries WHERE seq = ANY (:seqs) "
        "ORDER BY seq, consumer, id",
        seqs=[r["seq"] for r in events],
    )
    assert seen == [(str(r["seq"]), r["consumer"]) for r in records], describe(result)


# -- herald audit pending ---------------------------------------------------------------------


def expected_pending(url: str, offset: int, topics: tuple[str, ...] | None) -> list[dict[str, Any]]:
    where = "" if topics is None else "AND e.topic = ANY (:topics)"
    return rows(
        url,
        "SELECT l.seq, e.topic, e.delivery, e.payload FROM herald_log l "
        f"JOIN herald_events e USING (position) WHERE l.seq > :offset {where} ORDER BY l.seq",
        offset=offset,
        topics=list(topics or ()),
    )


def check_pending(
    url: str, data: dict[str, Any], consumer: str, topics: tuple[str, ...] | None, limit: int
) -> None:
    """The answer is what the tables hold for ``consumer`` reading ``topics`` (None: all)."""
    assert set(data) == PENDING_KEYS
    offsets = rows(url, "SELECT offset_seq FROM herald_consumers WHERE name = :n", n=consumer)
    offset = offsets[0]["offset_seq"] if offsets else 0
    (top,) = rows(url, "SELECT max(seq) AS head FROM herald_log")
    assert (data["consumer"], data["offset"], data["head"]) == (consumer, offset, top["head"])
    assert data["has_run"] == bool(offsets)
    assert data["lag"] == top["head"] - offset
    parked = rows(
        url,
        "SELECT p.seq, p.key, p.attempts, p.held_by, p.error, e.topic FROM herald_parked p "
        "JOIN herald_log l USING (seq) JOIN herald_events e USING (position) "
        "WHERE p.consumer = :n ORDER BY p.seq",
        n=consumer,
    )
    assert [
        {k: p[k] for k in ("seq", "key", "attempts", "held_by", "error", "topic")}
        for p in data["parked"]
    ] == parked
    expected = expected_pending(url, offset, topics)
    pending = data["pending"]
    assert pending["count"] == len(expected)
    assert pending["build_finished"] == sum(1 for e in expected if e["topic"] == "build_finished")
    assert pending["complete"] is True
    assert pending["scanned_to"] == top["head"]
    assert [(e["seq"], e["topic"], e["delivery"], e["build_id"]) for e in pending["events"]] == [
        (e["seq"], e["topic"], e["delivery"], e["payload"].get("build_id"))
        for e in expected[:limit]
    ]
    if expected:
        (oldest,) = rows(
            url,
            "SELECT e.recorded_at FROM herald_log l JOIN herald_events e USING (position) "
            "WHERE l.seq = :seq",
            seq=expected[0]["seq"],
        )
        assert datetime.fromisoformat(pending["since"]) == oldest["recorded_at"]
    else:
        assert pending["since"] is None


@PG
def test_pending_is_what_each_consumer_has_not_finished(farm: Farm) -> None:
    config = str(farm.configured / "herald.toml")
    cases: list[tuple[str, tuple[str, ...] | None, int, tuple[str, ...]]] = [
        ("status", STATUS_TOPICS, 20, ("--config", config)),
        ("archive", ("*",), 2, ("--config", config)),
        ("fresh", ("build_finished",), 20, ("--config", config)),  # configured, never ran
        ("archive", None, 20, ()),  # ran, not configured (no herald.toml here): every topic
    ]
    results = herald_many(
        [
            Call(("audit", "pending", name, "--limit", str(limit), *options, "--json"), farm.url)
            for name, _, limit, options in cases
        ],
        cwd=farm.bare,
    )
    for (name, topics, limit, _), result in zip(cases, results, strict=True):
        assert_ok(result)
        data = json.loads(result.stdout)
        check_pending(farm.url, data, name, None if topics in (None, ("*",)) else topics, limit)
        assert data["topics"] == (None if topics is None else list(topics))
    status = json.loads(results[0].stdout)
    # Build 45's build_started and build_finished wait; build 44's two events are parked.
    assert status["pending"]["count"] == 2
    assert status["pending"]["build_finished"] == 1
    assert [p["held_by"] for p in status["parked"]] == [None, status["parked"][0]["seq"]]
    fresh = json.loads(results[2].stdout)
    assert (fresh["offset"], fresh["has_run"]) == (0, False)
    assert fresh["pending"]["build_finished"] == fresh["pending"]["count"] == 5


@PG
def test_pending_as_text(farm: Farm) -> None:
    result = herald(farm.url, "audit", "pending", "status", cwd=farm.configured)
    assert_ok(result)
    (offset,) = rows(farm.url, "SELECT offset_seq FROM herald_consumers WHERE name = 'status'")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"consumer status: offset {offset['offset_seq']}, head ")
    assert "parked: 2" in lines
    assert any(
        line.startswith("pending: 2 event(s) of its topics after the offset") for line in lines
    )
    assert any(line.startswith("build_finished pending: 1") for line in lines)


# -- herald audit consumer ---------------------------------------------------------------------


@PG
def test_a_consumer_report_is_what_its_records_say(farm: Farm) -> None:
    status, everything, future, archive = herald_many(
        [
            Call(("audit", "consumer", "status", "--json"), farm.url),
            Call(("audit", "consumer", "status", "--since", "1h", "--json"), farm.url),
            Call(("audit", "consumer", "status", "--since", "2099-01-01", "--json"), farm.url),
            Call(("audit", "consumer", "archive", "--json"), farm.url),
        ],
        cwd=farm.bare,
    )
    for result in (status, everything, future, archive):
        assert_ok(result)
    report = json.loads(status.stdout)
    assert set(report) == REPORT_KEYS
    records = rows(
        farm.url,
        "SELECT id, seq, attempt, outcome, kind, duration_ms, error, started_at "
        "FROM herald_deliveries WHERE consumer = 'status'",
    )
    assert report["records"] == len(records) > 0
    assert report["outcomes"] == {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    kinds = Counter(r["kind"] for r in records)
    assert report["kinds"] == dict(kinds)
    calls = [
        r
        for r in records
        if r["outcome"] in ("delivered", "failed", "parked") and r["attempt"] >= 1
    ]
    failed = [r for r in calls if r["outcome"] != "delivered"]
    assert (report["attempts"], report["failed_attempts"]) == (len(calls), len(failed))
    assert report["failure_rate"] == pytest.approx(len(failed) / len(calls))
    assert report["held"] == sum(r["outcome"] == "parked" and r["attempt"] == 0 for r in records)
    assert report["held"] == 1
    slowest = sorted(records, key=lambda r: (-r["duration_ms"], r["id"]))[:10]
    assert [r["id"] for r in report["slowest"]] == [r["id"] for r in slowest]
    errors = sorted(
        (r for r in records if r["outcome"] in ("failed", "parked") and r["error"]),
        key=lambda r: (r["started_at"], r["id"]),
        reverse=True,
    )[:10]
    assert [r["id"] for r in report["errors"]] == [r["id"] for r in errors]
    assert all(r["topic"] in STATUS_TOPICS for r in report["slowest"] + report["errors"])
    (row,) = rows(farm.url, "SELECT offset_seq FROM herald_consumers WHERE name = 'status'")
    assert report["offset"] == row["offset_seq"]
    (parked,) = rows(farm.url, "SELECT count(*) AS n FROM herald_parked WHERE consumer = 'status'")
    assert report["parked"] == parked["n"] == 2
    operations = rows(
        farm.url,
        "SELECT id, action FROM herald_operations WHERE consumer = 'status' ORDER BY id DESC",
    )
    assert [(op["id"], op["action"]) for op in report["operations"]] == [
        (op["id"], op["action"]) for op in operations
    ]
    assert [op["action"] for op in report["operations"]] == ["reset"]
    assert report["operations"][0]["detail"] == {"from": 5, "to": 3, "how": "--to-seq"}

    recent = json.loads(everything.stdout)
    assert recent["since"] is not None
    assert {k: recent[k] for k in ("records", "outcomes", "attempts")} == {
        k: report[k] for k in ("records", "outcomes", "attempts")
    }
    nothing = json.loads(future.stdout)
    assert nothing["since"] == "2099-01-01T00:00:00+00:00"
    assert (nothing["records"], nothing["attempts"], nothing["failure_rate"]) == (0, 0, None)
    assert (nothing["slowest"], nothing["errors"], nothing["operations"]) == ([], [], [])
    assert nothing["parked"] == 2  # the state now, whatever the window

    archived = json.loads(archive.stdout)
    assert archived["failure_rate"] == 0.0
    (longest,) = rows(
        farm.url,
        "SELECT d.seq FROM herald_deliveries d WHERE consumer = 'archive' "
        "ORDER BY duration_ms DESC, id LIMIT 1",
    )
    assert archived["slowest"][0]["seq"] == longest["seq"]
    assert archived["slowest"][0]["topic"] == "build_finished"
    assert archived["slowest"][0]["detail"] == {"topic": "build_finished"}
    assert [op["action"] for op in archived["operations"]] == ["replay"]


@PG
def test_a_consumer_report_as_text(farm: Farm) -> None:
    result = herald(farm.url, "audit", "consumer", "status", cwd=farm.bare)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("consumer status: offset ")
    assert lines[0].endswith("2 parked now; all records")
    assert any(
        line.startswith("attempts: ") and "held behind a parked event: 1" in line for line in lines
    )
    assert "resets and replays: 1" in lines


# -- herald audit topics ------------------------------------------------------------------------


@PG
def test_topic_counts_are_what_the_tables_hold(farm: Farm) -> None:
    everything, recent, future = herald_many(
        [
            Call(("audit", "topics", "--json"), farm.url),
            Call(("audit", "topics", "--since", "1h", "--json"), farm.url),
            Call(("audit", "topics", "--since", "2099-01-01T00:00:00Z", "--json"), farm.url),
        ],
        cwd=farm.bare,
    )
    for result in (everything, recent, future):
        assert_ok(result)
    counts = json.loads(everything.stdout)
    events = rows(
        farm.url, "SELECT topic, count(*) AS n FROM herald_events GROUP BY topic ORDER BY topic"
    )
    assert [(t["topic"], t["events"]) for t in counts["topics"]] == [
        (r["topic"], r["n"]) for r in events
    ]
    assert counts["events"] == sum(r["n"] for r in events)
    outcomes = rows(
        farm.url,
        "SELECT e.topic, d.outcome, count(*) AS n FROM herald_deliveries d "
        "JOIN herald_log l USING (seq) JOIN herald_events e USING (position) "
        "GROUP BY e.topic, d.outcome",
    )
    expected = {r["topic"]: dict.fromkeys(OUTCOMES, 0) for r in events}
    for r in outcomes:
        expected[r["topic"]][r["outcome"]] = r["n"]
    assert {t["topic"]: t["deliveries"] for t in counts["topics"]} == expected
    assert expected["build_started"]["parked"] == 1  # the check sees something
    assert json.loads(recent.stdout)["topics"] == counts["topics"]
    assert json.loads(future.stdout) == {
        "since": "2099-01-01T00:00:00+00:00",
        "events": 0,
        "topics": [],
    }


@PG
def test_topic_counts_as_a_table(farm: Farm) -> None:
    result = herald(farm.url, "audit", "topics", cwd=farm.bare)
    assert_ok(result)
    lines = result.stdout.splitlines()
    (total,) = rows(farm.url, "SELECT count(*) AS n FROM herald_events")
    assert lines[0].startswith(f"{total['n']} event(s) in the log, ")
    assert lines[1].split() == ["TOPIC", "EVENTS", *(o.upper() for o in OUTCOMES)]
    by_topic = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    (finished,) = rows(
        farm.url, "SELECT count(*) AS n FROM herald_events WHERE topic = 'build_finished'"
    )
    assert by_topic["build_finished"][0] == str(finished["n"])


# -- bad input, and nothing written --------------------------------------------------------------


@PG
def test_bad_input_is_one_line_and_exit_status_2(farm: Farm) -> None:
    cases: list[tuple[tuple[str, ...], str]] = [
        (("build", "999"), "build 999 does not exist"),
        (("build", "0"), "BUILD"),
        (("build", "-3"), "-3"),
        (("build", "9223372036854775808"), "BUILD"),
        (("pending", "nobody"), "unknown consumer 'nobody'"),
        (("pending", "fresh"), "unknown consumer 'fresh'"),  # no herald.toml here
        (("pending", "bad name!"), "not valid"),
        (("consumer", "nobody"), "unknown consumer 'nobody'"),
        (("consumer", "status", "--since", "yesterdayish"), "--since"),
        (("topics", "--since", "yesterdayish"), "--since"),
        (("pending", "status", "--config", "missing.toml"), "missing.toml"),
    ]
    results = herald_many([Call(("audit", *args), farm.url) for args, _ in cases], cwd=farm.bare)
    for (_, mentions), result in zip(cases, results, strict=True):
        assert_one_line_error(result, 2, [mentions])


def table_counts(url: str) -> dict[str, int]:
    with connect(url) as conn:
        names = (
            conn.execute(
                sa.text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename LIKE 'herald%' ORDER BY tablename"
                )
            )
            .scalars()
            .all()
        )
        return {
            name: int(conn.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar_one())
            for name in names
        }


@PG
def test_audit_writes_nothing(farm: Farm) -> None:
    before = table_counts(farm.url)
    (consumer_rows,) = rows(
        farm.url, "SELECT string_agg(name || offset_seq, ',') AS s FROM herald_consumers"
    )
    results = herald_many(
        [
            Call(("audit", "build", "42"), farm.url),
            Call(("audit", "pending", "status", "--config", "herald.toml"), farm.url),
            Call(("audit", "pending", "fresh", "--config", "herald.toml"), farm.url),
            Call(("audit", "consumer", "fresh", "--config", "herald.toml", "--json"), farm.url),
            Call(("audit", "topics"), farm.url),
        ],
        cwd=farm.configured,
    )
    for result in results:
        assert_ok(result)
    fresh = json.loads(results[3].stdout)
    assert (fresh["offset"], fresh["records"], fresh["failure_rate"]) == (None, 0, None)
    assert table_counts(farm.url) == before
    assert before["herald_consumers"] == 2  # "fresh" got no row
    assert rows(
        farm.url, "SELECT string_agg(name || offset_seq, ',') AS s FROM herald_consumers"
    ) == [consumer_rows]


# -- SQLite -----------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_audit_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    engine = create_engine(sqlite_url)
    try:
        farm_day(engine)
        run_consumers(engine, ordered_head(engine))
        late_build(engine)
    finally:
        engine.dispose()
    (tmp_path / "herald.toml").write_text(CONFIG, encoding="utf-8")
    calls = [
        ("build", str(WAITING)),
        ("build", str(PARKED)),
        ("pending", "status"),
        ("consumer", "status", "--since", "1h"),
        ("topics", "--since", "1h"),
    ]
    results = herald_many(
        [Call(("audit", *args, "--json"), sqlite_url) for args in calls], tmp_path
    )
    for result in results:
        assert_ok(result)
    waiting, parked, pending, report, counts = (json.loads(r.stdout) for r in results)
    check_sqlite_timeline(sqlite_url, WAITING, waiting)
    check_sqlite_timeline(sqlite_url, PARKED, parked)
    outcomes = {r["outcome"] for e in parked["events"] for r in e["deliveries"]}
    assert outcomes == {"delivered", "failed", "parked"}

    late = rows(
        sqlite_url,
        "SELECT l.seq FROM herald_log l JOIN herald_events e USING (position) "
        "WHERE l.seq > (SELECT offset_seq FROM herald_consumers WHERE name = 'status') "
        "AND e.topic IN ('build_started', 'build_finished') ORDER BY l.seq",
    )
    assert [e["seq"] for e in pending["pending"]["events"]] == [r["seq"] for r in late]
    assert (pending["pending"]["count"], pending["pending"]["build_finished"]) == (2, 1)
    assert [p["held_by"] is None for p in pending["parked"]] == [True, False]

    records = rows(
        sqlite_url,
        "SELECT outcome, count(*) AS n FROM herald_deliveries WHERE consumer = 'status' "
        "GROUP BY outcome",
    )
    assert {o: n for o, n in report["outcomes"].items() if n} == {
        r["outcome"]: r["n"] for r in records
    }
    assert report["held"] == 1
    events = rows(
        sqlite_url, "SELECT topic, count(*) AS n FROM herald_events GROUP BY topic ORDER BY topic"
    )
    assert [(t["topic"], t["events"]) for t in counts["topics"]] == [
        (r["topic"], r["n"]) for r in events
    ]

    missing = herald(sqlite_url, "audit", "build", "999")
    assert_one_line_error(missing, 2, ["build 999 does not exist"])


def check_sqlite_timeline(url: str, build_id: int, timeline: dict[str, Any]) -> None:
    """As :func:`check_timeline`, with SQL that SQLite speaks."""
    aggregate_id = str(Build.id_for(build_id))
    events = rows(
        url,
        "SELECT l.seq, e.topic FROM herald_events e JOIN herald_log l USING (position) "
        "WHERE e.aggregate_id = :id ORDER BY l.seq",
        id=aggregate_id,
    )
    assert [(e["seq"], e["topic"]) for e in timeline["events"]] == [
        (r["seq"], r["topic"]) for r in events
    ]
    records = rows(
        url,
        "SELECT d.id, d.consumer, d.seq, d.attempt, d.outcome FROM herald_deliveries d "
        "JOIN herald_log l USING (seq) JOIN herald_events e USING (position) "
        "WHERE e.aggregate_id = :id ORDER BY d.seq, d.consumer, d.id",
        id=aggregate_id,
    )
    assert records, "no delivery records: the consumers did not run"
    assert [
        (r["id"], r["consumer"], r["seq"], r["attempt"], r["outcome"])
        for e in timeline["events"]
        for r in e["deliveries"]
    ] == [(r["id"], r["consumer"], r["seq"], r["attempt"], r["outcome"]) for r in records]
    messages = rows(
        url,
        "SELECT message_id FROM herald_build_messages WHERE build_id = :id "
        "ORDER BY received_at, message_id",
        id=build_id,
    )
    assert [m["message_id"] for m in timeline["messages"]] == [m["message_id"] for m in messages]


@pytest.mark.sqlite
def test_audit_operations_lists_the_recorded_actions_as_the_table_has_them(
    sqlite_url: str,
) -> None:
    engine = create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            record(conn, "reset", "github", {"from": 9, "to": 0, "how": "--to-earliest"})
            record(conn, "replay", "hook", {"from": 1, "until": 5, "events": 5})
            record(conn, "prune", None, {"events": 3, "first_seq": 1, "last_seq": 3})
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM herald_operations ORDER BY id DESC")).all()
    finally:
        engine.dispose()
    everything, resets, bad = herald_many(
        [
            Call(("audit", "operations", "--json"), sqlite_url),
            Call(("audit", "operations", "--action", "reset", "--json"), sqlite_url),
            Call(("audit", "operations", "--action", "delete"), sqlite_url),
        ]
    )
    assert_ok(everything)
    listed = json.loads(everything.stdout)["operations"]
    assert [(o["id"], o["action"], o["consumer"], o["actor"]) for o in listed] == [
        (r.id, r.action, r.consumer, r.actor) for r in rows
    ]
    assert [o["detail"] for o in listed] == [json.loads(r.detail) for r in rows]
    assert_ok(resets)
    assert [o["consumer"] for o in json.loads(resets.stdout)["operations"]] == ["github"]
    assert_one_line_error(bad, 2)
