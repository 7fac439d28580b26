"""Fixtures: real databases for every test that needs one.

PostgreSQL: ``HERALD_TEST_DATABASE_URL`` (default: the local server). A
template database is migrated once per session; every test gets its own
database cloned from it (``CREATE DATABASE ... TEMPLATE``), so tests never
see each other's rows. If the server does not answer, the tests that need it
fail with the reason (``make test`` starts the local server first); they are
never skipped.

SQLite: every test gets its own file, copied from a migrated template.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from herald.config import create_engine
from herald.outbox import sync_catalogue
from herald.schema import migrate

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFIX = f"herald_test_{os.getpid()}"


def _admin_url() -> URL:
    return make_url(os.environ.get("HERALD_TEST_DATABASE_URL", DEFAULT_ADMIN_URL))


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(_conninfo(_admin_url()), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL does not answer at HERALD_TEST_DATABASE_URL "
            f"({_admin_url().render_as_string()}): {exc}; `make test` starts the local server",
            pytrace=False,
        )


def migrate_url(url: URL | str) -> None:
    """Bring the database at ``url`` to the newest schema, as `herald db upgrade` does."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn)
            with conn.begin():
                sync_catalogue(conn)
    finally:
        engine.dispose()


def _drop_orphans(admin: psycopg.Connection) -> None:
    """Drop the databases of test runs whose process is gone (a run killed midway)."""
    names = admin.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'herald\\_test\\_%'"
    ).fetchall()
    for (datname,) in names:
        pid = datname.split("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            admin.execute(f'DROP DATABASE IF EXISTS "{datname}" WITH (FORCE)')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database to clone (its name)."""
    name = f"{PREFIX}_template"
    with _admin() as admin:
        _drop_orphans(admin)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    migrate_url(_admin_url().set(database=name))
    yield name
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scratch_database(template: str | None = None) -> Iterator[str]:
    """A new database (a copy of ``template``, or empty) for one test, dropped after it."""
    name = f"{PREFIX}_{uuid.uuid4().hex[:10]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"{clause}')
    yield _admin_url().set(database=name).render_as_string(hide_password=False)
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test (its URL)."""
    yield from _scratch_database(pg_template)


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """An empty PostgreSQL database (no schema) for one test."""
    yield from _scratch_database()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "herald.db"
    migrate_url(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh, migrated SQLite file for one test (its URL)."""
    path = tmp_path / "herald.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database of each backend in turn."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()
