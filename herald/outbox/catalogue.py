"""Copy the event catalogue (:data:`herald.domain.CATALOGUE`) into ``herald_topics``.

``herald_append`` (the SQL function) validates against that table, so SQL
writers and Python writers obey one catalogue. ``herald db upgrade`` calls
:func:`sync_catalogue` after the migrations.
"""

from __future__ import annotations

import sqlalchemy as sa

from herald.domain import CATALOGUE
from herald.schema import topics

__all__ = ["sync_catalogue"]


def sync_catalogue(conn: sa.Connection) -> int:
    """Make ``herald_topics`` equal the catalogue; returns the number of topics."""
    conn.execute(sa.delete(topics))
    conn.execute(
        sa.insert(topics),
        [
            {"topic": spec.topic, "delivery": spec.delivery, "fields": dict(spec.fields)}
            for spec in CATALOGUE.values()
        ],
    )
    return len(CATALOGUE)
