"""Running a database session again after it broke: backoff that forgets healthy spells.

The sequencer and the consumer daemon each hold a long session (a listening
connection, an advisory lock). When it breaks (a killed connection, a
restarted server) it is opened again after an exponential backoff with
jitter, tenacity's ``wait_exponential`` plus ``wait_random``. A session that
ran for a while before it broke was healthy: the backoff starts afresh, so
the tenth killed connection of the day is recovered as fast as the first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, wait_exponential, wait_random

from herald.errors import TransientDatabaseError

__all__ = ["HEALTHY_SECONDS", "run_reconnecting"]

#: A session that ran this long before it broke starts the backoff afresh.
HEALTHY_SECONDS = 2.0


def run_reconnecting(
    session: Callable[[], None],
    stop: threading.Event,
    *,
    what: str,
    log: logging.Logger,
    initial: float,
    maximum: float,
) -> None:
    """Run ``session()`` until it returns or ``stop`` is set, opening it again after
    every :class:`TransientDatabaseError` (other errors propagate)."""
    backoff = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            session()
        except TransientDatabaseError as exc:
            healthy = time.monotonic() - started >= HEALTHY_SECONDS
            failures = 1 if healthy else failures + 1
            state = RetryCallState(Retrying(), None, (), {})
            state.attempt_number = failures
            delay = backoff(state)
            log.warning("%s: %s; reconnecting in %.2f s", what, exc, delay)
            stop.wait(delay)  # a stop request cuts the backoff short
        else:
            return
