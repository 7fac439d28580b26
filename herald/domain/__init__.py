"""The farm's domain: pure Python, no database.

Here live the event catalogue (every topic herald knows, its payload fields
and its delivery rule), the event-sourced aggregates of the farm
(:class:`Evaluation`, :class:`Build` with its steps and messages) built on the
eventsourcing library, and :func:`to_log`, which turns their events into log
events. Nothing in this package imports SQLAlchemy or any other part of herald
except :mod:`herald.errors`.
"""

from herald.domain.build import STATUS_NAMES, Build
from herald.domain.catalogue import (
    CATALOGUE,
    DELIVERIES,
    MAX_PAYLOAD_BYTES,
    TOPIC_PATTERN,
    Delivery,
    TopicSpec,
    is_custom_topic,
    json_text,
    topic_filter_pattern_ok,
    validate_event,
    validate_topic,
)
from herald.domain.evaluation import Evaluation
from herald.domain.hydra import hydra_form, hydra_values
from herald.domain.log import TOPICS, LogEvent, from_log, replay, to_log, to_log_all

__all__ = [
    "CATALOGUE",
    "DELIVERIES",
    "MAX_PAYLOAD_BYTES",
    "STATUS_NAMES",
    "TOPICS",
    "TOPIC_PATTERN",
    "Build",
    "Delivery",
    "Evaluation",
    "LogEvent",
    "TopicSpec",
    "from_log",
    "hydra_form",
    "hydra_values",
    "is_custom_topic",
    "json_text",
    "replay",
    "to_log",
    "to_log_all",
    "topic_filter_pattern_ok",
    "validate_event",
    "validate_topic",
]
