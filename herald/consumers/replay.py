"""Replaying a range of the log through a consumer's handler, without moving its offset.

``herald replay`` is for a one-off re-post: a webhook receiver that lost a
day, a status page rebuilt from scratch. The consumer's live offset, its
parked events and the daemon running it are untouched; every attempt is
recorded in ``herald_deliveries`` with kind ``replay``. The consumer's
rules apply with two differences: nothing is parked (an at_least_once event
that fails through its whole retry budget is recorded as failed) and no
event is too old (an operator asking for a replay of last week's
``step_finished`` events wants them sent). A build's events still go one at
a time, in seq order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa

from herald.consumers import store
from herald.consumers.model import Consumer
from herald.consumers.runner import NullMetrics, Runner, _Batch, _items, reading
from herald.outbox import Page, read_page

__all__ = ["ReplayResult", "replay"]


@dataclass(slots=True)
class ReplayResult:
    """What a replay did."""

    consumer: str
    first_seq: int
    last_seq: int
    #: events of the consumer's topics in the range that were handed to the handler
    events: int = 0
    delivered: int = 0
    failed: int = 0
    #: handler calls (retries included)
    attempts: int = 0
    #: stopped (SIGINT/SIGTERM) before the end of the range
    interrupted: bool = False
    #: the first seq not replayed when interrupted
    resume_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "from": self.first_seq,
            "until": self.last_seq,
            "events": self.events,
            "delivered": self.delivered,
            "failed": self.failed,
            "attempts": self.attempts,
            "interrupted": self.interrupted,
            "resume_from": self.resume_from,
        }


def replay(
    engine: sa.Engine,
    consumer: Consumer,
    first_seq: int,
    last_seq: int,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Deliver the consumer's events with ``first_seq <= seq <= last_seq`` again.

    Records are written page by page (``batch_size`` events), so an
    interrupted replay keeps what it did. ``progress(n)`` is called with the
    number of seqs passed after each page. ``stop`` interrupts it: the calls
    in flight finish, and the result says where to resume.
    """
    result = ReplayResult(consumer.name, first_seq, last_seq)
    stop = stop or threading.Event()
    replayer = _Replayer(engine, consumer, last_seq, result)
    finished = threading.Event()

    def relay() -> None:
        # The caller's stop reaches the batch in flight through the runner's own flag.
        while not finished.wait(0.1):
            if stop.is_set():
                replayer.runner.stop()
                return

    watcher = threading.Thread(target=relay, name="herald-replay-stop", daemon=True)
    watcher.start()
    after = first_seq - 1
    try:
        while after < last_seq:
            if stop.is_set():
                result.interrupted, result.resume_from = True, after + 1
                break
            page = replayer.page(after)
            if page.entries and not replayer.deliver(page):
                break
            if progress is not None:
                progress(page.next_after - after)
            after = page.next_after
            if page.at_head:
                break
        replayer.commits.wait()
    finally:
        finished.set()
        replayer.close()
        watcher.join(1.0)
    return result


class _Replayer:
    """Reads a range page by page and delivers it with the consumer's rules.

    The next page is read while one is delivered, and a page's records are
    written while the next is delivered (at most one page's records wait for
    the disk).
    """

    def __init__(
        self, engine: sa.Engine, consumer: Consumer, last_seq: int, result: ReplayResult
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.last_seq = last_seq
        self.result = result
        self.runner = Runner(
            consumer, engine, "replay", wake=threading.Event(), metrics=NullMetrics()
        )
        self.runner._start_workers()
        self.commits = self.runner._commits
        self._ahead: tuple[int, Page] | None = None

    def _read(self, position: int) -> Page:
        # Without a transaction, as the runner reads (no BEGIN, no ROLLBACK).
        with reading(self.engine) as conn:
            return read_page(
                conn,
                position,
                self.consumer.batch_size,
                self.consumer.topic_filter,
                until_seq=self.last_seq,
            )

    def page(self, position: int) -> Page:
        """The page after ``position``: the one read ahead, if it starts there."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == position:
            return ahead[1]
        return self._read(position)

    def deliver(self, page: Page) -> bool:
        """Deliver the page's events; False if a stop interrupted it."""
        consumer, result = self.consumer, self.result
        batch = _Batch(consumer, _items(consumer, page.entries), {}, "replay", NullMetrics())

        def read_ahead() -> None:
            if not page.at_head and page.next_after < self.last_seq:
                self._ahead = (page.next_after, self._read(page.next_after))

        self.commits.wait(pending=1)
        self.runner._run(batch, None, read_ahead)
        records = [r for item in batch.items for r in item.records]
        self.commits.submit(partial(_insert, self.engine, consumer.name, records))
        done = [item for item in batch.items if item.final is not None]
        result.events += len(done)
        result.delivered += sum(1 for i in done if i.final == "delivered")
        result.failed += sum(1 for i in done if i.final != "delivered")
        result.attempts += len(records)
        unfinished = [item.seq for item in batch.items if item.final is None]
        if unfinished:
            result.interrupted, result.resume_from = True, unfinished[0]
            return False
        return True

    def close(self) -> None:
        self.runner.stop()
        self.commits.close()
        for worker in self.runner._workers:
            worker.join(1.0)


def _insert(engine: sa.Engine, name: str, records: list[store.Record]) -> None:
    with engine.connect() as conn:
        store.insert_records(conn, name, records)
