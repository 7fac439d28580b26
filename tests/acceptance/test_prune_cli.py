"""``herald prune``, for real on PostgreSQL: what it deletes, what holds it back.

A daemon (``herald run``) delivers the log to its consumers first, as on a
farm; then ``herald prune`` runs as a subprocess and its JSON is checked
against the rows of ``herald_log``, ``herald_events`` and
``herald_deliveries`` before and after, and against the ``herald_operations``
row it leaves. What should go is computed from the database by the rules of
``herald/outbox/retention.py`` (age, consumer offsets, parked events, whole
aggregates), independently of herald's own SQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from .conftest import (
    Call,
    Processes,
    Result,
    assert_ok,
    assert_one_line_error,
    describe,
    herald,
    herald_many,
    wait_until,
)
from .test_operate_cli import (
    ACTOR,
    Db,
    LogRow,
    caught_up,
    first_seq_since,
    json_lines,
    one_json,
    start_daemon,
    stop_daemon,
    ticks,
    write_config,
)

pytestmark = [pytest.mark.acceptance]

PRUNE_KEYS = {
    "older_than_seconds",
    "cutoff",
    "dry_run",
    "first_seq",
    "last_seq",
    "events",
    "deliveries",
    "kept",
    "limited_by",
    "operation_id",
}


@pytest.fixture
def pg(pg_url: str) -> Iterator[Db]:
    db = Db(pg_url)
    try:
        yield db
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class State:
    """What a prune may touch, as the database has it."""

    log: list[LogRow]
    #: (id, seq) of every delivery record
    records: list[tuple[int, int]]
    offsets: dict[str, int]
    parked: list[int]

    @staticmethod
    def of(db: Db) -> State:
        return State(
            log=db.log(),
            records=[(int(r["id"]), int(r["seq"])) for r in db.deliveries()],
            offsets={n: int(r["offset_seq"]) for n, r in db.consumer_rows().items()},
            parked=sorted(int(p["seq"]) for p in db.parked()),
        )


@dataclass(frozen=True, slots=True)
class Expected:
    bound: int
    doomed: list[int]
    kept: int
    deliveries: int


def expected_prune(state: State, cutoff: datetime, configured: Sequence[str] = ()) -> Expected:
    """What a prune with ``cutoff`` deletes, by the documented rules."""
    log = state.log
    limits = [log[-1].seq if log else 0]
    young = first_seq_since(log, cutoff)
    if young is not None:
        limits.append(young - 1)
    offsets = dict.fromkeys(configured, 0) | state.offsets
    if offsets:
        limits.append(min(offsets.values()))
    if state.parked:
        limits.append(state.parked[0] - 1)
    bound = min(limits)
    newest_of: dict[str, int] = {}
    for row in log:
        if row.aggregate_id is not None:
            newest_of[row.aggregate_id] = max(newest_of.get(row.aggregate_id, 0), row.seq)
    old = [row for row in log if row.seq <= bound]
    doomed = [r.seq for r in old if r.aggregate_id is None or newest_of[r.aggregate_id] <= bound]
    deliveries = sum(1 for _, seq in state.records if seq in set(doomed))
    return Expected(bound, doomed, len(old) - len(doomed), deliveries)


def check_result(out: dict[str, Any], before: State, expected: Expected, dry_run: bool) -> None:
    assert set(out) == PRUNE_KEYS, out
    assert out["dry_run"] is dry_run
    assert (out["events"], out["deliveries"], out["kept"]) == (
        len(expected.doomed),
        expected.deliveries,
        expected.kept,
    ), (out, expected)
    if expected.bound >= before.log[0].seq:
        assert (out["first_seq"], out["last_seq"]) == (before.log[0].seq, expected.bound), out
    else:
        assert (out["first_seq"], out["last_seq"]) == (None, None), out


def check_pruned(db: Db, before: State, doomed: Sequence[int]) -> None:
    """The rows left are exactly those before less the doomed seqs' (and their records)."""
    gone = set(doomed)
    after = State.of(db)
    assert [r.seq for r in after.log] == [r.seq for r in before.log if r.seq not in gone]
    assert after.log == [r for r in before.log if r.seq not in gone]
    assert after.records == [(i, s) for i, s in before.records if s not in gone]
    # No event row is left without its log row, nor the other way round.
    with psycopg.connect(conninfo(db.url)) as conn:
        positions = {int(p) for (p,) in conn.execute("SELECT position FROM herald_events")}
    assert positions == {r.position for r in after.log}


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def age_after(moment: datetime, margin: float = 0.3) -> str:
    """An --older-than that puts the cutoff just after ``moment`` (as of now; the command
    starts a little later, which moves the cutoff a little further)."""
    seconds = (datetime.now(UTC) - moment).total_seconds() - margin
    assert seconds > 0.5, seconds
    return f"{seconds:.3f}s"


def prune(db: Db, config: Path, *args: str) -> tuple[Result, dict[str, Any]]:
    result = herald(
        db.url,
        "prune",
        "--json",
        "--config",
        str(config),
        *args,
        env={"HERALD_ACTOR": ACTOR},
        cwd=config.parent,
    )
    assert_ok(result)
    return result, one_json(result)


@pytest.mark.postgresql
@pytest.mark.slow
def test_prune_deletes_what_every_consumer_finished_and_nothing_younger(
    pg: Db, processes: Processes, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
[daemon]
poll_interval = "0.2s"

[consumers.files]
type = "jsonl"
topics = ["*"]
delivery = "at_least_once"
path = "{tmp_path / "files.jsonl"}"
""",
    )
    daemon = start_daemon(processes, "daemon", pg.url, config, ["files"])
    # Old: a small farm day (builds and evaluations: aggregates) and custom events.
    assert_ok(herald(pg.url, "demo", "--builds", "3", "--writers", "1", cwd=tmp_path))
    pg.append(ticks(5))
    wait_until(caught_up(pg, "files"), 30, "the daemon delivered the old events", daemon.describe)
    old = pg.log()
    last_old = max(r.recorded_at for r in old)
    build_id = min(int(r.payload["build_id"]) for r in old if r.topic == "build_queued")

    # Bad input first (while the old events age): one line, exit 2, nothing changed.
    unchanged = State.of(pg)
    bad = herald_many(
        [
            Call(("prune", "--older-than", "0s"), pg.url),
            Call(("prune", "--older-than", "5y"), pg.url),
            Call(("prune",), pg.url),
            Call(("prune", "--older-than", "soon"), pg.url),
        ],
        cwd=tmp_path,
    )
    for result, mentions in zip(
        bad,
        [("--older-than", "0s"), ("--older-than", "5y"), ("--older-than",), ("soon",)],
        strict=True,
    ):
        assert_one_line_error(result, 2, mentions)
    assert State.of(pg) == unchanged
    assert pg.operations() == []
    time.sleep(max(0.0, 3.5 - (datetime.now(UTC) - last_old).total_seconds()))

    # Young: a message to an old build (its whole history must stay) and custom events.
    assert_ok(herald(pg.url, "message", "send", str(build_id), "--type", "work", cwd=tmp_path))
    pg.append(ticks(3, 100))
    wait_until(caught_up(pg, "files"), 30, "the daemon delivered the young events", daemon.describe)
    before = State.of(pg)
    young = [r.seq for r in before.log if r.recorded_at > last_old]
    assert young, "no young events"

    # --dry-run: the numbers, and nothing deleted or recorded.
    _, dry = prune(pg, config, "--older-than", age_after(last_old), "--dry-run")
    expected = expected_prune(before, datetime.fromisoformat(dry["cutoff"]))
    check_result(dry, before, expected, dry_run=True)
    assert dry["operation_id"] is None
    assert State.of(pg) == before
    assert pg.operations() == []

    result, out = prune(pg, config, "--older-than", age_after(last_old))
    expected = expected_prune(before, datetime.fromisoformat(out["cutoff"]))
    check_result(out, before, expected, dry_run=False)
    # The test means something: the age held it back, old events went, one build's
    # old events stayed with its young message, and nothing young went.
    assert len(out["limited_by"]) == 1, describe(result)
    assert out["limited_by"][0].startswith("age"), describe(result)
    assert out["events"] > 0, describe(result)
    assert out["kept"] > 0, describe(result)
    assert out["deliveries"] > 0, describe(result)
    assert expected.bound < min(young), (expected, young)
    assert (dry["events"], dry["deliveries"], dry["kept"]) == (
        out["events"],
        out["deliveries"],
        out["kept"],
    )
    check_pruned(pg, before, expected.doomed)
    [op] = pg.operations()
    assert op["id"] == out["operation_id"]
    assert (op["action"], op["consumer"], op["actor"]) == ("prune", None, ACTOR)
    assert op["db_user"] == "postgres"
    assert op["detail"] == {**out, "operation_id": None}

    stop_daemon(daemon)
    remaining = [r.seq for r in State.of(pg).log]
    assert min(remaining) > 1
    checked, logged, earliest, too_early = herald_many(
        [
            Call(("projections", "check"), pg.url),
            Call(("log", "--json"), pg.url),
            Call(("consumers", "reset", "files", "--to-earliest", "--dry-run", "--json"), pg.url),
            Call(("consumers", "reset", "files", "--to-seq", "1"), pg.url),
        ],
        cwd=tmp_path,
    )
    assert_ok(checked)
    assert "match" in checked.stdout, describe(checked)
    assert [int(e["seq"]) for e in json_lines(logged)] == remaining, describe(logged)
    assert_ok(earliest)
    assert one_json(earliest)["new_offset"] == min(remaining) - 1, describe(earliest)
    assert_one_line_error(too_early, 2, ("pruned",))

    # The append-only trigger still refuses a direct DELETE (no prune in progress).
    for table in ("herald_events", "herald_log"):
        with psycopg.connect(conninfo(pg.url)) as conn, pytest.raises(psycopg.Error) as refused:
            conn.execute(f"DELETE FROM {table}")
        assert "append-only" in str(refused.value), refused.value
    assert [r.seq for r in State.of(pg).log] == remaining


@pytest.mark.postgresql
@pytest.mark.slow
def test_prune_is_held_back_by_a_consumer_behind_a_parked_event_and_a_new_consumer(
    pg: Db, processes: Processes, tmp_path: Path
) -> None:
    consumers = f"""
[daemon]
poll_interval = "0.2s"

[consumers.all]
type = "jsonl"
topics = ["acme.*"]
path = "{tmp_path / "all.jsonl"}"

[consumers.picky]
type = "command"
topics = ["acme.*"]
command = ["sh", "-c", 'case "$HERALD_SEQ" in 6) exit 1;; esac']
max_attempts = 1

[consumers.slow]
type = "jsonl"
topics = ["acme.*"]
path = "{tmp_path / "slow.jsonl"}"
"""
    config = write_config(tmp_path, consumers)
    # The same consumers and one that has never run.
    with_newbie = write_config(
        tmp_path,
        consumers + f'\n[consumers.newbie]\ntype = "jsonl"\ntopics = ["*"]\n'
        f'path = "{tmp_path / "newbie.jsonl"}"\n',
        "with-newbie.toml",
    )
    pg.append(ticks(12))
    top = pg.head()
    daemon = start_daemon(processes, "daemon", pg.url, config, ["all", "picky", "slow"])
    wait_until(
        lambda: all(pg.offset(n) == top for n in ("all", "picky", "slow")),
        30,
        "every consumer finished the log",
        daemon.describe,
    )
    stop_daemon(daemon)
    [parked] = pg.parked()
    assert (parked["consumer"], parked["seq"]) == ("picky", 6)

    moved = herald(pg.url, "consumers", "reset", "slow", "--to-seq", "4", cwd=tmp_path)
    assert_ok(moved)
    assert pg.offset("slow") == 3
    newest = max(r.recorded_at for r in pg.log())
    time.sleep(max(0.0, 1.3 - (datetime.now(UTC) - newest).total_seconds()))

    before = State.of(pg)
    behind, never_ran = herald_many(
        [
            Call(
                ("prune", "--older-than", "1s", "--dry-run", "--json", "--config", str(config)),
                pg.url,
            ),
            Call(
                (
                    "prune",
                    "--older-than",
                    "1s",
                    "--dry-run",
                    "--json",
                    "--config",
                    str(with_newbie),
                ),
                pg.url,
            ),
        ],
        cwd=tmp_path,
    )
    assert_ok(behind)
    out = one_json(behind)
    check_result(out, before, expected_prune(before, datetime.fromisoformat(out["cutoff"])), True)
    assert out["limited_by"] == ["consumer slow (offset 3)"], describe(behind)
    assert out["last_seq"] == 3

    assert_ok(never_ran)
    out = one_json(never_ran)
    expected = expected_prune(before, datetime.fromisoformat(out["cutoff"]), ["newbie"])
    check_result(out, before, expected, True)
    assert out["limited_by"] == ["consumer newbie (offset 0)"], describe(never_ran)
    assert (out["events"], out["first_seq"]) == (0, None), describe(never_ran)
    assert State.of(pg) == before

    # Slow catches up (a reset to the head): now the parked event holds it back.
    assert_ok(herald(pg.url, "consumers", "reset", "slow", "--to-latest", cwd=tmp_path))
    before = State.of(pg)
    result, out = prune(pg, config, "--older-than", "1s")
    expected = expected_prune(before, datetime.fromisoformat(out["cutoff"]))
    check_result(out, before, expected, dry_run=False)
    assert out["limited_by"] == ["parked (seq 6 for picky)"], describe(result)
    assert expected.doomed == [1, 2, 3, 4, 5]
    check_pruned(pg, before, expected.doomed)
    assert pg.parked() == [parked]
    assert [op["action"] for op in pg.operations()] == ["reset", "reset", "prune"]


def test_a_prune_up_to_the_head_never_lets_a_seq_be_used_again(db_url: str, tmp_path: Path) -> None:
    """Seqs are never reused: a prune keeps the newest event, so the head never goes
    back, the next event gets the seq after it, and a consumer at the head reads it;
    a reset --to-latest after the prune stays at the head.
    """
    db = Db(db_url)
    try:
        db.append(ticks(5))
        old_head = db.head()
        db.insert_consumers({"files": old_head})
        config = write_config(
            tmp_path, '[consumers.files]\ntype = "jsonl"\ntopics = ["*"]\npath = "f.jsonl"\n'
        )
        newest = max(r.recorded_at for r in db.log())
        time.sleep(max(0.0, 1.2 - (datetime.now(UTC) - newest).total_seconds()))
        result, out = prune(db, config, "--older-than", "1s")
        assert (out["events"], out["last_seq"]) == (old_head - 1, old_head - 1), describe(result)
        assert [r.seq for r in db.log()] == [old_head]
        assert out["limited_by"] == [f"the newest event (seq {old_head}) always stays"]
        latest = herald(
            db_url,
            "consumers",
            "reset",
            "files",
            "--to-latest",
            "--dry-run",
            "--json",
            cwd=tmp_path,
        )

        db.append(ticks(1, 100))
        logged, listed = herald_many(
            [Call(("log", "--json"), db_url), Call(("consumers", "--json"), db_url)],
            cwd=tmp_path,
        )
        kept, entry = json_lines(logged)
        assert kept["seq"] == old_head
        assert entry["payload"] == {"n": 100}
        assert entry["seq"] == old_head + 1, f"a seq was used again{describe(logged)}"
        [files] = [c for c in json_lines(listed) if c["name"] == "files"]
        assert (files["offset"], files["head"], files["lag"]) == (old_head, old_head + 1, 1)

        assert_ok(latest)
        moved = one_json(latest)
        assert (moved["head"], moved["new_offset"]) == (old_head, old_head), describe(latest)
    finally:
        db.close()
