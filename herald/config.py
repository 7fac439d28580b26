"""Configuration: the database URL and the engine herald builds from it.

One setting chooses the backend, ``HERALD_DATABASE_URL`` (an SQLAlchemy URL):

* ``sqlite:///herald.db`` (the default, a file in the working directory): the
  embedded log, no server;
* ``postgresql://user@host:5432/db``: the production log (psycopg 3 is used
  whatever driver the URL names).

A bad value, or a server that does not answer, is a one-line error that names
the setting.
"""

from __future__ import annotations

import os
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from herald.errors import ConfigError, DatabaseUnavailable

__all__ = [
    "DATABASE_URL_SETTING",
    "DEFAULT_DATABASE_URL",
    "SERVER_OPTIONS",
    "check_connection",
    "create_engine",
    "database_url",
]

DATABASE_URL_SETTING: Final = "HERALD_DATABASE_URL"
DEFAULT_DATABASE_URL: Final = "sqlite:///herald.db"

#: Server settings of every herald connection to PostgreSQL (libpq ``options``).
#:
#: No parallel workers. herald's statements are small and many: a page of the
#: log is a thousand rows through two indexes, an append a few rows, a sequencer
#: cycle the events of the last milliseconds. A Gather's workers cost more to
#: start than such a statement costs to run: with a page bounded by the head of a
#: 10,000,000-event log (100,000 seqs or more ahead of the reader), the planner
#: chose a Gather Merge of two workers at 7-19 ms a page, against 1.1-2.5 ms
#: serially. On the connection rather than around each read: the consumers read
#: on autocommit connections, where no SET LOCAL outlives its statement, and a
#: SET around each page would be two more round trips. What herald gives up is
#: parallelism in the operator's occasional queries over the whole log (audit,
#: prune), which use indexes; the build farm's own connections keep theirs, and
#: so do the workers herald does not take from them. Options given in the URL
#: come after these, so an operator can set it back.
SERVER_OPTIONS: Final = "-c max_parallel_workers_per_gather=0"


def database_url(value: str | None = None) -> URL:
    """Parse ``value`` (or ``$HERALD_DATABASE_URL``, or the default) into a URL herald can use."""
    raw = value if value is not None else os.environ.get(DATABASE_URL_SETTING)
    raw = (raw or DEFAULT_DATABASE_URL).strip()
    try:
        url = make_url(raw)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(
            DATABASE_URL_SETTING,
            f"{raw!r} is not a database URL "
            "(expected e.g. sqlite:///herald.db or postgresql://user@host:5432/db)",
        ) from exc
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.get_driver_name() not in ("psycopg", "psycopg2", "psycopg3"):
            raise ConfigError(
                DATABASE_URL_SETTING,
                f"driver {url.get_driver_name()!r} is not supported; herald uses psycopg 3 "
                "(write postgresql://...)",
            )
        url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise ConfigError(DATABASE_URL_SETTING, "names no database (postgresql://host/DB)")
    elif backend == "sqlite":
        if url.get_driver_name() not in ("pysqlite", ""):
            raise ConfigError(
                DATABASE_URL_SETTING, f"driver {url.get_driver_name()!r} is not supported"
            )
        url = url.set(drivername="sqlite")
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                DATABASE_URL_SETTING,
                "an in-memory SQLite database cannot be shared by herald's processes; "
                "name a file (sqlite:///herald.db)",
            )
    else:
        raise ConfigError(
            DATABASE_URL_SETTING,
            f"database {backend!r} is not supported; herald runs on postgresql or sqlite",
        )
    return url


def create_engine(url: URL | str | None = None, **kwargs: Any) -> sa.Engine:
    """An engine for herald's database, with the settings herald relies on.

    SQLite: WAL journal, ``synchronous=FULL`` (a commit survives a power cut),
    foreign keys on, a 30 s busy timeout, and every transaction begins with
    ``BEGIN IMMEDIATE`` so that concurrent writers queue for the write lock
    instead of failing when a read transaction tries to become a write.
    PostgreSQL: a small pool without pre-ping, a connect timeout,
    ``application_name=herald``, and :data:`SERVER_OPTIONS` (before any
    ``options`` the URL gives).
    """
    if not isinstance(url, URL):
        url = database_url(url)
    if url.get_backend_name() == "sqlite":
        connect_args: dict[str, Any] = {
            "timeout": 30.0,
            "isolation_level": None,
            "check_same_thread": False,
        }
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    given = url.query.get("options")
    options = " ".join([SERVER_OPTIONS, *([given] if isinstance(given, str) else given or ())])
    connect_args = {"connect_timeout": 5, "application_name": "herald", "options": options}
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    # No pre-ping: it is a round trip on every checkout (a quarter of a small
    # write transaction). A connection the server dropped fails its first
    # statement instead; SQLAlchemy then discards the pool's stale connections
    # and the daemon retries (tenacity). Recycling bounds a connection's age.
    kwargs.setdefault("pool_recycle", 1800)
    return sa.create_engine(url, connect_args=connect_args, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: sa.Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_connection(engine: sa.Engine) -> None:
    """Connect once; a server that does not answer is a one-line error naming the setting."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0].strip()
        shown = engine.url.render_as_string(hide_password=True)
        raise DatabaseUnavailable(
            f"{DATABASE_URL_SETTING}: cannot connect to {shown}: {reason}"
        ) from exc
