"""What a consumer is, and what its handler gives back.

A **consumer** is a name, a topic filter, a delivery policy, a handler, a
concurrency and (in the database) an offset: the last seq it has finished.
The daemon reads the log after the offset, calls the handler once per event
(a :class:`~herald.outbox.LogEntry`), records every attempt and advances the
offset in the same transaction as those records.

A **handler** is any callable taking the entry. Returning (``None`` or a
:class:`Delivered` with details) means delivered; raising means this attempt
failed. Raise :class:`DeliveryFailed` to say more: whether a retry can help
(a 4xx answer cannot), the HTTP status, other details for the record. A
handler may also have a ``close()`` method, called when the daemon stops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, runtime_checkable

from herald.errors import UsageError
from herald.outbox import LogEntry, TopicFilter

__all__ = [
    "DELIVERY_POLICIES",
    "NAME_PATTERN",
    "OUTCOMES",
    "Consumer",
    "Delivered",
    "DeliveryFailed",
    "DeliveryPolicy",
    "Handler",
    "HandlerContext",
    "Outcome",
    "build_key",
    "validate_name",
]

#: auto: each event's own rule (ephemeral, or at_least_once; once_per_eval
#: events are delivered at least once); at_least_once / ephemeral: every event
#: of the consumer's topics is delivered by that rule.
DeliveryPolicy = Literal["auto", "at_least_once", "ephemeral"]
DELIVERY_POLICIES: Final[tuple[str, ...]] = ("auto", "at_least_once", "ephemeral")

Outcome = Literal["delivered", "failed", "parked", "expired", "discarded"]
OUTCOMES: Final[tuple[str, ...]] = ("delivered", "failed", "parked", "expired", "discarded")

#: A consumer's name: what operators type (`herald parked list NAME`).
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def validate_name(name: object) -> str:
    """The name, if it is a valid consumer name; :class:`UsageError` if not."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UsageError(
            f"consumer name {name!r} is not valid: use 1-100 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Delivered:
    """A handler's success, with details for the delivery record."""

    http_status: int | None = None
    detail: Mapping[str, Any] | None = None


class DeliveryFailed(Exception):
    """A handler's failure, with details for the delivery record.

    ``retry=False`` says another attempt cannot help (a webhook answered
    4xx): an at_least_once event is then parked at once.
    """

    def __init__(
        self,
        message: str,
        *,
        retry: bool = True,
        http_status: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry = retry
        self.http_status = http_status
        self.detail = detail


@runtime_checkable
class Handler(Protocol):
    """Delivers one event; returns (delivered) or raises (this attempt failed)."""

    def __call__(self, entry: LogEntry, /) -> Delivered | None: ...


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a consumer type's factory is told besides its options."""

    #: the consumer's name
    consumer: str
    #: the consumer's per-call timeout (s); a handler that can stop its own work
    #: (a subprocess, an HTTP request) should do so a little before it
    timeout: float


@dataclass(slots=True)
class Consumer:
    """A consumer as the daemon runs it (from ``herald.toml`` or built in Python)."""

    name: str
    topics: Iterable[str]
    handler: Callable[[LogEntry], Delivered | None]
    delivery: DeliveryPolicy = "auto"
    #: how many events are delivered at once (events of one build: one at a time, in order)
    concurrency: int = 1
    #: seconds one handler call may take; after that the attempt has failed
    timeout: float = 30.0
    #: attempts of an at_least_once event before it is parked
    max_attempts: int = 5
    #: exponential backoff between attempts: first wait, longest wait (s)
    retry_initial: float = 0.5
    retry_max: float = 30.0
    #: an ephemeral event older than this (s) when the consumer reaches it is expired
    staleness: float = 300.0
    #: at most this many events are delivered and not yet committed (what a kill can
    #: repeat); one read takes half of them, and records and offset are committed per read
    batch_size: int = 500
    #: the consumer's type, for `herald consumers` (``python`` for a function)
    type: str = "python"
    topic_filter: TopicFilter = field(init=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.topics = list(self.topics)
        if not self.topics:
            raise UsageError(f"consumer {self.name!r}: topics is empty; name at least one topic")
        self.topic_filter = TopicFilter(self.topics)
        if self.delivery not in DELIVERY_POLICIES:
            raise UsageError(
                f"consumer {self.name!r}: delivery {self.delivery!r} is not one of "
                f"{', '.join(DELIVERY_POLICIES)}"
            )
        for attr, minimum in (("concurrency", 1), ("max_attempts", 1), ("batch_size", 1)):
            if getattr(self, attr) < minimum:
                raise UsageError(f"consumer {self.name!r}: {attr} must be at least {minimum}")
        for attr in ("timeout", "retry_initial", "retry_max", "staleness"):
            if not getattr(self, attr) > 0:
                raise UsageError(f"consumer {self.name!r}: {attr} must be more than 0 seconds")

    def rule(self, entry: LogEntry) -> Literal["at_least_once", "ephemeral"]:
        """The delivery rule this consumer applies to ``entry``."""
        if self.delivery != "auto":
            return self.delivery
        return "ephemeral" if entry.delivery == "ephemeral" else "at_least_once"

    def close(self) -> None:
        """Close the handler, if it has anything to close."""
        close = getattr(self.handler, "close", None)
        if callable(close):
            close()


def build_key(entry: LogEntry) -> str | None:
    """What orders a consumer's deliveries: events with the same key go one at a time.

    Events about one build (``build_id`` in the payload) share the key
    ``build:<id>``; other events of one aggregate share its id; anything else
    has no key and may go in parallel with everything.
    """
    build_id = entry.payload.get("build_id")
    # type() rather than isinstance(): a bool is an int too, and is no build id.
    if type(build_id) is int:
        return f"build:{build_id}"
    return entry.aggregate_id
