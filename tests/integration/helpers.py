"""Small helpers shared by the integration tests."""

from __future__ import annotations

import sqlalchemy as sa

from herald.outbox import LogEntry, LogReader, TopicFilter


def count_events(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM herald_events")).scalar_one())


def read_all(
    engine: sa.Engine, after: int = 0, topics: TopicFilter | None = None
) -> list[LogEntry]:
    return list(LogReader(engine, topics).until_head(after))
