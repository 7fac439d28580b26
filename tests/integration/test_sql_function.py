"""PostgreSQL-only objects: herald_append for non-Python writers, and the append-only log."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herald.domain import CATALOGUE, validate_event
from herald.errors import AppendOnlyViolation, HeraldError, InvalidPayload
from herald.outbox import append
from herald.schema.dberrors import translate, translated
from tests.integration.helpers import count_events, read_all

pytestmark = pytest.mark.postgresql

SQL_APPEND = sa.text("SELECT herald_append(:topic, CAST(:payload AS jsonb))")


def test_sql_append_in_the_writers_own_transaction(pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE builds (id int PRIMARY KEY, status int)"))
        conn.execute(sa.text("INSERT INTO builds VALUES (42, NULL)"))
    with pg_engine.begin() as conn:
        conn.execute(sa.text("UPDATE builds SET status = 0 WHERE id = 42"))
        position = conn.execute(
            SQL_APPEND,
            {"topic": "build_finished", "payload": '{"build_id": 42, "dependent_ids": [7]}'},
        ).scalar_one()
    with pytest.raises(RuntimeError), pg_engine.begin() as conn:
        conn.execute(SQL_APPEND, {"topic": "build_started", "payload": '{"build_id": 43}'})
        raise RuntimeError("the writer rolls back")
    (entry,) = read_all(pg_engine)
    assert entry.position == position
    assert entry.payload == {"build_id": 42, "dependent_ids": [7]}
    assert entry.delivery == "at_least_once"


def test_sql_append_options_and_dedupe(pg_engine: sa.Engine) -> None:
    stmt = sa.text(
        "SELECT herald_append(:topic, CAST(:payload AS jsonb), p_dedupe_key => :key, "
        "p_trace_id => 'tr', p_delivery => :delivery)"
    )
    with pg_engine.begin() as conn:
        first = conn.execute(
            stmt, {"topic": "acme.deploy", "payload": "{}", "key": "d1", "delivery": "ephemeral"}
        ).scalar_one()
        again = conn.execute(
            stmt, {"topic": "acme.deploy", "payload": "{}", "key": "d1", "delivery": None}
        ).scalar_one()
        cached = {"topic": "cached_build_queued", "payload": '{"eval_id": 1, "build_id": 2}'}
        c1 = conn.execute(SQL_APPEND, cached).scalar_one()
        c2 = conn.execute(SQL_APPEND, cached).scalar_one()
    assert first == again
    assert c1 == c2
    entries = read_all(pg_engine)
    assert [(e.topic, e.delivery, e.trace_id) for e in entries] == [
        ("acme.deploy", "ephemeral", "tr"),
        ("cached_build_queued", "once_per_eval", None),
    ]
    # The SQL function and Python compute the same once_per_eval key.
    with pg_engine.begin() as conn:
        python = append(conn, "cached_build_queued", {"eval_id": 1, "build_id": 2})
    assert python == c1


def _sql_verdict(conn: sa.Connection, topic: str, payload: Any) -> str | None:
    """None if herald_append accepts, else its error message."""
    savepoint = conn.begin_nested()
    try:
        conn.execute(SQL_APPEND, {"topic": topic, "payload": json.dumps(payload)})
    except sa_exc.DBAPIError as exc:
        savepoint.rollback()
        return str(translate(exc))
    savepoint.rollback()
    return None


def _python_verdict(topic: str, payload: Any) -> str | None:
    try:
        validate_event(topic, payload)
    except HeraldError as exc:
        return str(exc)
    return None


topics = st.sampled_from([*CATALOGUE, "acme.x", "buld_finished", "Build", "a..b", "x" * 101])
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.text(max_size=5),
    st.lists(st.integers(0, 100), max_size=3),
    st.lists(st.text(max_size=2), max_size=2),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
)
field_names = st.sampled_from(
    [
        "build_id",
        "dependent_ids",
        "trace_id",
        "jobset_id",
        "eval_id",
        "step_nr",
        "log_path",
        "previous_eval_id",
        "priority",
        "type",
        "other",
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(topic=topics, payload=st.one_of(st.dictionaries(field_names, values, max_size=4), values))
def test_sql_and_python_validate_alike(pg_engine: sa.Engine, topic: str, payload: Any) -> None:
    """The same catalogue, enforced twice: both accept, or both refuse."""
    with pg_engine.connect() as conn:
        sql = _sql_verdict(conn, topic, payload)
        conn.rollback()
    python = _python_verdict(topic, payload)
    assert (sql is None) == (python is None), f"SQL: {sql!r}; Python: {python!r}"


def test_sql_refuses_oversized_payloads(pg_engine: sa.Engine) -> None:
    big = json.dumps({"s": "x" * (1024 * 1024)})
    with (
        pytest.raises(InvalidPayload, match="more than the limit"),
        pg_engine.begin() as conn,
        translated(),
    ):
        conn.execute(SQL_APPEND, {"topic": "acme.big", "payload": big})
    assert count_events(pg_engine) == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE herald_events SET topic = 'acme.rewritten'",
        "DELETE FROM herald_events",
        "TRUNCATE herald_events CASCADE",
        "UPDATE herald_log SET seq = seq + 100",
        "DELETE FROM herald_log",
        "TRUNCATE herald_log",
    ],
)
def test_the_log_is_append_only_even_for_its_owner(pg_engine: sa.Engine, statement: str) -> None:
    with pg_engine.begin() as conn:
        append(conn, "build_started", {"build_id": 1})
    before = read_all(pg_engine)
    with pg_engine.connect() as conn:
        owner = conn.execute(
            sa.text(
                "SELECT tableowner = current_user FROM pg_tables WHERE tablename = 'herald_events'"
            )
        ).scalar_one()
        assert owner, "the test must run as the tables' owner to prove the point"
        conn.rollback()
        with pytest.raises(AppendOnlyViolation, match="append-only"), translated():
            conn.execute(sa.text(statement))
        conn.rollback()
    assert read_all(pg_engine) == before
