"""The write side and the log.

* :mod:`~herald.outbox.append` — append events inside the caller's transaction;
* :mod:`~herald.outbox.sequencer` — turn committed events into the dense log
  order (PostgreSQL; on SQLite the writer does it in its own transaction);
* :mod:`~herald.outbox.reader` — read the log from any seq, filtered by topic;
* :mod:`~herald.outbox.wakeup` — wait for the sequencer's NOTIFY, with a poll
  as the fallback;
* :mod:`~herald.outbox.catalogue` — copy the event catalogue into the database;
* :mod:`~herald.outbox.unit_of_work` — load the farm's aggregates from the log
  and save their events with the projections, in one transaction;
* :mod:`~herald.outbox.projector` — the projections, derived from log events.

Imports :mod:`herald.domain` and :mod:`herald.schema` only.
"""

from herald.outbox.append import NewEvent, append, append_many
from herald.outbox.catalogue import sync_catalogue
from herald.outbox.projector import PROJECTED_TOPICS, project
from herald.outbox.reader import (
    EventFilter,
    LogEntry,
    LogReader,
    Page,
    TopicFilter,
    first_seq,
    first_seq_since,
    head,
    last_seq_until,
    read_page,
)
from herald.outbox.sequencer import Sequencer, run_sequencer
from herald.outbox.unit_of_work import UnitOfWork
from herald.outbox.wakeup import Waker

__all__ = [
    "PROJECTED_TOPICS",
    "EventFilter",
    "LogEntry",
    "LogReader",
    "NewEvent",
    "Page",
    "Sequencer",
    "TopicFilter",
    "UnitOfWork",
    "Waker",
    "append",
    "append_many",
    "first_seq",
    "first_seq_since",
    "head",
    "last_seq_until",
    "project",
    "read_page",
    "run_sequencer",
    "sync_catalogue",
]
