"""``herald db roles``, the real command: the SQL it prints, the roles it creates, its errors.

Every test uses a role prefix of its own (roles are cluster-wide) and drops
the roles, and any login made for them, at teardown. What the command did is
checked in PostgreSQL's catalogues, not in its output alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from herald.config import create_engine
from herald.outbox import NewEvent, Sequencer, append_many

from .conftest import Call, assert_ok, assert_one_line_error, describe, herald, herald_many

pytestmark = [pytest.mark.acceptance, pytest.mark.postgresql]

SUFFIXES = ("owner", "writer", "daemon", "auditor")


def _conninfo(url: str, user: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if user is not None:
        parsed = parsed.set(username=user)
    return parsed.render_as_string(hide_password=False)


def _query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of one query, run as the superuser."""
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        return conn.execute(sql, params or None).fetchall()


def _run(url: str, sql: str) -> None:
    """Run statements that return no rows, as the superuser."""
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute(sql.encode())


def _roles(url: str, prefix: str) -> dict[str, bool]:
    """The roles named ``{prefix}_...``: whether each may log in."""
    rows = _query(
        url, "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE %s", prefix + "\\_%"
    )
    return dict(rows)


@pytest.fixture
def prefix(pg_url: str) -> Iterator[str]:
    """A role prefix of this test's own; its roles are dropped afterwards."""
    name = f"hr{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(_conninfo(pg_url), autocommit=True) as conn:
        roles = [
            row[0]
            for row in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (name + "\\_%",)
            )
        ]
        for role in roles:
            # The owner owns the test database's tables: give them back first.
            conn.execute(f'REASSIGN OWNED BY "{role}" TO postgres')
            conn.execute(f'DROP OWNED BY "{role}"')
        for role in roles:
            conn.execute(f'DROP ROLE "{role}"')


def test_print_shows_the_sql_and_creates_nothing(pg_url: str, prefix: str) -> None:
    result = herald(pg_url, "db", "roles", "--print", "--prefix", prefix)
    assert_ok(result)
    sql = result.stdout
    assert sql.startswith("--"), describe(result)
    assert "BEGIN;" in sql
    assert sql.rstrip().endswith("COMMIT;"), describe(result)
    for suffix in SUFFIXES:
        assert f"CREATE ROLE {prefix}_{suffix} NOLOGIN;" in sql, describe(result)
    assert f"ALTER TABLE herald_events OWNER TO {prefix}_owner;" in sql
    assert f"GRANT SELECT, INSERT ON TABLE herald_events TO {prefix}_writer;" in sql
    assert "REVOKE ALL ON FUNCTION herald_append(" in sql
    assert _roles(pg_url, prefix) == {}
    owners = _query(pg_url, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
    assert owners == [("postgres",)]

    # What it printed is what psql would run: one script, run as it is.
    _run(pg_url, sql)
    assert _roles(pg_url, prefix) == {f"{prefix}_{suffix}": False for suffix in SUFFIXES}


def test_roles_are_created_and_granted(pg_url: str, prefix: str) -> None:
    result = herald(pg_url, "db", "roles", "--prefix", prefix)
    assert_ok(result)
    for suffix in SUFFIXES:
        assert f"{prefix}_{suffix}" in result.stdout, describe(result)
    assert f"GRANT {prefix}_writer TO hydra;" in result.stdout, describe(result)
    assert _roles(pg_url, prefix) == {f"{prefix}_{suffix}": False for suffix in SUFFIXES}

    def may(role: str, privilege: str, table: str = "herald_events") -> bool:
        [(allowed,)] = _query(
            pg_url, "SELECT has_table_privilege(%s, %s, %s)", f"{prefix}_{role}", table, privilege
        )
        return bool(allowed)

    assert may("writer", "INSERT")
    assert not may("writer", "UPDATE")
    assert not may("auditor", "INSERT")
    assert may("auditor", "SELECT", "herald_log")
    assert may("daemon", "INSERT", "herald_log")
    assert not may("daemon", "INSERT")
    [(daemon_may_append,)] = _query(
        pg_url,
        "SELECT has_function_privilege(%s, 'herald_append(text, jsonb, text, text, text, "
        "timestamptz)', 'EXECUTE')",
        f"{prefix}_daemon",
    )
    assert daemon_may_append is False

    again = herald(pg_url, "db", "roles", "--prefix", prefix)
    assert_ok(again)
    assert "updated" in again.stdout, describe(again)
    assert "created" not in again.stdout, describe(again)


def test_the_auditor_reads_the_log_and_cannot_append(pg_url: str, prefix: str) -> None:
    assert_ok(herald(pg_url, "db", "roles", "--prefix", prefix))
    login = f"{prefix}_a_login"
    _run(pg_url, f"CREATE ROLE {login} LOGIN IN ROLE {prefix}_auditor")
    auditor_url = make_url(pg_url).set(username=login).render_as_string(hide_password=False)
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            append_many(conn, [NewEvent("acme.tick", {"n": n}) for n in (1, 2)])
        with engine.connect() as conn:
            assert Sequencer().cycle(conn) == 2
        with engine.begin() as conn:
            append_many(conn, [NewEvent("acme.tick", {"n": 3})])
    finally:
        engine.dispose()

    # It may not order the third event: it reads what is ordered, without an error.
    result, refused = herald_many(
        [
            Call(("log", "--json"), auditor_url),
            Call(("append", "acme.tick", "--payload", '{"n": 4}'), auditor_url),
        ]
    )
    assert_ok(result)
    assert result.stderr == "", describe(result)
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["seq"], e["payload"]["n"]) for e in entries] == [(1, 1), (2, 2)], describe(result)
    assert_one_line_error(refused, 1, ["permission denied"])
    assert _query(pg_url, "SELECT count(*) FROM herald_events") == [(3,)]
    assert _query(pg_url, "SELECT count(*) FROM herald_log") == [(2,)]


def test_a_bad_prefix_is_one_line_and_creates_nothing(pg_url: str) -> None:
    calls = [
        Call(("db", "roles", *args), pg_url)
        for args in (("--prefix", "Bad-Name"), ("--print", "--prefix", "Bad-Name"))
    ]
    for result in herald_many(calls):
        assert_one_line_error(result, 2, ["'Bad-Name'", "lowercase letters"])
    assert _query(pg_url, "SELECT rolname FROM pg_roles WHERE rolname ILIKE 'bad%'") == []


@pytest.mark.sqlite
def test_on_sqlite_roles_are_one_line_exit_2(sqlite_url: str) -> None:
    calls = [Call(("db", "roles", *args), sqlite_url) for args in ((), ("--print",))]
    for result in herald_many(calls):
        assert_one_line_error(result, 2, ["PostgreSQL", "file permissions"])
