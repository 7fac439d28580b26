"""The farm's domain: pure Python, no database.

Here live the event catalogue (every topic herald knows, its payload fields
and its delivery rule) and, from issue #3 on, the event-sourced aggregates of
the farm (Evaluation, Build with its steps and messages) built on the
eventsourcing library. Nothing in this package imports SQLAlchemy or any other
part of herald except :mod:`herald.errors`.
"""

from herald.domain.catalogue import (
    CATALOGUE,
    DELIVERIES,
    MAX_PAYLOAD_BYTES,
    TOPIC_PATTERN,
    Delivery,
    TopicSpec,
    is_custom_topic,
    topic_filter_pattern_ok,
    validate_event,
    validate_topic,
)

__all__ = [
    "CATALOGUE",
    "DELIVERIES",
    "MAX_PAYLOAD_BYTES",
    "TOPIC_PATTERN",
    "Delivery",
    "TopicSpec",
    "is_custom_topic",
    "topic_filter_pattern_ok",
    "validate_event",
    "validate_topic",
]
