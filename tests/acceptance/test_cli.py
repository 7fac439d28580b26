"""The ``herald`` command, run for real: what it prints, its exit status, what it writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.domain import CATALOGUE, MAX_PAYLOAD_BYTES
from herald.outbox import append
from herald.schema import metadata, migrate, topics
from herald.schema.migrate import head_revision

from .conftest import (
    Call,
    Result,
    assert_ok,
    assert_one_line_error,
    connect,
    describe,
    event_rows,
    herald,
    herald_many,
    log_order_rows,
    row_counts,
    seeded_databases,
)

pytestmark = pytest.mark.acceptance

BUILD_FINISHED = {"build_id": 42, "dependent_ids": [1, 2]}
BUILD_FINISHED_JSON = '{"build_id": 42, "dependent_ids": [1, 2]}'

BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]


def blob(size: int) -> str:
    """A custom-topic payload whose compact JSON is exactly ``size`` bytes."""
    text = json.dumps({"x": "a" * (size - len('{"x":""}'))}, separators=(",", ":"))
    assert len(text.encode()) == size
    return text


def aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _append(topic: str, payload: str = BUILD_FINISHED_JSON, *more: str) -> tuple[str, ...]:
    return ("append", topic, "--payload", payload, *more)


def json_lines(result: Result) -> list[dict[str, Any]]:
    """stdout as one JSON object per line (fails on anything else)."""
    objects = []
    for line in result.stdout.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}{describe(result)}")
        assert isinstance(obj, dict), describe(result)
        objects.append(obj)
    return objects


@pytest.fixture(params=BACKENDS)
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database herald never touched: an empty PostgreSQL database, or a new SQLite path."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_empty_url")
        return url
    return f"sqlite:///{tmp_path / 'fresh.db'}"


def table_names(database_url: str) -> set[str]:
    with connect(database_url) as conn:
        return set(sa.inspect(conn).get_table_names())


# -- db upgrade / db current ------------------------------------------------------------


def test_db_upgrade_migrates_an_empty_database_and_is_idempotent(
    unmigrated_url: str, tmp_path: Path
) -> None:
    head = head_revision()
    first = herald(unmigrated_url, "db", "upgrade", cwd=tmp_path)
    assert_ok(first)
    assert f"revision {head}" in first.stdout, describe(first)
    assert "already at" not in first.stdout, describe(first)
    assert set(metadata.tables) <= table_names(unmigrated_url)
    with connect(unmigrated_url) as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        stored = {
            str(row.topic): str(row.delivery)
            for row in conn.execute(sa.select(topics.c.topic, topics.c.delivery))
        }
    assert version == head
    assert stored == {name: spec.delivery for name, spec in CATALOGUE.items()}

    again = herald(unmigrated_url, "db", "upgrade", cwd=tmp_path)
    assert_ok(again)
    assert "already at" in again.stdout, describe(again)
    assert f"revision {head}" in again.stdout, describe(again)
    with connect(unmigrated_url) as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        n_topics = conn.execute(sa.select(sa.func.count()).select_from(topics)).scalar_one()
    assert [v for (v,) in versions] == [head]
    assert n_topics == len(CATALOGUE)
    assert row_counts(unmigrated_url) == (0, 0)

    current = herald(unmigrated_url, "db", "current", "--json", cwd=tmp_path)
    assert_ok(current)
    assert json.loads(current.stdout) == {"current": head, "head": head, "up_to_date": True}


def test_a_database_never_migrated_says_run_db_upgrade(unmigrated_url: str, tmp_path: Path) -> None:
    log, current = herald_many(
        [Call(("log",), unmigrated_url), Call(("db", "current", "--json"), unmigrated_url)],
        cwd=tmp_path,
    )
    assert_one_line_error(log, 1, mentions=["herald db upgrade"])
    assert_ok(current)
    assert json.loads(current.stdout) == {
        "current": None,
        "head": head_revision(),
        "up_to_date": False,
    }
    assert table_names(unmigrated_url) == set(), "a command created tables"


def test_a_database_behind_herald_says_which_revision_and_to_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0001")
    finally:
        engine.dispose()
    shown = herald(url, "build", "show", "1", cwd=tmp_path)
    line = assert_one_line_error(shown, 1, mentions=["herald db upgrade"])
    assert f"revision 0001, this herald needs {head_revision()}" in line
    assert_ok(herald(url, "db", "upgrade", cwd=tmp_path))
    assert_one_line_error(herald(url, "build", "show", "1", cwd=tmp_path), 2, ["does not exist"])


# -- append and log ---------------------------------------------------------------------


def test_append_prints_the_position_and_log_shows_the_event(db_url: str, tmp_path: Path) -> None:
    started = datetime.now(UTC)
    appended = herald(
        db_url, "append", "build_finished", "--payload", BUILD_FINISHED_JSON, cwd=tmp_path
    )
    assert_ok(appended)
    assert appended.stdout.strip().isdigit(), describe(appended)
    position = int(appended.stdout)

    rows = event_rows(db_url)
    assert len(rows) == 1
    row = rows[0]
    assert row.position == position
    assert row.topic == "build_finished"
    assert row.payload == BUILD_FINISHED
    assert row.delivery == "at_least_once"
    assert row.dedupe_key is None

    shown = herald(db_url, "log", "--json", cwd=tmp_path)
    assert_ok(shown)
    entries = json_lines(shown)
    assert len(entries) == 1, describe(shown)
    entry = entries[0]
    assert {"seq", "position", "topic", "payload", "recorded_at"} <= set(entry), entry
    assert entry["seq"] == 1
    assert entry["position"] == position
    assert entry["topic"] == "build_finished"
    assert entry["payload"] == BUILD_FINISHED
    assert entry["delivery"] == "at_least_once"
    recorded_at = datetime.fromisoformat(entry["recorded_at"])
    assert recorded_at.tzinfo is not None, entry
    assert recorded_at == aware(row.recorded_at)
    assert started - timedelta(minutes=5) < recorded_at < datetime.now(UTC) + timedelta(minutes=5)
    assert log_order_rows(db_url) == [(1, position)]


def test_append_with_a_dedupe_key_twice_writes_one_event(db_url: str, tmp_path: Path) -> None:
    first = herald(
        db_url, *_append("build_finished", BUILD_FINISHED_JSON, "--dedupe-key", "k"), cwd=tmp_path
    )
    assert_ok(first)
    assert first.stdout.strip().isdigit(), describe(first)
    other_payload = '{"build_id": 43, "dependent_ids": []}'
    duplicate, other = herald_many(
        [
            Call(_append("build_finished", other_payload, "--dedupe-key", "k"), db_url),
            Call(_append("build_finished", BUILD_FINISHED_JSON, "--dedupe-key", "k2"), db_url),
        ],
        cwd=tmp_path,
    )
    assert_ok(duplicate)
    assert_ok(other)
    assert duplicate.stdout == first.stdout, (
        f"a duplicate key got a new position{describe(duplicate)}"
    )
    assert other.stdout.strip().isdigit(), describe(other)
    assert other.stdout != first.stdout

    rows = event_rows(db_url)
    by_key = {row.dedupe_key: row for row in rows}
    assert len(rows) == 2, rows
    assert by_key["k"].position == int(first.stdout)
    assert by_key["k"].payload == BUILD_FINISHED, "the duplicate overwrote the first event"
    assert by_key["k2"].position == int(other.stdout)


def test_append_custom_topics_up_to_the_size_limit(pg_url: str, tmp_path: Path) -> None:
    """The largest payload (PostgreSQL's jsonb is where size could bite) and a custom
    topic's own delivery rule. One byte more is refused: see the bad inputs."""
    largest = blob(MAX_PAYLOAD_BYTES)
    custom_args = ("--delivery", "ephemeral", "--trace-id", "t-1", "--json")
    big, custom = herald_many(
        [
            Call(("append", "acme.blob", "--payload", "-"), pg_url, stdin=largest),
            Call(_append("acme.deploy_started", '{"env": "prod"}', *custom_args), pg_url),
        ],
        cwd=tmp_path,
    )
    assert_ok(big)
    assert_ok(custom)
    assert big.stdout.strip().isdigit(), describe(big)
    custom_position = json.loads(custom.stdout)["position"]
    rows = {row.position: row for row in event_rows(pg_url)}
    assert set(rows) == {int(big.stdout), custom_position}
    blob_row = rows[int(big.stdout)]
    assert (blob_row.topic, blob_row.delivery) == ("acme.blob", "at_least_once")
    assert blob_row.payload == json.loads(largest)
    deploy = rows[custom_position]
    assert (deploy.topic, deploy.payload) == ("acme.deploy_started", {"env": "prod"})
    assert (deploy.delivery, deploy.trace_id) == ("ephemeral", "t-1")


#: Appended in this order, one transaction each: seq n is LOG_EVENTS[n - 1].
LOG_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("build_queued", {"build_id": 1}),  # 1
    ("build_started", {"build_id": 1}),  # 2
    ("builds_added", {"build_id": 1}),  # 3: `_` in build_* is not a wildcard
    ("step_started", {"build_id": 1, "step_nr": 1}),  # 4
    ("acme.deploy_started", {"env": "prod"}),  # 5
    ("build_finished", {"build_id": 1, "dependent_ids": []}),  # 6
    ("cached_build_queued", {"eval_id": 7, "build_id": 2}),  # 7
    ("build_finished", {"build_id": 2, "dependent_ids": [1]}),  # 8
]

#: `herald log --json ARGS` → the seqs it must print, in order.
LOG_QUERIES: list[tuple[tuple[str, ...], list[int]]] = [
    (("--from", "9"), []),
    (("--topic", "build_*"), [1, 2, 6, 8]),
    (("-t", "build_finished", "-t", "acme.*"), [5, 6, 8]),
    (("--topic", "build_*", "--from", "3", "--limit", "1"), [6]),
]


def test_log_from_limit_and_topic_select_exactly_the_right_seqs(
    db_url: str, tmp_path: Path
) -> None:
    engine = create_engine(db_url)
    try:
        positions = []
        for topic, payload in LOG_EVENTS:
            with engine.begin() as conn:
                positions.append(append(conn, topic, payload))
    finally:
        engine.dispose()

    # The first read alone: on PostgreSQL it also sequences the events (no daemon runs).
    everything = herald(db_url, "log", "--json", cwd=tmp_path)
    assert_ok(everything)
    entries = json_lines(everything)
    assert [(e["seq"], e["position"], e["topic"]) for e in entries] == [
        (seq, position, topic)
        for seq, (position, (topic, _)) in enumerate(zip(positions, LOG_EVENTS, strict=True), 1)
    ]
    assert [e["payload"] for e in entries] == [payload for _, payload in LOG_EVENTS]
    assert log_order_rows(db_url) == list(enumerate(positions, 1))

    calls = [Call(("log", "--json", *args), db_url) for args, _ in LOG_QUERIES]
    calls.append(Call(("log", "--from", "4", "-n", "2"), db_url))  # the human format
    *results, text = herald_many(calls, cwd=tmp_path)
    for (args, expected), result in zip(LOG_QUERIES, results, strict=True):
        assert_ok(result)
        got = [(e["seq"], e["topic"]) for e in json_lines(result)]
        assert [seq for seq, _ in got] == expected, f"herald log {' '.join(args)}{describe(result)}"
        assert all(topic == LOG_EVENTS[seq - 1][0] for seq, topic in got), describe(result)

    assert_ok(text)
    lines = text.stdout.splitlines()
    # seq, recorded_at (date and time), topic, payload
    fields = [line.split(maxsplit=4) for line in lines]
    assert [(f[0], f[3], json.loads(f[4])) for f in fields] == [
        ("4", *LOG_EVENTS[3]),
        ("5", *LOG_EVENTS[4]),
    ], describe(text)
    assert row_counts(db_url) == (8, 8)


# -- bad input ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadInput:
    """A command that must be refused: exit 2, one error line naming ``mentions``."""

    id: str
    args: tuple[str, ...]
    mentions: tuple[str, ...] = ()
    stdin: str | None = None
    #: whether it also runs on SQLite (where the backend could matter: the input
    #: gets as far as a transaction). Every case runs on PostgreSQL, where even
    #: `herald log` writes (it sequences), so a command that went too far shows there.
    sqlite: bool = False


def _oversized() -> str:
    payload = {"build_id": 1, "dependent_ids": list(range(1_000_000, 1_140_000))}
    text = json.dumps(payload)
    assert len(json.dumps(payload, separators=(",", ":"))) > MAX_PAYLOAD_BYTES
    return text


BAD_INPUTS = [
    BadInput("unknown-topic", _append("buld_finished"), ("buld_finished",)),
    BadInput("topic-capitals-and-dash", _append("Build-Finished"), ("Build-Finished",)),
    BadInput("topic-with-space", _append("build finished"), ("build finished",)),
    BadInput("topic-sql", _append("'; drop table herald_events; --"), ("drop table",), sqlite=True),
    BadInput("payload-array", _append("build_finished", "[1]"), ("object",)),
    BadInput("payload-string", _append("build_finished", '"x"'), ("object",)),
    BadInput("payload-number", _append("build_finished", "3"), ("object",)),
    BadInput("payload-invalid-json", _append("build_finished", "{bad"), ("JSON",)),
    BadInput(
        "payload-missing-field",
        _append("build_finished", '{"build_id": 1}'),
        ("dependent_ids",),
        sqlite=True,
    ),
    BadInput(
        "payload-wrong-type",
        _append("build_finished", '{"build_id": "x", "dependent_ids": []}'),
        ("build_id",),
    ),
    BadInput(
        "payload-oversized",
        ("append", "build_finished", "--payload", "-"),
        (str(MAX_PAYLOAD_BYTES),),
        stdin=_oversized(),
        sqlite=True,
    ),
    BadInput(
        "payload-one-byte-over",
        ("append", "acme.blob", "--payload", "-"),
        (str(MAX_PAYLOAD_BYTES),),
        stdin=blob(MAX_PAYLOAD_BYTES + 1),
    ),
    BadInput(
        "delivery-disagrees-with-catalogue",
        _append("build_finished", BUILD_FINISHED_JSON, "--delivery", "ephemeral"),
        ("ephemeral",),
    ),
    BadInput(
        # valid JSON syntax, but not a Unicode string: it cannot be stored as UTF-8
        "payload-lone-surrogate",
        _append("acme.thing", '{"text": "\\ud800"}'),
        ("payload",),
    ),
    BadInput("from-negative", ("log", "--from", "-1"), ("--from",)),
    BadInput("from-zero", ("log", "--from", "0"), ("--from",)),
    BadInput("from-not-a-number", ("log", "--from", "abc"), ("--from",)),
    BadInput(
        # no seq is that large (seqs are 64-bit); bad input, not a database failure
        "from-too-large",
        ("log", "--from", "99999999999999999999"),
        ("--from",),
        sqlite=True,
    ),
    BadInput("limit-zero", ("log", "--limit", "0"), ("--limit",)),
    BadInput(
        "unknown-option", _append("build_finished", BUILD_FINISHED_JSON, "--bogus"), ("--bogus",)
    ),
]


@dataclass(frozen=True, slots=True)
class BadInputRun:
    result: Result
    #: (events, log order) rows before and after the command
    before: tuple[int, int]
    after: tuple[int, int]


def _seed(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            append(conn, "build_queued", {"build_id": 7})
    finally:
        engine.dispose()


def _run_bad_inputs(
    request: pytest.FixtureRequest, backend: str, directory: Path
) -> Iterator[dict[str, BadInputRun]]:
    """The bad inputs of one backend, run concurrently, each on its own database
    holding one event."""
    cases = [case for case in BAD_INPUTS if backend == "postgresql" or case.sqlite]
    names = [case.id for case in cases]
    with seeded_databases(request, backend, names, _seed, directory) as urls:
        before = {case.id: row_counts(urls[case.id]) for case in cases}
        results = herald_many(
            [Call(case.args, urls[case.id], stdin=case.stdin) for case in cases], cwd=directory
        )
        yield {
            case.id: BadInputRun(result, before[case.id], row_counts(urls[case.id]))
            for case, result in zip(cases, results, strict=True)
        }


@pytest.fixture(scope="module")
def postgresql_bad_inputs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, BadInputRun]]:
    yield from _run_bad_inputs(request, "postgresql", tmp_path_factory.mktemp("bad-input-pg"))


@pytest.fixture(scope="module")
def sqlite_bad_inputs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, BadInputRun]]:
    yield from _run_bad_inputs(request, "sqlite", tmp_path_factory.mktemp("bad-input-sqlite"))


@pytest.mark.parametrize(
    ("backend", "case"),
    [
        pytest.param("postgresql", case, marks=pytest.mark.postgresql, id=f"postgresql-{case.id}")
        for case in BAD_INPUTS
    ]
    + [
        pytest.param("sqlite", case, marks=pytest.mark.sqlite, id=f"sqlite-{case.id}")
        for case in BAD_INPUTS
        if case.sqlite
    ],
)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(
    request: pytest.FixtureRequest, backend: str, case: BadInput
) -> None:
    runs: dict[str, BadInputRun] = request.getfixturevalue(f"{backend}_bad_inputs")
    run = runs[case.id]
    assert_one_line_error(run.result, 2, case.mentions)
    assert run.before[0] == 1, "the seeded event is missing"
    assert run.after == run.before, f"rows (events, log) changed{describe(run.result)}"


# -- configuration and --debug ------------------------------------------------------------


#: HERALD_DATABASE_URL → the exit status: 2 for a value that is wrong, 1 for a server
#: that does not answer.
BAD_URLS = {
    "mysql://x/y": 2,
    "not a url": 2,
    "postgresql://127.0.0.1:1/nothere": 1,
}


def test_a_bad_database_url_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    results = herald_many([Call(("log",), url) for url in BAD_URLS], cwd=tmp_path)
    for (url, exit_code), result in zip(BAD_URLS.items(), results, strict=True):
        assert "Traceback" not in result.stderr, f"HERALD_DATABASE_URL={url!r}{describe(result)}"
        assert_one_line_error(result, exit_code, mentions=["HERALD_DATABASE_URL"])
    assert list(tmp_path.iterdir()) == [], "herald created files for a bad URL"


def test_debug_shows_the_traceback(sqlite_url: str, tmp_path: Path) -> None:
    result = herald(sqlite_url, "--debug", *_append("buld_finished"), cwd=tmp_path)
    assert result.returncode != 0, describe(result)
    assert "Traceback (most recent call last)" in result.stderr, describe(result)
    assert "InvalidTopic" in result.stderr, describe(result)
    assert "buld_finished" in result.stderr, describe(result)
    assert row_counts(sqlite_url) == (0, 0)


def test_topics_json_lists_the_catalogue(tmp_path: Path) -> None:
    result = herald(None, "topics", "--json", cwd=tmp_path)
    assert_ok(result)
    listed = json.loads(result.stdout)
    assert isinstance(listed, list)
    by_topic = {entry["topic"]: entry for entry in listed}
    assert len(by_topic) == len(listed) == len(CATALOGUE)
    assert set(by_topic) == set(CATALOGUE)
    finished = by_topic["build_finished"]
    assert finished["delivery"] == "at_least_once"
    assert finished["fields"] == {"build_id": "integer", "dependent_ids": "integer[]"}
    assert by_topic["step_finished"]["delivery"] == "ephemeral"
    assert by_topic["cached_build_queued"]["delivery"] == "once_per_eval"
