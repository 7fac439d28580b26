"""Small helpers shared by the integration tests."""

from __future__ import annotations

import sqlalchemy as sa

from herald.consumers import store
from herald.outbox import LogEntry, LogReader, TopicFilter


def count_events(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM herald_events")).scalar_one())


def read_all(
    engine: sa.Engine, after: int = 0, topics: TopicFilter | None = None
) -> list[LogEntry]:
    return list(LogReader(engine, topics).until_head(after))


def claimed(engine: sa.Engine, name: str, token: str = "me") -> int:
    """Create consumer ``name`` and claim it for ``token`` (a 30 s lease); its epoch."""
    with engine.begin() as conn:
        store.ensure_consumer(conn, name)
        store.set_owner(conn, name, token, 30)
        row = store.consumer_row(conn, name)
    assert row is not None
    return row.epoch
