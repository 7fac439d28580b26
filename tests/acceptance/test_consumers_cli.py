"""``herald consumers`` and the configuration errors of ``herald run``, for real on PostgreSQL.

The listing is checked against the rows the daemon left in the database; a
bad configuration must be one line on stderr naming the file, the consumer
and the key, exit status 2, and nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from herald.outbox import NewEvent, append_many

from .conftest import (
    Call,
    Processes,
    assert_ok,
    assert_one_line_error,
    describe,
    herald,
    herald_many,
    wait_until,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.postgresql]

HANDLERS = """
def picky(entry):
    if entry.payload["n"] == 2:
        raise ValueError("n=2 is not welcome")
"""

CONFIG = """
[consumers.files]
type = "jsonl"
topics = ["acme.*"]
path = "files.jsonl"

[consumers.picky]
type = "python"
handler = "herald_cli_handlers:picky"
topics = ["acme.*"]
max_attempts = 1
delivery = "at_least_once"
"""

FIELDS = {
    "name",
    "type",
    "topics",
    "delivery",
    "configured",
    "offset",
    "head",
    "lag",
    "parked",
    "running",
    "run_by",
    "last_error",
    "last_error_seq",
    "last_error_at",
}


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def db(pg_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(conninfo(pg_url), autocommit=True, application_name="herald-test") as conn:
        yield conn


def scalar(db: psycopg.Connection[tuple[Any, ...]], sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


def append(database_url: str, first: int, count: int) -> None:
    with psycopg.connect(conninfo(database_url), application_name="herald-test-writer") as conn:
        append_many(conn, [NewEvent("acme.tick", {"n": n}) for n in range(first, first + count)])
        conn.commit()


def listing(database_url: str, cwd: Path) -> dict[str, dict[str, Any]]:
    result = herald(database_url, "consumers", "--json", cwd=cwd)
    assert_ok(result)
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(set(item) == FIELDS for item in items), describe(result)
    return {item["name"]: item for item in items}


@pytest.mark.slow
def test_consumers_lists_what_the_database_says_running_or_not(
    pg_url: str,
    db: psycopg.Connection[tuple[Any, ...]],
    processes: Processes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "herald_cli_handlers.py").write_text(HANDLERS, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "herald.toml").write_text(CONFIG, encoding="utf-8")  # ./herald.toml, by default
    # A consumer that ran once and is no longer configured.
    db.execute("INSERT INTO herald_consumers (name, offset_seq) VALUES ('retired', 1)")
    append(pg_url, 0, 5)

    daemon = processes.start("daemon", pg_url, "run")
    for name in ("files", "picky"):
        daemon.wait_for_stderr(f"consumer {name}: running", timeout=30)
    wait_until(
        lambda: (
            scalar(db, "SELECT min(offset_seq) FROM herald_consumers WHERE name <> 'retired'") == 5
        ),
        15,
        "both consumers caught up",
        daemon.describe,
    )
    token = scalar(db, "SELECT owner FROM herald_consumers WHERE name = 'files'")
    assert f":{daemon.proc.pid}:" in token
    assert scalar(db, "SELECT owner FROM herald_consumers WHERE name = 'picky'") == token
    parked_seq, error = db.execute("SELECT seq, error FROM herald_parked").fetchone() or (0, "")
    assert "n=2 is not welcome" in error

    running, table = herald_many(
        [
            Call(("consumers", "--json"), pg_url),
            # Wide enough not to fold the columns (rich's default without a terminal is 80).
            Call(("consumers",), pg_url, env={"COLUMNS": "200"}),
        ],
        cwd=tmp_path,
    )
    assert_ok(running)
    assert_ok(table)
    items = {item["name"]: item for item in map(json.loads, running.stdout.splitlines())}
    assert list(items) == ["files", "picky", "retired"], describe(running)
    assert all(set(item) == FIELDS for item in items.values())
    files, picky, retired = items["files"], items["picky"], items["retired"]
    assert files | {"last_error_at": None} == {
        "name": "files",
        "type": "jsonl",
        "topics": ["acme.*"],
        "delivery": "auto",
        "configured": True,
        "offset": 5,
        "head": 5,
        "lag": 0,
        "parked": 0,
        "running": True,
        "run_by": token,
        "last_error": None,
        "last_error_seq": None,
        "last_error_at": None,
    }
    assert picky["type"] == "python"
    assert picky["delivery"] == "at_least_once"
    assert (picky["offset"], picky["lag"], picky["parked"]) == (5, 0, 1)
    assert (picky["running"], picky["run_by"]) == (True, token)
    assert picky["last_error"] == error
    assert picky["last_error_seq"] == parked_seq
    assert picky["last_error_at"] is not None
    assert retired["configured"] is False
    assert (retired["type"], retired["topics"], retired["delivery"]) == (None, None, None)
    assert (retired["offset"], retired["lag"], retired["running"], retired["run_by"]) == (
        1,
        4,
        False,
        None,
    )

    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "CONSUMER",
        "TYPE",
        "OFFSET",
        "LAG",
        "PARKED",
        "RUNNING",
        "LAST",
        "ERROR",
    ], describe(table)
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert rows["files"].split() == ["files", "jsonl", "5", "0", "0", token], describe(table)
    assert rows["picky"].split()[:6] == ["picky", "python", "5", "0", "1", token]
    assert f"seq {parked_seq}: ValueError: n=2 is not welcome" in rows["picky"]
    assert rows["retired"].split() == ["retired", "(not", "configured)", "1", "4", "0", "no"]

    # Stopped: nobody runs them, the claims are released, and events committed since
    # (which no daemon has ordered yet) are lag.
    daemon.send(signal.SIGTERM)
    assert daemon.wait(10) == 0, daemon.describe()
    append(pg_url, 5, 3)
    items = listing(pg_url, tmp_path)
    for name in ("files", "picky"):
        assert (items[name]["running"], items[name]["run_by"]) == (False, None), items[name]
        assert (items[name]["offset"], items[name]["head"], items[name]["lag"]) == (5, 8, 3)
    assert items["picky"]["parked"] == 1
    assert scalar(db, "SELECT count(*) FROM herald_consumers WHERE owner IS NOT NULL") == 0


BAD_CONFIGS = {
    # the configuration; what the error must name and say
    "typo": (
        '[consumers.x]\ntype = "jsonl"\ntopics = ["acme.*"]\npath = "x"\nfsyncc = true\n',
        ["consumers.x.fsyncc", "unknown key", "fsync"],
    ),
    "duration": (
        '[consumers.y]\ntype = "jsonl"\ntopics = ["acme.*"]\npath = "y"\ntimeout = "soon"\n',
        ["consumers.y.timeout", "soon"],
    ),
    "type": (
        '[consumers.z]\ntype = "pigeon"\ntopics = ["acme.*"]\n',
        ["consumers.z.type", "pigeon"],
    ),
    "topic": (
        '[consumers.t]\ntype = "jsonl"\ntopics = ["build_finshed"]\npath = "t"\n',
        ["consumers.t.topics", "build_finshed"],
    ),
    "secret": (
        (
            '[consumers.w]\ntype = "webhook"\ntopics = ["acme.*"]\nurl = "http://127.0.0.1:9/"\n'
            'secret_env = "ACME_SURELY_UNSET_SECRET"\n'
        ),
        ["consumers.w.secret_env", "ACME_SURELY_UNSET_SECRET"],
    ),
    "handler": (
        '[consumers.p]\ntype = "python"\ntopics = ["acme.*"]\nhandler = "no_such_module:f"\n',
        ["consumers.p.handler", "no_such_module"],
    ),
    "toml": ('[consumers.x\ntype = "jsonl"\n', ["not valid TOML"]),
}


def assert_nothing_written(db: psycopg.Connection[tuple[Any, ...]]) -> None:
    for table in ("herald_consumers", "herald_deliveries", "herald_parked"):
        assert scalar(db, f"SELECT count(*) FROM {table}") == 0, table


@pytest.mark.slow
def test_a_bad_configuration_is_one_line_naming_the_file_the_consumer_and_the_key(
    pg_url: str, db: psycopg.Connection[tuple[Any, ...]], tmp_path: Path
) -> None:
    # ./herald.toml, found by default; a misspelt required key is named as written.
    (tmp_path / "herald.toml").write_text(
        '[consumers.x]\ntype = "jsonl"\ntopics = ["acme.*"]\npathh = "x"\n', encoding="utf-8"
    )
    assert_one_line_error(
        herald(pg_url, "run", cwd=tmp_path), 2, ["herald.toml", "consumers.x.pathh"]
    )

    # Each of them, named by HERALD_CONFIG; and files that are not there.
    calls, expected = [], []
    for name, (text, mentions) in BAD_CONFIGS.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "herald.toml").write_text(text, encoding="utf-8")
        path = str(directory / "herald.toml")
        calls.append(Call(("run",), pg_url, env={"HERALD_CONFIG": path}))
        expected.append([path, *mentions])
    nowhere = str(tmp_path / "nowhere" / "herald.toml")
    calls.append(Call(("run",), pg_url, env={"HERALD_CONFIG": nowhere}))
    expected.append(["HERALD_CONFIG", nowhere, "no such file"])
    calls.append(Call(("consumers",), pg_url, env={"HERALD_CONFIG": nowhere}))
    expected.append(["HERALD_CONFIG", nowhere, "no such file"])
    calls.append(Call(("run", "--config", nowhere), pg_url))
    expected.append(["--config", nowhere])
    for result, mentions in zip(herald_many(calls, cwd=tmp_path), expected, strict=True):
        line = assert_one_line_error(result, 2, mentions)
        if "HERALD_CONFIG" in mentions:
            assert "--config" not in line, "the error names an option that was not given"

    # Nothing was written: no consumer, no record, no file.
    assert_nothing_written(db)
    made = sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != "herald.toml"
    )
    assert made == sorted(BAD_CONFIGS), made


def test_run_with_a_metrics_port_in_use_is_one_line(
    pg_url: str, db: psycopg.Connection[tuple[Any, ...]], tmp_path: Path
) -> None:
    (tmp_path / "herald.toml").write_text(
        '[consumers.files]\ntype = "jsonl"\ntopics = ["acme.*"]\npath = "files.jsonl"\n',
        encoding="utf-8",
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = herald(pg_url, "run", "--metrics-port", str(port), cwd=tmp_path)
    assert_one_line_error(result, 2, ["--metrics-port", str(port)])
    assert_nothing_written(db)
    assert not os.path.exists(tmp_path / "files.jsonl")
