"""Running Alembic programmatically: ``herald db upgrade`` and ``herald db current``."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

__all__ = ["alembic_config", "current_revision", "head_revision", "upgrade"]

_MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic configuration for herald's migrations, bound to ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (idempotent). Commits."""
    command.upgrade(alembic_config(connection), revision)
    connection.commit()


def current_revision(connection: sa.Connection) -> str | None:
    """The database's revision, or None for a database herald has never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision herald knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
