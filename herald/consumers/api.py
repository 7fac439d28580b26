"""The in-process API: subscribe functions to topics, and wait for a consumer.

LambdaCD's publish/subscribe, on the durable log::

    hub = Subscriptions(engine)

    @hub.subscribe("build_finished", "build_started")
    def github_status(entry: LogEntry) -> None:
        ...

    with hub.run():          # a Daemon in a background thread
        ...                  # github_status is called for every matching event

A subscription is a consumer like any other (named after the function
unless ``name=`` says otherwise): it has an offset, delivery records and
parked events, and survives restarts.

:func:`wait_for` answers LambdaCD's ``*-consumed`` need: it returns once a
consumer has finished an event (delivered, parked, expired or failed for
good), with that event's last delivery record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from herald.consumers import store
from herald.consumers.daemon import Daemon
from herald.consumers.model import Consumer, Delivered
from herald.consumers.store import Record
from herald.errors import UsageError, WaitTimeout
from herald.outbox import LogEntry
from herald.schema.dberrors import translated

__all__ = ["Subscriptions", "wait_for"]

Handler = Callable[[LogEntry], Delivered | None]


class Subscriptions:
    """Functions subscribed to topics, run by a daemon in this process."""

    def __init__(self, engine: sa.Engine, **daemon_options: Any) -> None:
        self.engine = engine
        self.consumers: list[Consumer] = []
        self.daemon_options = daemon_options

    def subscribe(
        self, *topics: str, name: str | None = None, **settings: Any
    ) -> Callable[[Handler], Handler]:
        """Decorator: call the function for every event of ``topics`` (names or patterns).

        ``settings`` are :class:`~herald.consumers.model.Consumer`'s
        (``delivery``, ``concurrency``, ``timeout``, ``max_attempts``, ...).
        """

        def register(function: Handler) -> Handler:
            self.add(name or str(getattr(function, "__name__", "")), topics, function, **settings)
            return function

        return register

    def add(self, name: str, topics: Iterable[str], handler: Handler, **settings: Any) -> Consumer:
        """Subscribe ``handler`` under ``name``; returns the consumer."""
        if any(c.name == name for c in self.consumers):
            raise UsageError(f"consumer {name!r} is subscribed twice")
        consumer = Consumer(name=name, topics=list(topics), handler=handler, **settings)
        self.consumers.append(consumer)
        return consumer

    def run(self) -> Daemon:
        """A daemon for these subscriptions, started (use as a context manager, or stop())."""
        return Daemon(self.engine, self.consumers, **self.daemon_options).start()


def wait_for(engine: sa.Engine, consumer: str, seq: int, timeout: float = 30.0) -> Record | None:
    """Wait until ``consumer`` has finished ``seq``; its last delivery record.

    Returns None when the event is outside the consumer's topics (finished
    without a delivery). Raises :class:`~herald.errors.WaitTimeout` if the
    consumer's offset has not reached ``seq`` within ``timeout`` seconds.
    Checks every 20 ms (one indexed read).
    """
    if seq < 1:
        raise UsageError(f"seq must be at least 1, not {seq}")
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn, translated():
            row = store.consumer_row(conn, consumer)
            offset = row.offset if row is not None else 0
            if offset >= seq:
                return store.last_record(conn, consumer, seq)
            conn.rollback()
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(consumer, seq, timeout, offset)
        time.sleep(min(left, 0.02))
