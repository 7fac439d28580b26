"""Alembic environment: herald runs its migrations programmatically.

``herald db upgrade`` passes an open SQLAlchemy connection in
``config.attributes["connection"]``; nothing here reads a file or the
environment.
"""

from __future__ import annotations

from alembic import context

from herald.schema.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Two `herald db upgrade` at once: the second waits, then finds nothing to do.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7234041870132) ")
    context.run_migrations()
