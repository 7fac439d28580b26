"""R7: a database that refuses writes (a full disk, a read-only database) during appends.

The caller's transaction must fail cleanly with herald's error, leave nothing
half-written (not one of its events, not one order row), and the log must
take appends again once the database does.

* SQLite, full: ``PRAGMA max_page_count`` caps the file at its current size
  plus a little, so a large batch hits SQLITE_FULL ("database or disk is
  full") part-way through its inserts, the way a full disk does.
* SQLite, read-only: the file opened with ``mode=ro``.
* PostgreSQL, read-only: ``default_transaction_read_only`` set on the
  database (what a failover to a standby, or an operator, does).
"""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.errors import DatabaseError, TransientDatabaseError
from herald.outbox import NewEvent, append, append_many
from herald.schema import events, log_order

pytestmark = pytest.mark.slow


def _counts(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        n_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        n_log = conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar_one()
        conn.rollback()
    return int(n_events), int(n_log)


def _batch(n: int, size: int) -> list[NewEvent]:
    return [NewEvent("acme.blob", {"n": i, "pad": "x" * size}) for i in range(n)]


@pytest.mark.sqlite
def test_a_full_sqlite_file_fails_the_transaction_and_keeps_nothing_of_it(
    sqlite_url: str,
) -> None:
    engine = create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            append_many(conn, _batch(20, 100))
        before = _counts(engine)

        @sa.event.listens_for(engine, "connect")
        def cap(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            pages = cursor.execute("PRAGMA page_count").fetchone()[0]
            cursor.execute(f"PRAGMA max_page_count = {int(pages) + 8}")
            cursor.close()

        engine.dispose()  # new connections get the cap
        with pytest.raises(DatabaseError) as caught, engine.begin() as conn:
            # 2,000 events of 2 KB: far more than 8 pages; the first ones fit.
            append_many(conn, _batch(2000, 2000))
        assert not isinstance(caught.value, TransientDatabaseError), "a full disk is no blip"
        assert "full" in str(caught.value)
        assert _counts(engine) == before, "part of the failed transaction was kept"

        sa.event.remove(engine, "connect", cap)
        engine.dispose()
        with engine.begin() as conn:
            position = append(conn, "acme.after", {"n": 1})
        assert _counts(engine) == (before[0] + 1, before[1] + 1)
        with engine.connect() as conn:
            seqs = conn.execute(
                sa.select(log_order.c.seq).where(log_order.c.position == position)
            ).scalars()
            assert list(seqs) == [before[1] + 1], "the log's seqs are not dense after the failure"
    finally:
        engine.dispose()


@pytest.mark.sqlite
def test_a_read_only_sqlite_file_refuses_the_append_cleanly(sqlite_url: str) -> None:
    writer = create_engine(sqlite_url)
    with writer.begin() as conn:
        append(conn, "acme.before", {"n": 0})
    before = _counts(writer)
    writer.dispose()
    path = sqlite_url.removeprefix("sqlite:///")
    reader = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(DatabaseError, match="refused the write"), reader.begin() as conn:
            append(conn, "acme.refused", {"n": 1})
    finally:
        reader.dispose()
    writer = create_engine(sqlite_url)
    try:
        assert _counts(writer) == before
    finally:
        writer.dispose()


def _set_read_only(pg_url: str, on: bool) -> None:
    """ALTER DATABASE from another database (a read-only one refuses it from inside)."""
    url = sa.engine.make_url(pg_url)
    admin = url.set(database="postgres", drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(
            f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = '
            f"{'on' if on else 'off'}"
        )


@pytest.mark.postgresql
def test_a_read_only_postgresql_database_refuses_the_append_cleanly(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            append(conn, "acme.before", {"n": 0})
        before = _counts(engine)
        _set_read_only(pg_url, True)
        engine.dispose()
        with pytest.raises(DatabaseError, match="read-only"), engine.begin() as conn:
            append_many(conn, _batch(50, 100))
        assert _counts(engine) == before

        _set_read_only(pg_url, False)
        engine.dispose()
        with engine.begin() as conn:
            append(conn, "acme.after", {"n": 1})
        assert _counts(engine)[0] == before[0] + 1
    finally:
        engine.dispose()
