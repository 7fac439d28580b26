"""The operator verbs, for real: ``herald consumers reset``, ``herald replay`` and
``herald log --since/--until/--build/--eval/--jobset``, checked against the database.

Every command runs as the installed ``herald`` in a subprocess (the helpers of
``conftest.py``); what it prints is compared with the rows it read or left
behind: ``herald_consumers`` (offsets, epochs), ``herald_operations`` (the
record of resets and replays), ``herald_deliveries`` (replay records), the log
itself. Expected values are computed from the database, never only from
numbers written into the test. A daemon (``herald run``) is started where a
command must behave differently while one runs the consumer.

Independent commands run concurrently (:func:`herald_many`): one start of
herald costs about a second of CPU.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.outbox import NewEvent, Sequencer, append_many
from herald.schema import (
    builds,
    consumers,
    deliveries,
    evaluations,
    events,
    log_order,
    operations,
    parked,
)

from .conftest import (
    Call,
    HeraldProcess,
    Processes,
    Result,
    assert_ok,
    assert_one_line_error,
    describe,
    herald,
    herald_many,
    seeded_databases,
    wait_until,
)

pytestmark = [pytest.mark.acceptance]

#: Who the tests say runs the commands (``HERALD_ACTOR``): recorded in herald_operations.
ACTOR = "operator@acceptance"

RESET_KEYS = {
    "consumer",
    "old_offset",
    "new_offset",
    "head",
    "how",
    "forced",
    "run_by",
    "dry_run",
    "operation_id",
}
REPLAY_KEYS = {
    "consumer",
    "from",
    "until",
    "events",
    "delivered",
    "failed",
    "attempts",
    "interrupted",
    "resume_from",
    "seconds",
    "operation_id",
}


# -- the database, seen directly -----------------------------------------------------------


def aware(value: datetime) -> datetime:
    """SQLite gives naive datetimes back; herald stores UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LogRow:
    """One event of the log as the database has it."""

    seq: int
    position: int
    topic: str
    payload: dict[str, Any]
    delivery: str
    aggregate_id: str | None
    recorded_at: datetime


class Db:
    """The test's own view of herald's database (either backend), through SQLAlchemy."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def all(self, stmt: sa.Executable) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(stmt))

    def execute(self, stmt: sa.Executable, params: Sequence[dict[str, Any]] = ()) -> None:
        with self.engine.begin() as conn:
            if params:
                conn.execute(stmt, list(params))
            else:
                conn.execute(stmt)

    def append(self, new_events: Sequence[NewEvent]) -> None:
        """Append in one transaction and give the events their seqs (a sequencer cycle)."""
        with self.engine.begin() as conn:
            append_many(conn, new_events)
        with self.engine.connect() as conn:
            Sequencer().cycle(conn)

    def log(self) -> list[LogRow]:
        rows = self.all(
            sa.select(
                log_order.c.seq,
                events.c.position,
                events.c.topic,
                events.c.payload,
                events.c.delivery,
                events.c.aggregate_id,
                events.c.recorded_at,
            )
            .join_from(log_order, events, log_order.c.position == events.c.position)
            .order_by(log_order.c.seq)
        )
        return [
            LogRow(
                int(r.seq),
                int(r.position),
                r.topic,
                r.payload,
                r.delivery,
                r.aggregate_id,
                aware(r.recorded_at),
            )
            for r in rows
        ]

    def head(self) -> int:
        return int(self.all(sa.select(sa.func.coalesce(sa.func.max(log_order.c.seq), 0)))[0][0])

    def consumer_rows(self) -> dict[str, dict[str, Any]]:
        """Every herald_consumers row by name (offset, epoch, owner, updated_at, ...)."""
        return {r.name: dict(r._mapping) for r in self.all(sa.select(consumers))}

    def offset(self, name: str) -> int:
        row = self.consumer_rows().get(name)
        return 0 if row is None else int(row["offset_seq"])

    def operations(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self.all(sa.select(operations).order_by("id"))]

    def deliveries(self, consumer: str | None = None) -> list[dict[str, Any]]:
        stmt = sa.select(deliveries).order_by(deliveries.c.id)
        if consumer is not None:
            stmt = stmt.where(deliveries.c.consumer == consumer)
        return [dict(r._mapping) for r in self.all(stmt)]

    def parked(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self.all(sa.select(parked))]

    def insert_consumers(self, offsets: dict[str, int]) -> None:
        """Consumers that once ran (a row at ``offset``), as an earlier daemon leaves them."""
        self.execute(consumers.insert(), [{"name": n, "offset_seq": o} for n, o in offsets.items()])


@pytest.fixture
def pg(pg_url: str) -> Iterator[Db]:
    db = Db(pg_url)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def lite(sqlite_url: str) -> Iterator[Db]:
    db = Db(sqlite_url)
    try:
        yield db
    finally:
        db.close()


def ticks(count: int, first: int = 0, topic: str = "acme.tick") -> list[NewEvent]:
    """``count`` custom events (at_least_once) numbered from ``first``."""
    return [
        NewEvent(topic, {"n": n}, delivery="at_least_once") for n in range(first, first + count)
    ]


def append_in_transactions(db: Db, groups: Sequence[Sequence[NewEvent]]) -> list[list[int]]:
    """Each group in its own transaction, a little apart in time (distinct recorded_at);
    returns the seqs of each group."""
    seqs: list[list[int]] = []
    for group in groups:
        before = db.head()
        db.append(group)
        seqs.append(list(range(before + 1, db.head() + 1)))
        time.sleep(0.05)
    return seqs


def between(earlier: datetime, later: datetime) -> datetime:
    """A time strictly between two recorded times (whole microseconds)."""
    assert later - earlier >= timedelta(microseconds=2), (earlier, later)
    middle = earlier + (later - earlier) / 2
    assert earlier < middle < later
    return middle


def gap_at(times: Sequence[datetime], index: int) -> datetime:
    """A time between two of the sorted ``times``, at ``index`` or the first gap after it
    wide enough to hold one (2 microseconds)."""
    for i in range(index, len(times) - 1):
        if times[i + 1] - times[i] >= timedelta(microseconds=2):
            return between(times[i], times[i + 1])
    raise AssertionError(f"no gap in the recorded times after index {index}")


def first_seq_since(log: Sequence[LogRow], when: datetime) -> int | None:
    """The first seq recorded at or after ``when``, computed from the rows."""
    found = [row.seq for row in log if row.recorded_at >= when]
    return min(found) if found else None


def last_seq_until(log: Sequence[LogRow], when: datetime) -> int:
    found = [row.seq for row in log if row.recorded_at <= when]
    return max(found) if found else 0


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def one_json(result: Result) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, describe(result)
    value = json.loads(lines[0])
    assert isinstance(value, dict), describe(result)
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_config(directory: Path, text: str, name: str = "herald.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def start_daemon(
    processes: Processes, name: str, url: str, config: Path, consumer_names: Sequence[str]
) -> HeraldProcess:
    daemon = processes.start(name, url, "run", "--config", str(config))
    for consumer in consumer_names:
        daemon.wait_for_stderr(f"consumer {consumer}: running", timeout=30)
    return daemon


def stop_daemon(daemon: HeraldProcess) -> None:
    daemon.send(signal.SIGTERM)
    assert daemon.wait(15) == 0, daemon.describe()
    assert "Traceback" not in daemon.stderr(), daemon.describe()


def caught_up(db: Db, name: str) -> Callable[[], bool]:
    return lambda: db.offset(name) == db.head()


def listing(url: str, config: Path) -> dict[str, dict[str, Any]]:
    """``herald consumers --json`` by consumer name."""
    result = herald(url, "consumers", "--json", "--config", str(config))
    assert_ok(result)
    return {item["name"]: item for item in json_lines(result)}


# -- consumers reset: every target -----------------------------------------------------------


@pytest.mark.postgresql
def test_reset_moves_each_offset_to_its_target_and_records_it(pg: Db, tmp_path: Path) -> None:
    groups = append_in_transactions(pg, [ticks(5), ticks(5, 5), ticks(5, 10)])
    log = pg.log()
    top = pg.head()
    assert top == 15
    assert [len(g) for g in groups] == [5, 5, 5]
    at = {row.seq: row.recorded_at for row in log}
    # Between the second and third transaction, written in +02:00 (the same instant).
    t23 = between(max(at[s] for s in groups[1]), min(at[s] for s in groups[2]))
    t23_zoned = t23.astimezone(timezone(timedelta(hours=2))).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()

    def since(when: datetime) -> int:
        found = first_seq_since(log, when)
        return top if found is None else found - 1

    earliest = min(at) - 1
    # name: (offset before, arguments, expected offset, the "how" recorded)
    cases: dict[str, tuple[int | None, tuple[str, ...], int, str]] = {
        "earliest": (7, ("--to-earliest",), earliest, "--to-earliest"),
        "latest": (3, ("--to-latest",), top, "--to-latest"),
        "seq": (0, ("--to-seq", "6"), 5, "--to-seq 6"),
        "zoned": (15, ("--to-datetime", t23_zoned), since(t23), f"--to-datetime {t23_zoned}"),
        "ago": (9, ("--to-datetime", "1h"), earliest, "--to-datetime 1h"),
        "future": (4, ("--to-datetime", future), top, f"--to-datetime {future}"),
        "back": (4, ("--shift-by", "-100"), earliest, "--shift-by -100"),
        "ahead": (4, ("--shift-by", "3"), 7, "--shift-by 3"),
        "far": (4, ("--shift-by", "1000"), top, "--shift-by 1000"),
        # Configured in herald.toml, never run: no row yet.
        "fresh": (None, ("--to-seq", "3"), 2, "--to-seq 3"),
    }
    assert since(t23) == groups[2][0] - 1
    pg.insert_consumers({n: c[0] for n, c in cases.items() if c[0] is not None} | {"dry": 2})
    write_config(
        tmp_path,
        '[consumers.fresh]\ntype = "jsonl"\ntopics = ["acme.*"]\npath = "fresh.jsonl"\n',
    )
    before = pg.consumer_rows()
    env = {"HERALD_ACTOR": ACTOR}
    calls = [
        Call(("consumers", "reset", name, *args, "--json"), pg.url, env=env)
        for name, (_, args, _, _) in cases.items()
    ]
    calls.append(Call(("consumers", "reset", "dry", "--to-latest", "--dry-run", "--json"), pg.url))
    results = herald_many(calls, cwd=tmp_path)

    after = pg.consumer_rows()
    recorded = {op["consumer"]: op for op in pg.operations()}
    assert len(recorded) == len(pg.operations()) == len(cases), pg.operations()
    for (name, (old, _, new, how)), result in zip(cases.items(), results, strict=False):
        assert_ok(result)
        out = one_json(result)
        assert set(out) == RESET_KEYS, describe(result)
        assert after[name]["offset_seq"] == new, f"{name}: {after[name]}{describe(result)}"
        assert out["consumer"] == name
        assert out["old_offset"] == (old or 0), describe(result)
        assert out["new_offset"] == new, describe(result)
        assert out["head"] == top
        assert out["forced"] is False
        assert out["run_by"] is None
        assert out["dry_run"] is False
        assert out["how"] == how, describe(result)
        # Recorded: who, what, from, to; the epoch moved (a daemon takes the new offset).
        op = recorded[name]
        assert out["operation_id"] == op["id"]
        assert op["action"] == "reset"
        assert op["actor"] == ACTOR
        assert op["db_user"] == "postgres"
        assert op["detail"] == {
            "from": old or 0,
            "to": new,
            "how": out["how"],
            "forced": False,
            "run_by": None,
        }
        assert after[name]["epoch"] == (before[name]["epoch"] + 1 if name in before else 1)

    # --dry-run: says what would happen, changes nothing, records nothing.
    dry = one_json(results[-1])
    assert_ok(results[-1])
    assert dry == {
        "consumer": "dry",
        "old_offset": 2,
        "new_offset": top,
        "head": top,
        "how": "--to-latest",
        "forced": False,
        "run_by": None,
        "dry_run": True,
        "operation_id": None,
    }
    assert after["dry"] == before["dry"]
    assert "dry" not in recorded


@pytest.mark.postgresql
def test_reset_shift_by_zero_is_a_target_like_any_other(pg: Db, tmp_path: Path) -> None:
    """``--shift-by 0`` is one target given (a no-op move), not "no target".

    May fail until fixed: herald tests the targets with ``value not in (None,
    False)``, and ``0 == False``, so ``--shift-by 0`` counts as not given.
    """
    pg.append(ticks(3))
    pg.insert_consumers({"still": 2})
    result = herald(
        pg.url, "consumers", "reset", "still", "--shift-by", "0", "--json", cwd=tmp_path
    )
    assert_ok(result)
    out = one_json(result)
    assert (out["old_offset"], out["new_offset"], out["how"]) == (2, 2, "--shift-by 0")
    assert pg.offset("still") == 2


@pytest.mark.postgresql
def test_reset_refuses_bad_input_with_one_line_and_changes_nothing(pg: Db, tmp_path: Path) -> None:
    pg.append(ticks(6))
    top = pg.head()
    pg.insert_consumers({"files": 3})
    config = write_config(
        tmp_path, '[consumers.files]\ntype = "jsonl"\ntopics = ["*"]\npath = "files.jsonl"\n'
    )
    before = pg.consumer_rows()
    cases: list[tuple[tuple[str, ...], Sequence[str]]] = [
        (("ghost", "--to-earliest"), ("unknown consumer", "ghost")),
        (("files", "--to-earliest", "--to-latest"), ("exactly one",)),
        (("files",), ("exactly one",)),
        (("files", "--to-seq", "0"), ("--to-seq",)),
        (("files", "--to-seq", "-5"), ("--to-seq",)),
        (("files", "--to-seq", str(top + 2)), ("--to-seq", f"seq {top}")),
        (("files", "--to-datetime", "yesterdayish"), ("--to-datetime", "yesterdayish")),
        (("x;drop", "--to-earliest"), ("x;drop",)),
    ]
    results = herald_many(
        [Call(("consumers", "reset", *args, "--config", str(config)), pg.url) for args, _ in cases],
        cwd=tmp_path,
    )
    for (_, mentions), result in zip(cases, results, strict=True):
        assert_one_line_error(result, 2, mentions)
    assert pg.consumer_rows() == before
    assert pg.operations() == []


# -- consumers reset while a daemon runs the consumer ------------------------------------------


@pytest.mark.postgresql
@pytest.mark.slow
def test_reset_is_refused_while_a_daemon_runs_it_and_forced_redelivers_everything(
    pg: Db, processes: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "files.jsonl"
    config = write_config(
        tmp_path,
        f"""
[daemon]
poll_interval = "0.2s"

[consumers.files]
type = "jsonl"
topics = ["acme.*"]
delivery = "at_least_once"
batch_size = 7
path = "{out}"
""",
    )
    pg.append(ticks(30))
    top = pg.head()
    daemon = start_daemon(processes, "daemon", pg.url, config, ["files"])
    wait_until(caught_up(pg, "files"), 30, "the daemon delivered everything", daemon.describe)
    seen = listing(pg.url, config)["files"]
    owner = pg.consumer_rows()["files"]["owner"]
    assert (seen["running"], seen["run_by"]) == (True, owner), seen
    before = pg.consumer_rows()["files"]

    refused = herald(
        pg.url,
        "consumers",
        "reset",
        "files",
        "--to-earliest",
        "--config",
        str(config),
        cwd=tmp_path,
    )
    line = assert_one_line_error(refused, refused.returncode, ("being run", "--force"))
    assert refused.returncode != 0, describe(refused)
    assert "files" in line
    assert pg.consumer_rows()["files"] == before
    assert pg.operations() == []

    forced = herald(
        pg.url,
        "consumers",
        "reset",
        "files",
        "--to-earliest",
        "--force",
        "--json",
        "--config",
        str(config),
        env={"HERALD_ACTOR": ACTOR},
    )
    assert_ok(forced)
    result = one_json(forced)
    assert (result["old_offset"], result["new_offset"]) == (top, 0), describe(forced)
    assert (result["forced"], result["run_by"]) == (True, owner), describe(forced)
    [op] = pg.operations()
    assert op["id"] == result["operation_id"]
    assert op["action"] == "reset"
    assert op["consumer"] == "files"
    assert op["actor"] == ACTOR
    assert op["detail"] == {
        "from": top,
        "to": 0,
        "how": "--to-earliest",
        "forced": True,
        "run_by": owner,
    }

    # The running daemon takes the new offset at its next batch and delivers it all again.
    wait_until(
        lambda: pg.offset("files") == top and len(read_jsonl(out)) >= 2 * top,
        30,
        "the daemon delivered everything again after the forced reset",
        daemon.describe,
    )
    stop_daemon(daemon)
    assert "was reset" in daemon.stderr(), daemon.describe()
    assert pg.offset("files") == top

    lines = read_jsonl(out)
    written = Counter(int(line["seq"]) for line in lines)
    assert set(written) == set(range(1, top + 1))
    assert min(written.values()) >= 2, written
    records = pg.deliveries("files")
    assert {r["outcome"] for r in records} == {"delivered"}, records
    assert {r["kind"] for r in records} == {"live"}, records
    recorded = Counter(int(r["seq"]) for r in records)
    # One live `delivered` record per handler call: none lost, none recorded twice.
    assert recorded == written, (recorded, written)


GATED_HANDLER = """
import json
import pathlib
import time

DIR = pathlib.Path(__file__).resolve().parent


def gated(entry):
    # Events after seq 20 wait until the file `go` exists (the test makes it).
    while entry.seq > 20 and not (DIR / "go").exists():
        time.sleep(0.02)
    with open(DIR / "gated.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"seq": entry.seq}) + "\\n")
"""


@pytest.mark.postgresql
@pytest.mark.slow
def test_a_forced_reset_in_the_middle_of_a_batch_loses_and_doubles_no_record(
    pg: Db, processes: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon is inside a batch (its handler holds seq 21) when the forced reset
    moves the offset back: the batch's records are kept, its offset commit is not,
    and everything after the new offset is delivered again."""
    (tmp_path / "herald_operate_handlers.py").write_text(GATED_HANDLER, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the daemon's (herald_env keeps it)
    out = tmp_path / "gated.jsonl"
    config = write_config(
        tmp_path,
        """
[daemon]
poll_interval = "0.2s"

[consumers.gated]
type = "python"
handler = "herald_operate_handlers:gated"
topics = ["acme.*"]
delivery = "at_least_once"
batch_size = 5
""",
    )
    pg.append(ticks(40))
    top = pg.head()
    daemon = start_daemon(processes, "daemon", pg.url, config, ["gated"])
    wait_until(lambda: pg.offset("gated") == 20, 30, "seqs 1-20 delivered", daemon.describe)
    forced = herald(
        pg.url,
        "consumers",
        "reset",
        "gated",
        "--shift-by",
        "-15",
        "--force",
        "--json",
        cwd=tmp_path,
    )
    assert_ok(forced)
    moved = one_json(forced)
    assert (moved["old_offset"], moved["new_offset"], moved["forced"]) == (20, 5, True)
    assert pg.offset("gated") == 5
    (tmp_path / "go").touch()

    wait_until(
        lambda: pg.offset("gated") == top and len(read_jsonl(out)) >= top + 15,
        30,
        "the daemon delivered everything after the reset",
        daemon.describe,
    )
    stop_daemon(daemon)
    written = Counter(int(line["seq"]) for line in read_jsonl(out))
    assert set(written) == set(range(1, top + 1)), sorted(set(range(1, top + 1)) - set(written))
    # Handed to the handler before the reset and after the new offset: delivered again.
    assert all(written[s] >= 2 for s in range(6, 22)), written
    assert all(written[s] == 1 for s in range(1, 6)), written
    records = pg.deliveries("gated")
    assert {(r["outcome"], r["kind"]) for r in records} == {("delivered", "live")}, records
    recorded = Counter(int(r["seq"]) for r in records)
    # One live `delivered` record per handler call: none lost, none recorded twice.
    assert recorded == written, (recorded, written)


@pytest.mark.sqlite
@pytest.mark.slow
def test_reset_is_refused_on_sqlite_while_a_daemon_holds_the_lease(
    lite: Db, processes: Processes, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
[daemon]
poll_interval = "0.2s"

[consumers.files]
type = "jsonl"
topics = ["acme.*"]
path = "{tmp_path / "files.jsonl"}"
""",
    )
    lite.append(ticks(5))
    daemon = start_daemon(processes, "daemon", lite.url, config, ["files"])
    wait_until(caught_up(lite, "files"), 30, "the daemon delivered everything", daemon.describe)
    before = lite.consumer_rows()["files"]

    refused = herald(
        lite.url,
        "consumers",
        "reset",
        "files",
        "--to-earliest",
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert refused.returncode != 0, describe(refused)
    assert_one_line_error(refused, refused.returncode, ("being run", "--force"))
    after = lite.consumer_rows()["files"]
    # The daemon renews its lease meanwhile; the offset and the epoch stay.
    assert (
        (after["offset_seq"], after["epoch"])
        == (before["offset_seq"], before["epoch"])
        == (
            5,
            0,
        )
    )
    assert lite.operations() == []

    # A clean stop gives the consumer up: the same reset is accepted.
    stop_daemon(daemon)
    accepted = herald(
        lite.url, "consumers", "reset", "files", "--to-earliest", "--json", cwd=tmp_path
    )
    assert_ok(accepted)
    assert one_json(accepted)["run_by"] is None
    assert lite.offset("files") == 0
    assert [op["action"] for op in lite.operations()] == ["reset"]


# -- replay -------------------------------------------------------------------------------------

REPLAY_CONFIG = """
[consumers.files]
type = "jsonl"
topics = ["acme.*"]
path = "files.jsonl"

[consumers.again]
type = "jsonl"
topics = ["acme.*"]
path = "again.jsonl"

[consumers.tail]
type = "jsonl"
topics = ["acme.*"]
path = "tail.jsonl"
"""


@pytest.mark.postgresql
def test_replay_delivers_the_range_again_and_leaves_the_offset(pg: Db, tmp_path: Path) -> None:
    # Three transactions, each alternating acme.tick (the consumers' topic) and other.tock.
    groups = append_in_transactions(
        pg,
        [
            [
                NewEvent(
                    "acme.tick" if i % 2 == 0 else "other.tock",
                    {"n": 6 * g + i},
                    delivery="at_least_once",
                )
                for i in range(6)
            ]
            for g in range(3)
        ],
    )
    log = pg.log()
    top = pg.head()
    at = {row.seq: row.recorded_at for row in log}
    t12 = between(max(at[s] for s in groups[0]), min(at[s] for s in groups[1]))
    t23 = between(max(at[s] for s in groups[1]), min(at[s] for s in groups[2]))
    pg.insert_consumers({"files": 4})
    write_config(tmp_path, REPLAY_CONFIG)
    env = {"HERALD_ACTOR": ACTOR}
    results = herald_many(
        [
            Call(("replay", "files", "--from", "3", "--until", "14", "--json"), pg.url, env=env),
            Call(
                (
                    "replay",
                    "again",
                    "--since",
                    t12.isoformat(),
                    "--until",
                    t23.isoformat(),
                    "--json",
                ),
                pg.url,
                env=env,
            ),
            Call(("replay", "tail", "--from", "15", "--until", "999", "--json"), pg.url, env=env),
        ],
        cwd=tmp_path,
    )
    first_again = first_seq_since(log, t12)
    assert first_again is not None
    ranges = {
        "files": (3, 14),
        "again": (first_again, last_seq_until(log, t23)),
        "tail": (15, top),
    }
    assert ranges["again"] == (groups[1][0], groups[1][-1])
    operations_by_consumer = {op["consumer"]: op for op in pg.operations()}
    assert len(pg.operations()) == 3
    for (name, (first, last)), result in zip(ranges.items(), results, strict=True):
        assert_ok(result)
        out = one_json(result)
        assert set(out) == REPLAY_KEYS, describe(result)
        wanted = [r for r in log if first <= r.seq <= last and r.topic == "acme.tick"]
        assert wanted, name
        # The handler got exactly those events again, in seq order, in the log's JSON form.
        lines = read_jsonl(tmp_path / f"{name}.jsonl")
        assert [
            (line["seq"], line["position"], line["topic"], line["payload"]) for line in lines
        ] == [(r.seq, r.position, r.topic, r.payload) for r in wanted], name
        assert (out["consumer"], out["from"], out["until"]) == (name, first, last), describe(result)
        assert (out["events"], out["delivered"], out["failed"], out["attempts"]) == (
            len(wanted),
            len(wanted),
            0,
            len(wanted),
        ), describe(result)
        assert out["interrupted"] is False
        assert out["resume_from"] is None
        # One record per attempt, kind replay; recorded as an operation; offset untouched.
        records = pg.deliveries(name)
        assert [(r["seq"], r["attempt"], r["outcome"], r["kind"]) for r in records] == [
            (r.seq, 1, "delivered", "replay") for r in wanted
        ], name
        op = operations_by_consumer[name]
        assert op["id"] == out["operation_id"]
        assert op["action"] == "replay"
        assert op["actor"] == ACTOR
        assert op["detail"] == {k: v for k, v in out.items() if k != "operation_id"}
    rows = pg.consumer_rows()
    assert rows["files"]["offset_seq"] == 4
    assert rows["files"]["epoch"] == 0
    assert pg.offset("again") == 0
    assert pg.offset("tail") == 0
    assert pg.parked() == []


@pytest.mark.postgresql
def test_replay_with_a_failing_handler_records_failures_and_parks_nothing(
    pg: Db, tmp_path: Path
) -> None:
    write_config(
        tmp_path,
        """
[consumers.picky]
type = "command"
topics = ["acme.*"]
command = ["sh", "-c", 'case "$HERALD_SEQ" in 2|4|6) exit 1;; esac']
max_attempts = 3
retry_initial = "10ms"
retry_max = "20ms"
""",
    )
    pg.append([*ticks(5), NewEvent("acme.tick", {"n": 5}, delivery="ephemeral")])
    pg.insert_consumers({"picky": 1})
    log = pg.log()
    assert [r.seq for r in log] == [1, 2, 3, 4, 5, 6]
    failing = {2, 4, 6}
    budget = {r.seq: 3 if r.delivery == "at_least_once" else 1 for r in log}
    assert budget[6] == 1
    assert budget[2] == 3

    result = herald(pg.url, "replay", "picky", "--from", "1", "--json", cwd=tmp_path)
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    out = one_json(result)
    attempts = sum(budget[s] if s in failing else 1 for s in budget)
    assert (out["events"], out["delivered"], out["failed"], out["attempts"]) == (
        6,
        6 - len(failing),
        len(failing),
        attempts,
    ), describe(result)
    records = pg.deliveries("picky")
    assert len(records) == attempts == out["attempts"]
    assert {r["kind"] for r in records} == {"replay"}
    by_seq: dict[int, list[tuple[int, str]]] = {}
    for r in records:
        by_seq.setdefault(int(r["seq"]), []).append((r["attempt"], r["outcome"]))
    for seq, got in by_seq.items():
        if seq in failing:
            assert got == [(a, "failed") for a in range(1, budget[seq] + 1)], (seq, got)
        else:
            assert got == [(1, "delivered")], (seq, got)
    # The exit code is recorded with the failure.
    assert all(
        r["detail"] and r["detail"].get("exit_code") == 1
        for r in records
        if r["outcome"] == "failed"
    ), records
    assert pg.parked() == []
    assert pg.offset("picky") == 1
    [op] = pg.operations()
    assert op["action"] == "replay"
    assert op["consumer"] == "picky"
    assert op["detail"]["failed"] == len(failing)
    assert op["id"] == out["operation_id"]


@pytest.mark.postgresql
def test_replay_refuses_bad_input_with_one_line_and_delivers_nothing(
    pg: Db, tmp_path: Path
) -> None:
    pg.append(ticks(6))
    write_config(tmp_path, REPLAY_CONFIG)
    cases: list[tuple[tuple[str, ...], Sequence[str]]] = [
        (("files",), ("--from", "--since")),
        (("files", "--from", "1", "--since", "1h"), ("--from", "--since")),
        (("ghost", "--from", "1"), ("ghost", "not configured")),
        (("files", "--from", "5", "--until", "2"), ("seq 5", "seq 2")),
        (("files", "--since", "garbage"), ("--since", "garbage")),
    ]
    results = herald_many([Call(("replay", *args), pg.url) for args, _ in cases], cwd=tmp_path)
    for (_, mentions), result in zip(cases, results, strict=True):
        assert_one_line_error(result, 2, mentions)
    assert pg.deliveries() == []
    assert pg.operations() == []
    assert not (tmp_path / "files.jsonl").exists()


# -- log --since/--until/--build/--eval/--jobset --------------------------------------------------

#: An aggregate no build or evaluation has: events of it are about neither.
FOREIGN_AGGREGATE = "00000000-0000-4000-8000-0000000000aa"


@dataclass(frozen=True, slots=True)
class Farm:
    """A database filled by ``herald demo`` plus a few events that name builds in their
    payload, and what its projections say."""

    url: str
    log: list[LogRow]
    build_aggregate: dict[int, str]
    build_jobset: dict[int, int]
    eval_aggregate: dict[int, str]
    eval_jobset: dict[str, int]


def _seed_farm(url: str) -> None:
    assert_ok(herald(url, "demo", "--builds", "12", "--writers", "2"))
    db = Db(url)
    try:
        lowest = min(int(r[0]) for r in db.all(sa.select(builds.c.build_id)))
        eval_id = min(
            int(r[0]) for r in db.all(sa.select(evaluations.c.eval_id)) if r[0] is not None
        )
        db.append(
            [
                # No aggregate, names a build and an evaluation: about both.
                NewEvent("cached_build_queued", {"eval_id": eval_id, "build_id": lowest + 1}),
                # No aggregate, names a build: about it.
                NewEvent("acme.note", {"build_id": lowest}, delivery="at_least_once"),
                # Another aggregate's event naming the build: not about the build (it is
                # its own aggregate's), about the evaluation and jobset it names.
                NewEvent(
                    "acme.note",
                    {"build_id": lowest, "eval_id": eval_id, "jobset_id": 1},
                    delivery="at_least_once",
                    aggregate_id=FOREIGN_AGGREGATE,
                    aggregate_version=1,
                ),
            ]
        )
    finally:
        db.close()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ],
)
def farm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Farm]:
    directory = tmp_path_factory.mktemp(f"farm-{request.param}")
    with seeded_databases(request, request.param, ["farm"], _seed_farm, directory) as urls:
        db = Db(urls["farm"])
        try:
            build_rows = db.all(
                sa.select(builds.c.build_id, builds.c.aggregate_id, builds.c.jobset_id)
            )
            eval_rows = db.all(
                sa.select(
                    evaluations.c.eval_id, evaluations.c.aggregate_id, evaluations.c.jobset_id
                )
            )
            farm = Farm(
                url=urls["farm"],
                log=db.log(),
                build_aggregate={int(r.build_id): r.aggregate_id for r in build_rows},
                build_jobset={int(r.build_id): int(r.jobset_id) for r in build_rows},
                eval_aggregate={
                    int(r.eval_id): r.aggregate_id for r in eval_rows if r.eval_id is not None
                },
                eval_jobset={r.aggregate_id: int(r.jobset_id) for r in eval_rows},
            )
        finally:
            db.close()
        yield farm


def _names(row: LogRow, field: str, value: int) -> bool:
    found = row.payload.get(field)
    return type(found) is int and found == value


def about_build(farm: Farm, build_id: int) -> Callable[[LogRow], bool]:
    aggregate = farm.build_aggregate[build_id]
    return lambda r: (
        r.aggregate_id == aggregate or (r.aggregate_id is None and _names(r, "build_id", build_id))
    )


def about_eval(farm: Farm, eval_id: int) -> Callable[[LogRow], bool]:
    aggregate = farm.eval_aggregate[eval_id]
    return lambda r: r.aggregate_id == aggregate or _names(r, "eval_id", eval_id)


def about_jobset(farm: Farm, jobset_id: int) -> Callable[[LogRow], bool]:
    aggregates = {a for b, a in farm.build_aggregate.items() if farm.build_jobset[b] == jobset_id}
    aggregates |= {a for a, j in farm.eval_jobset.items() if j == jobset_id}
    return lambda r: r.aggregate_id in aggregates or _names(r, "jobset_id", jobset_id)


def seqs_of(result: Result) -> list[int]:
    assert_ok(result)
    return [int(line["seq"]) for line in json_lines(result)]


@pytest.mark.slow
def test_log_build_eval_and_jobset_give_exactly_their_events(farm: Farm) -> None:
    log = farm.log
    lowest = min(farm.build_aggregate)
    busiest = Counter(
        b for r in log for b, a in farm.build_aggregate.items() if r.aggregate_id == a
    ).most_common(1)[0][0]
    eval_id = min(farm.eval_aggregate)
    build_jobset = farm.build_jobset[lowest]
    other_jobsets = sorted(set(farm.eval_jobset.values()) - {build_jobset})
    assert other_jobsets, "the demo has evaluations of other jobsets"
    at = sorted({r.recorded_at for r in log})
    middle = gap_at(at, len(at) // 3)
    since_seq = first_seq_since(log, middle)
    assert since_seq is not None

    cases: list[tuple[tuple[str, ...], Callable[[LogRow], bool]]] = [
        (("--build", str(lowest)), about_build(farm, lowest)),
        (("--eval", str(eval_id)), about_eval(farm, eval_id)),
        (("--jobset", str(build_jobset)), about_jobset(farm, build_jobset)),
        (("--jobset", str(other_jobsets[0])), about_jobset(farm, other_jobsets[0])),
        (
            ("--build", str(busiest), "--since", middle.isoformat(), "--topic", "step_*"),
            lambda r: (
                about_build(farm, busiest)(r) and r.seq >= since_seq and r.topic.startswith("step_")
            ),
        ),
    ]
    results = herald_many(
        [Call(("log", "--json", *args), farm.url) for args, _ in cases]
        + [Call(("log", "--json"), farm.url)]
    )
    for (args, wanted), result in zip(cases, results, strict=False):
        expected = [r.seq for r in log if wanted(r)]
        assert expected, args
        assert seqs_of(result) == expected, f"{args}{describe(result)}"

    # The whole log, every field as the database has it.
    everything = json_lines(results[-1])
    assert [
        (e["seq"], e["position"], e["topic"], e["payload"], e["aggregate_id"], e["delivery"])
        for e in everything
    ] == [(r.seq, r.position, r.topic, r.payload, r.aggregate_id, r.delivery) for r in log]
    assert [datetime.fromisoformat(e["recorded_at"]) for e in everything] == [
        r.recorded_at for r in log
    ]
    # The extra events are where they belong (the test's own sanity).
    notes = [r for r in log if r.topic == "acme.note"]
    assert len(notes) == 2
    assert about_build(farm, lowest)(notes[0])
    assert not about_build(farm, lowest)(notes[1])
    assert about_eval(farm, eval_id)(notes[1])


@pytest.mark.slow
def test_log_since_and_until_by_time_bound_the_seqs(farm: Farm) -> None:
    log = farm.log
    top = log[-1].seq
    at = sorted({r.recorded_at for r in log})
    t1 = gap_at(at, len(at) // 4)
    t2 = gap_at(at, 2 * len(at) // 3)
    start = first_seq_since(log, t1)
    end = last_seq_until(log, t2)
    assert start is not None
    assert 1 < start < end < top
    plus2 = timezone(timedelta(hours=2))
    z = t1.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
    naive = t1.astimezone(UTC).replace(tzinfo=None).isoformat()
    zoned = t2.astimezone(plus2).isoformat()
    before_all = (at[0] - timedelta(seconds=1)).isoformat()
    cases: list[tuple[tuple[str, ...], list[int]]] = [
        (("--since", z), list(range(start, top + 1))),
        (("--until", zoned), list(range(1, end + 1))),
        (("--since", naive, "--until", str(start + 2)), list(range(start, start + 3))),
        (("--from", "5", "--until", zoned), list(range(5, end + 1))),
        (("--until", before_all), []),
    ]
    results = herald_many([Call(("log", "--json", *args), farm.url) for args, _ in cases])
    for (args, expected), result in zip(cases, results, strict=True):
        assert seqs_of(result) == expected, f"{args}{describe(result)}"


@pytest.mark.postgresql
def test_log_refuses_bad_input_with_one_line(pg: Db) -> None:
    pg.append(ticks(3))
    cases: list[tuple[tuple[str, ...], Sequence[str]]] = [
        (("--build", "0"), ("--build",)),
        (("--build", "99999999"), ("build 99999999 does not exist",)),
        (("--since", "garbage"), ("--since", "garbage")),
        (("--from", "3", "--since", "1h"), ("--from", "--since")),
        (("--until", "5", "--follow"), ("--until", "--follow")),
    ]
    results = herald_many([Call(("log", *args), pg.url) for args, _ in cases])
    for (_, mentions), result in zip(cases, results, strict=True):
        assert_one_line_error(result, 2, mentions)
