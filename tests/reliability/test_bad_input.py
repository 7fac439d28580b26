"""R6: bad input of every kind is a clear error (or ignored), and writes nothing.

* The real ``herald`` command with malformed appends, payloads, times,
  seqs, consumer names, configuration files and flags that conflict: each
  is one line on stderr, exit status 2, no traceback, and the database is
  exactly as before (events, order rows, consumers, records, operations).
* Python's ``append`` and SQL's ``herald_append`` with bad arguments:
  herald's error, nothing written.
* Garbage NOTIFY payloads on herald's own channel while a daemon runs: the
  daemon ignores them and goes on delivering.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.consumers import Consumer, Daemon
from herald.errors import UsageError
from herald.outbox import LogEntry, Sequencer, append
from herald.schema import NOTIFY_CHANNEL, consumers, deliveries, events, log_order, operations
from tests.acceptance.conftest import Call, assert_one_line_error, herald_many
from tests.integration.test_consumers import until

_TABLES = (events, log_order, consumers, deliveries, operations)

SQL_TOPIC = "build'; DROP TABLE herald_events;--"

BAD_CONFIGS = {
    "missing.toml": None,
    "syntax.toml": "[consumers.github\ntype = 'jsonl'\n",
    "unknown_type.toml": '[consumers.x]\ntype = "carrier-pigeon"\ntopics = ["*"]\n',
    "bad_duration.toml": (
        '[consumers.x]\ntype = "jsonl"\npath = "x.jsonl"\ntopics = ["*"]\ntimeout = "5 parsecs"\n'
    ),
    "sql_name.toml": f'[consumers."{SQL_TOPIC}"]\ntype = "jsonl"\npath = "x"\ntopics = ["*"]\n',
    "sql_topic.toml": f'[consumers.x]\ntype = "jsonl"\npath = "x"\ntopics = ["{SQL_TOPIC}"]\n',
    "no_topics.toml": '[consumers.x]\ntype = "jsonl"\npath = "x.jsonl"\n',
}

#: (arguments, text the one-line error must contain); every one exits 2.
CLI_CASES: list[tuple[tuple[str, ...], str]] = [
    (("append", "build_finished", "--payload", "{not json"), "not valid JSON"),
    (("append", "build_finished", "--payload", "[1, 2]"), "object"),
    (("append", "build_finishd", "--payload", "{}"), "catalogue"),
    (("append", SQL_TOPIC, "--payload", "{}"), "topic"),
    (("append", "Build_Finished", "--payload", "{}"), "topic"),
    (("append", "build_finished", "--payload", "{}"), "missing field"),
    (("append", "build_started", "--payload", '{"build_id": "x", "generation": 1}'), "build_id"),
    (("append", "acme.x", "--payload", '{"n": NaN}'), "payload"),
    (("append", "acme.x", "--delivery", "sometimes"), "delivery"),
    (("append", "build_finished", "--delivery", "ephemeral", "--payload", "{}"), ""),
    (("log", "--from", "0"), "--from"),
    (("log", "--from", "abc"), "--from"),
    (("log", "--topic", "bad topic"), "topic"),
    (("log", "--format", "xml"), "--format"),
    (("log", "--since", "the day before"), "--since"),
    (("log", "--until", "-4"), "--until"),
    (("log", "--build", "0"), "--build"),
    (("log", "--build", "424242"), "does not exist"),
    (("consumers", "reset", "nobody", "--to-latest"), "unknown consumer"),
    (("consumers", "reset", "nobody", "--to-seq", "-1"), "--to-seq"),
    (("consumers", "reset", "nobody", "--to-latest", "--to-earliest"), "exactly one"),
    (("consumers", "reset", SQL_TOPIC, "--to-latest"), "not valid"),
    (("replay", "nobody", "--from", "1"), "not configured"),
    (("replay", "nobody", "--since", "soon"), "--since"),
    (("prune", "--older-than", "0s"), "more than 0"),
    (("prune", "--older-than", "forever"), "not an age"),
    (("parked", "discard", "nobody", "1", "--reason", " "), "--reason"),
    (("parked", "redeliver", "nobody", "0"), "seq"),
    (("audit", "build", "0"), "BUILD"),
    (("audit", "build", "424242"), "does not exist"),
    (("audit", "consumer", "x;drop"), "not valid"),
    (("audit", "topics", "--since", "whenever"), "--since"),
    (("build", "show", "-1"), "-1"),
    (("message", "send", "0", "--type", "pass"), "BUILD"),
    (("message", "send", "1", "--type", "maybe"), "--type"),
    (("frobnicate",), "No such command"),
    # A listing reads the file without building handlers (the operator's machine need
    # not have a plugin installed), so an unknown type is `herald run`'s error.
    *[
        (("consumers", "--config", name), name)
        for name in BAD_CONFIGS
        if name != "unknown_type.toml"
    ],
    *[(("run", "--config", name), name) for name in ("syntax.toml", "unknown_type.toml")],
]


def _counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table.name: int(
                    conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                )
                for table in _TABLES
            }
    finally:
        engine.dispose()


@pytest.mark.acceptance
@pytest.mark.sqlite
def test_every_bad_command_line_is_one_line_exit_2_and_writes_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    assert len(CLI_CASES) >= 30
    for name, text in BAD_CONFIGS.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    engine = create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            append(conn, "acme.before", {"n": 1})
    finally:
        engine.dispose()
    before = _counts(sqlite_url)
    results = herald_many([Call(args, sqlite_url) for args, _ in CLI_CASES], cwd=tmp_path)
    unclear = []
    for (args, text), result in zip(CLI_CASES, results, strict=True):
        line = assert_one_line_error(result, 2)
        if text not in line:
            unclear.append(f"herald {' '.join(args)}: the error does not say {text!r}: {line}")
    assert unclear == []
    assert _counts(sqlite_url) == before


def test_bad_python_appends_raise_herald_errors_and_write_nothing(engine: sa.Engine) -> None:
    bad: list[tuple[Any, Any]] = [
        (None, {}),
        (42, {}),
        ("", {}),
        (SQL_TOPIC, {}),
        ("acme.x", None),
        ("acme.x", [1]),
        ("acme.x", {"n": math.nan}),
        ("acme.x", {"n": object()}),
        ("acme.x", {"big": "x" * 1_100_000}),
        ("build_finished", {"build_id": True}),
    ]
    with engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        conn.rollback()
    for topic, payload in bad:
        with pytest.raises(UsageError), engine.begin() as conn:
            append(conn, topic, payload)
    with engine.connect() as conn:
        after = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
    assert after == before


@pytest.mark.postgresql
def test_bad_sql_appends_are_refused_and_write_nothing(pg_url: str) -> None:
    calls = [
        ("SELECT herald_append(%s, %s::jsonb)", (SQL_TOPIC, "{}")),
        ("SELECT herald_append(%s, %s::jsonb)", ("build_finished", "[]")),
        ("SELECT herald_append(%s, %s::jsonb)", ("build_finished", '{"build_id": 1}')),
        ("SELECT herald_append(%s, %s::jsonb)", (None, "{}")),
        ("SELECT herald_append(%s, %s::jsonb, NULL, NULL, %s)", ("acme.x", "{}", "sometimes")),
    ]
    conninfo = sa.engine.make_url(pg_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
        for sql, params in calls:
            with pytest.raises(psycopg.Error, match="herald:"):
                conn.execute(sql, params)
            conn.rollback()
        (count,) = conn.execute("SELECT count(*) FROM herald_events").fetchone() or (None,)
    assert count == 0


@pytest.mark.postgresql
def test_garbage_notifications_on_herald_channel_are_ignored(pg_url: str) -> None:
    engine = create_engine(pg_url)
    seen: list[int] = []
    daemon = Daemon(
        engine,
        [Consumer(name="sink", topics=["acme.*"], handler=lambda e: seen.append(e.seq))],
        poll_interval=5.0,
    )
    garbage = ["", "garbage", "-1", "99999999999999999999999", "consumers'; DROP", "{}", "x" * 7000]
    try:
        with daemon:
            with engine.begin() as conn:
                append(conn, "acme.first", {"n": 0})
            until(lambda: len(seen) == 1, 10, "the first event delivered")
            with engine.connect() as conn:
                for payload in garbage:
                    conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, payload)))
                conn.commit()
            with engine.begin() as conn:
                append(conn, "acme.second", {"n": 1})
            # Delivered on the wake-up of its own cycle, well before the 5 s poll.
            until(lambda: len(seen) == 2, 4, "the event after the garbage delivered")
        with engine.connect() as conn:
            Sequencer().cycle(conn)
            ordered = conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar_one()
        assert ordered == 2
        assert sorted(seen) == [1, 2]
    finally:
        engine.dispose()


def test_a_handler_gets_what_it_was_given(engine: sa.Engine) -> None:
    """Entries reach handlers as JSON-ready objects: a consumer can always serialize them."""
    with engine.begin() as conn:
        append(conn, "acme.odd", {"quote": "'; DROP TABLE x;--", "nested": {"a": [1, None]}})
    got: list[LogEntry] = []
    daemon = Daemon(
        engine, [Consumer(name="sink", topics=["acme.*"], handler=got.append)], poll_interval=0.05
    )
    with daemon:
        until(lambda: len(got) == 1, 10, "delivered")
    assert json.loads(json.dumps(got[0].to_json()))["payload"]["quote"] == "'; DROP TABLE x;--"
