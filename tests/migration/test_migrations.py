"""The schema built by the migrations equals the schema of the models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from herald.config import create_engine
from herald.schema import events, log_order, metadata, migrate
from tests.conftest import migrate_url


def _differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": False}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ]
)
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{request.getfixturevalue('tmp_path')}/fresh.db"
    url: str = request.getfixturevalue("pg_empty_url")
    return url


def test_migrated_schema_equals_the_models(empty_url: str) -> None:
    migrate_url(empty_url)
    assert _differences(empty_url) == []


def test_the_comparison_can_fail(empty_url: str) -> None:
    """A schema that lacks an index is reported: the check above is not vacuous."""
    migrate_url(empty_url)
    engine = create_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX ix_herald_events_topic"))
    finally:
        engine.dispose()
    assert _differences(empty_url) != []


def test_upgrade_is_idempotent_and_downgrade_reverses_it(empty_url: str) -> None:
    migrate_url(empty_url)
    migrate_url(empty_url)
    engine = create_engine(empty_url)
    try:
        with engine.connect() as conn:
            assert migrate.current_revision(conn) == migrate.head_revision()
            command.downgrade(migrate.alembic_config(conn), "base")
            conn.commit()
            assert migrate.current_revision(conn) is None
            names = set(sa.inspect(conn).get_table_names()) - {"alembic_version"}
            assert names == set()
            conn.rollback()
            migrate.upgrade(conn)
            assert migrate.current_revision(conn) == migrate.head_revision()
    finally:
        engine.dispose()
    assert _differences(empty_url) == []


@pytest.mark.postgresql
def test_postgresql_objects_exist(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            functions = set(
                conn.execute(
                    sa.text("SELECT proname FROM pg_proc WHERE proname LIKE 'herald_%'")
                ).scalars()
            )
            triggers = set(
                conn.execute(
                    sa.text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
                ).scalars()
            )
            tx_type = conn.execute(
                sa.text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'herald_events' AND column_name = 'tx'"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert {"herald_append", "herald_refuse_change"} <= functions
    assert triggers == {"herald_events_append_only", "herald_log_append_only"}
    assert tx_type == "xid8"


def test_0006_drops_the_log_key_and_keeps_the_rows(empty_url: str) -> None:
    """herald_log loses its foreign key to herald_events (SQLite copies the table to
    drop it) and keeps every row and its other constraints; the downgrade restores it."""
    engine = create_engine(empty_url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0005")
            with conn.begin():
                conn.execute(
                    events.insert(),
                    [
                        {
                            "topic": "build_queued",
                            "payload": {"build_id": i},
                            "delivery": "ephemeral",
                            "occurred_at": datetime(2026, 12, 4, tzinfo=UTC),
                        }
                        for i in range(3)
                    ],
                )
                conn.execute(log_order.insert(), [{"seq": s, "position": s} for s in (1, 2, 3)])
            assert _log_keys(conn) == ["fk_herald_log_position_herald_events"]
            migrate.upgrade(conn)
            assert _log_keys(conn) == []
            assert conn.execute(sa.select(log_order).order_by(log_order.c.seq)).all() == [
                (1, 1),
                (2, 2),
                (3, 3),
            ]
            conn.rollback()
            with pytest.raises(sa.exc.IntegrityError), conn.begin():
                conn.execute(log_order.insert().values(seq=4, position=3))  # still unique
            command.downgrade(migrate.alembic_config(conn), "0005")
            conn.commit()
            assert _log_keys(conn) == ["fk_herald_log_position_herald_events"]
            assert conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar() == 3
            conn.rollback()
    finally:
        engine.dispose()


def _log_keys(conn: sa.Connection) -> list[str | None]:
    keys = [fk["name"] for fk in sa.inspect(conn).get_foreign_keys("herald_log")]
    conn.rollback()
    return keys


def _autovacuum_options(conn: sa.Connection) -> dict[str, list[str] | None]:
    rows = conn.execute(
        sa.text(
            "SELECT relname, reloptions FROM pg_class"
            " WHERE relname IN ('herald_events', 'herald_deliveries', 'herald_log')"
        )
    ).all()
    conn.rollback()
    return {name: sorted(options) if options else None for name, options in rows}


#: The reloptions migrations 0007 and 0008 give an append-only table.
EVERY_100000 = [
    "autovacuum_vacuum_insert_scale_factor=0",
    "autovacuum_vacuum_insert_threshold=100000",
]


@pytest.mark.postgresql
def test_0007_vacuums_the_append_only_tables_every_100000_inserts(pg_empty_url: str) -> None:
    """The log and the delivery records get autovacuum's insert threshold of their own
    (100,000, no scale factor); the downgrade gives them the server's back."""
    engine = create_engine(pg_empty_url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0006")
            assert _autovacuum_options(conn) == {
                "herald_events": None,
                "herald_deliveries": None,
                "herald_log": None,
            }
            migrate.upgrade(conn, "0007")
            assert _autovacuum_options(conn) == {
                "herald_events": EVERY_100000,
                "herald_deliveries": EVERY_100000,
                "herald_log": None,
            }
            command.downgrade(migrate.alembic_config(conn), "0006")
            conn.commit()
            assert _autovacuum_options(conn) == {
                "herald_events": None,
                "herald_deliveries": None,
                "herald_log": None,
            }
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_0008_vacuums_the_order_every_100000_inserts_too(pg_empty_url: str) -> None:
    """``herald_log`` (seq → position) gets the same insert threshold as the events; the
    downgrade gives it the server's back and leaves 0007's tables as they were."""
    engine = create_engine(pg_empty_url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn, "0008")
            assert migrate.current_revision(conn) == "0008"
            assert _autovacuum_options(conn) == {
                "herald_events": EVERY_100000,
                "herald_deliveries": EVERY_100000,
                "herald_log": EVERY_100000,
            }
            command.downgrade(migrate.alembic_config(conn), "0007")
            conn.commit()
            assert _autovacuum_options(conn) == {
                "herald_events": EVERY_100000,
                "herald_deliveries": EVERY_100000,
                "herald_log": None,
            }
    finally:
        engine.dispose()
