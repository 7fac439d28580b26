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
    reader = LogReader(engine, topics)
    entries: list[LogEntry] = []
    while True:
        page = reader.read(after)
        entries.extend(page.entries)
        after = page.next_after
        if page.at_head:
            return entries
