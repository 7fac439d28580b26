"""From domain events to log events: one table of topics.

Every event of the farm's aggregates is appended to the log under a topic
(:data:`TOPICS`): a catalogue topic where Hydra has a channel for it
(``build_finished``), a custom ``herald.*`` topic where only herald records
it (``herald.build_waiting``). The payload is the event's own arguments,
that is its attributes without the library's bookkeeping
(``originator_id``, ``originator_version``, ``timestamp``,
``originator_topic``); the aggregate's id and version travel beside it, so
a reader can order and deduplicate. Nothing here touches a database: the
unit of work appends what :func:`to_log` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from herald.domain.build import Build
from herald.domain.evaluation import Evaluation
from herald.errors import UsageError

__all__ = ["TOPICS", "LogEvent", "from_log", "replay", "to_log", "to_log_all"]

#: Each domain event class and the topic it is appended under.
TOPICS: Final[Mapping[type, str]] = {
    Evaluation.Started: "eval_started",
    Evaluation.Added: "eval_added",
    Evaluation.Cached: "eval_cached",
    Evaluation.Failed: "eval_failed",
    Build.Queued: "build_queued",
    Build.Started: "build_started",
    Build.StepStarted: "step_started",
    Build.StepFinished: "step_finished",
    Build.Finished: "build_finished",
    Build.DependencyFailed: "herald.build_dependency_failed",
    Build.Cancelled: "build_cancelled",
    Build.Bumped: "build_bumped",
    Build.Restarted: "build_restarted",
    Build.WaitingForMessage: "herald.build_waiting",
    Build.MessageReceived: "build_message_received",
    Build.MessageApplied: "herald.build_message_applied",
}

#: The library's bookkeeping attributes: not part of a payload.
_BOOKKEEPING: Final = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic"}
)


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A domain event as the log stores it."""

    topic: str
    payload: dict[str, Any]
    #: the aggregate's UUID, as text
    aggregate_id: str
    #: the aggregate's version after this event (1 for the first)
    aggregate_version: int
    #: when the event happened (timezone-aware)
    occurred_at: datetime


def _topic_of(event: object) -> str:
    for cls in type(event).__mro__:
        topic = TOPICS.get(cls)
        if topic is not None:
            return topic
    raise UsageError(f"no log topic for {type(event).__qualname__}: not a herald domain event")


def _json_value(value: object) -> object:
    """A copy of ``value`` with tuples as lists, so the payload is plain JSON data."""
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value


#: What an attribute value of an event may be to go into a payload as it is.
_PLAIN: Final = frozenset({int, str, bool, float, type(None)})


def to_log(event: Any) -> LogEvent:
    """The log event for one domain event of :class:`Build` or :class:`Evaluation`.

    Raises :class:`~herald.errors.UsageError` for any other object.
    """
    cls = type(event)
    topic = TOPICS.get(cls) or _topic_of(event)
    attributes = vars(event)
    names, count = _PAYLOAD_NAMES.get(cls, ((), -1))
    if count != len(attributes):
        # The first of its class (or one with attributes of its own): look them over.
        names = tuple(name for name in attributes if name not in _BOOKKEEPING)
        _PAYLOAD_NAMES.setdefault(cls, (names, len(attributes)))
    payload = {}
    for name in names:
        value = attributes[name]
        payload[name] = value if type(value) in _PLAIN else _json_value(value)
    return LogEvent(
        topic,
        payload,
        str(attributes["originator_id"]),
        attributes["originator_version"],
        attributes["timestamp"],
    )


#: Each event class's payload fields, in order (its attributes less the bookkeeping),
#: and how many attributes its events have.
_PAYLOAD_NAMES: dict[type, tuple[tuple[str, ...], int]] = {}


def to_log_all(events: Iterable[Any]) -> list[LogEvent]:
    """:func:`to_log` for each event, in order (e.g. ``to_log_all(build.collect_events())``)."""
    return [to_log(event) for event in events]


#: Each topic and the domain event class it is read back as.
_CLASSES: Final[Mapping[str, type]] = {topic: cls for cls, topic in TOPICS.items()}


def from_log(event: LogEvent) -> Any:
    """The domain event a log event was made from (the inverse of :func:`to_log`)."""
    cls = _CLASSES.get(event.topic)
    if cls is None:
        raise UsageError(f"topic {event.topic!r} is not a domain event of herald's aggregates")
    fields: dict[str, Any] = dict(event.payload)
    if issubclass(cls, Aggregate.Created):
        owner = Build if cls is Build.Queued else Evaluation
        fields["originator_topic"] = get_topic(owner)
    return cls(
        originator_id=UUID(event.aggregate_id),
        originator_version=event.aggregate_version,
        timestamp=event.occurred_at,
        **fields,
    )


def replay(events: Iterable[LogEvent]) -> Any:
    """The aggregate that ``events`` (one aggregate's, in version order) make; None if none."""
    aggregate = None
    for event in events:
        aggregate = from_log(event).mutate(aggregate)
    return aggregate
