"""The read side: consumers, their offsets, the daemon, delivery rules, built-in consumers.

* :mod:`~herald.consumers.model` — what a consumer is; what a handler returns;
* :mod:`~herald.consumers.config` — consumers from ``herald.toml``, consumer types
  (built in, and the ``herald.consumers`` entry-point group);
* :mod:`~herald.consumers.store` — every database call about consumers
  (offsets, claims, delivery records, parked events);
* :mod:`~herald.consumers.runner` — running one consumer: batches, delivery
  rules, retries, parking, timeouts;
* :mod:`~herald.consumers.daemon` — `herald run`: the sequencer and every consumer;
* :mod:`~herald.consumers.builtin` — the jsonl, webhook and command consumers;
* :mod:`~herald.consumers.api` — subscribe functions in-process; ``wait_for``.

Imports :mod:`herald.outbox` and :mod:`herald.schema` only.
"""

from herald.consumers.api import Subscriptions, wait_for
from herald.consumers.config import Config, load_config
from herald.consumers.daemon import Daemon, tune_garbage_collector, tune_interpreter
from herald.consumers.model import Consumer, Delivered, DeliveryFailed, HandlerContext

__all__ = [
    "Config",
    "Consumer",
    "Daemon",
    "Delivered",
    "DeliveryFailed",
    "HandlerContext",
    "Subscriptions",
    "load_config",
    "tune_garbage_collector",
    "tune_interpreter",
    "wait_for",
]
