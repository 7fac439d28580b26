"""Driver errors, translated once into herald's error tree.

Everything that touches the database goes through :func:`translated`; its
callers see :mod:`herald.errors` only. Transient errors (the server went
away, the connection broke) become :class:`TransientDatabaseError`, the only
kind worth a retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from psycopg.pq import PipelineStatus

from herald.errors import (
    AppendOnlyViolation,
    DatabaseError,
    HeraldError,
    InvalidPayload,
    NotMigrated,
    TransientDatabaseError,
)

__all__ = ["sqlstate", "translate", "translated"]

#: SQLSTATE raised by herald's append-only trigger
APPEND_ONLY_SQLSTATE: Final = "HE001"
_UNDEFINED_TABLE: Final = "42P01"
_UNDEFINED_FUNCTION: Final = "42883"
_INVALID_PARAMETER: Final = "22023"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, if it has one (psycopg)."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def translate(exc: sa_exc.SQLAlchemyError | psycopg.Error) -> HeraldError:
    """The herald error for a SQLAlchemy or psycopg error."""
    state = sqlstate(exc)
    message = _first_line(exc)
    if state == APPEND_ONLY_SQLSTATE:
        return AppendOnlyViolation(message.removeprefix("herald: "))
    if state in (_UNDEFINED_TABLE, _UNDEFINED_FUNCTION) or "no such table: herald_" in message:
        return NotMigrated()
    if state == _INVALID_PARAMETER and message.startswith("herald: "):
        return InvalidPayload("herald_append", message.removeprefix("herald: "))
    if isinstance(
        exc,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | psycopg.OperationalError
        | psycopg.InterfaceError,
    ) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated):
        if "readonly" in message or "read-only" in message or "disk" in message:
            # A read-only file or a full disk does not heal by retrying at once.
            return DatabaseError(f"the database refused the write: {message}")
        return TransientDatabaseError(f"database connection failed: {message}")
    return DatabaseError(f"database error: {message}")


@contextmanager
def translated(conn: sa.Connection | None = None) -> Iterator[None]:
    """Run the block, re-raising driver errors as herald errors.

    ``conn``: the SQLAlchemy connection whose driver connection the block uses
    directly. SQLAlchemy never sees those statements fail, so it would hand a
    broken connection back to its pool, which then fails to roll it back;
    here the connection is invalidated instead, and the pool drops it.
    """
    try:
        yield
    except (sa_exc.SQLAlchemyError, psycopg.Error) as exc:
        # psycopg's own errors reach here too: Engine.raw_connection() does not wrap
        # a failed connect, and psycopg-level code (LISTEN, COPY) raises them as is.
        if conn is not None and isinstance(exc, psycopg.Error):
            _invalidate_if_lost(conn, exc)
        raise translate(exc) from exc


def _invalidate_if_lost(conn: sa.Connection, exc: psycopg.Error) -> None:
    """Invalidate ``conn`` if its driver connection cannot be handed back to the pool:
    lost, or still in pipeline mode (a server that killed the session while a
    pipeline waited for its results can leave it so before psycopg notices the
    loss, and the pool's ROLLBACK is refused in pipeline mode)."""
    if conn.invalidated or conn.closed:
        return
    driver: Any = conn.connection.driver_connection
    if driver is None:
        return
    if driver.broken or driver.closed or driver.pgconn.pipeline_status != PipelineStatus.OFF:
        conn.invalidate(exc)
