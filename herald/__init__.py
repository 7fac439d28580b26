"""herald: the event log of a CI build farm.

Every change to the farm's queue is appended to one append-only log in the
same transaction as the change itself; consumers read it at their own
offsets; operators replay and audit it. See README.md and docs/design.md.

The Python API most writers need::

    import herald
    engine = herald.create_engine()            # $HERALD_DATABASE_URL
    with engine.begin() as conn:
        conn.execute(...)                      # your own writes
        herald.append(conn, "build_finished", {"build_id": 42, "dependent_ids": []})
"""

from herald.config import create_engine, database_url
from herald.errors import HeraldError
from herald.outbox import LogEntry, LogReader, NewEvent, TopicFilter, append, append_many

__version__ = "0.1.0"

__all__ = [
    "HeraldError",
    "LogEntry",
    "LogReader",
    "NewEvent",
    "TopicFilter",
    "__version__",
    "append",
    "append_many",
    "create_engine",
    "database_url",
]
