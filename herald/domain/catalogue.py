"""The event catalogue: every topic herald knows, in one table.

Topics keep Hydra's channel names. A topic is one of:

* a **catalogue topic**: a bare ``snake_case`` name listed in :data:`CATALOGUE`
  (``build_finished``); its payload must carry the listed fields with the
  listed JSON types, and its delivery rule is fixed here;
* a **custom topic** (LambdaCD's "publish to a topic of your choosing"):
  dotted, ``namespace.name`` (``deploy.started``, ``acme.cache.pushed``); any
  JSON object is accepted and the writer picks the delivery rule
  (``at_least_once`` unless told otherwise).

Both follow :data:`TOPIC_PATTERN`. A bare name that is not in the catalogue is
refused, so a typo (``build_finshed``) never reaches the log. The same table is
copied into the database (``herald_topics``) by ``herald db upgrade`` so that
the SQL function ``herald_append`` validates exactly like Python does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from herald.errors import InvalidPayload, InvalidTopic, PayloadTooLarge

__all__ = [
    "CATALOGUE",
    "DELIVERIES",
    "MAX_PAYLOAD_BYTES",
    "MAX_TOPIC_LENGTH",
    "TOPIC_PATTERN",
    "Delivery",
    "FieldType",
    "TopicSpec",
    "is_custom_topic",
    "json_text",
    "topic_filter_pattern_ok",
    "validate_event",
    "validate_topic",
]

Delivery = Literal["at_least_once", "ephemeral", "once_per_eval"]
DELIVERIES: Final[tuple[Delivery, ...]] = ("at_least_once", "ephemeral", "once_per_eval")

#: JSON types a catalogue field can require. A trailing ``?`` also allows null.
FieldType = Literal["integer", "string", "integer[]", "string?", "integer?"]

#: ``snake_case`` words, optionally dotted: ``build_finished``, ``deploy.started``.
TOPIC_PATTERN: Final = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
_TOPIC_RE: Final = re.compile(TOPIC_PATTERN)
MAX_TOPIC_LENGTH: Final = 100

#: The largest payload the log takes, as compact UTF-8 JSON. A ``build_finished``
#: with 10,000 dependents is about 80 KB; Hydra's NOTIFY broke at 8,000 bytes.
MAX_PAYLOAD_BYTES: Final = 1024 * 1024

#: A topic filter pattern: a topic with ``*`` wildcards (``build_*``, ``deploy.*``).
_FILTER_RE: Final = re.compile(r"^[a-z0-9_.*]+$")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What the catalogue says of one topic."""

    topic: str
    #: payload fields in Hydra's tab-separated order, with their JSON types
    fields: tuple[tuple[str, FieldType], ...]
    delivery: Delivery
    #: Hydra's notification channel this topic corresponds to, if any
    hydra_channel: str | None
    description: str

    @property
    def required(self) -> dict[str, FieldType]:
        return dict(self.fields)


def _spec(
    topic: str,
    fields: tuple[tuple[str, FieldType], ...],
    delivery: Delivery,
    description: str,
    *,
    hydra: str | None = "same",
) -> TopicSpec:
    channel = topic if hydra == "same" else hydra
    return TopicSpec(topic, fields, delivery, channel, description)


_ID: Final[tuple[tuple[str, FieldType], ...]] = (("build_id", "integer"),)

#: The catalogue (``../shared/design/EVENTS.md``), keyed by topic.
CATALOGUE: Final[dict[str, TopicSpec]] = {
    s.topic: s
    for s in (
        _spec(
            "eval_started",
            (("trace_id", "string"), ("jobset_id", "integer")),
            "ephemeral",
            "an evaluation of a jobset begins",
        ),
        _spec(
            "eval_added",
            (("trace_id", "string"), ("jobset_id", "integer"), ("eval_id", "integer")),
            "ephemeral",
            "an evaluation finished and was recorded",
        ),
        _spec(
            "eval_cached",
            (("trace_id", "string"), ("jobset_id", "integer"), ("previous_eval_id", "integer")),
            "ephemeral",
            "inputs unchanged since an earlier evaluation",
        ),
        _spec(
            "eval_failed",
            (("trace_id", "string"), ("jobset_id", "integer")),
            "ephemeral",
            "fetching or evaluating failed (an optional `error` field says why)",
        ),
        _spec("build_queued", _ID, "ephemeral", "a new build was added by an evaluation"),
        _spec(
            "cached_build_queued",
            (("eval_id", "integer"), ("build_id", "integer")),
            "once_per_eval",
            "a new evaluation contains an existing, unfinished build",
        ),
        _spec(
            "cached_build_finished",
            (("eval_id", "integer"), ("build_id", "integer")),
            "once_per_eval",
            "a new evaluation contains an existing, finished build",
        ),
        _spec(
            "build_started",
            _ID,
            "ephemeral",
            "building begins; not emitted when outputs are substituted",
        ),
        _spec(
            "step_started",
            (("build_id", "integer"), ("step_nr", "integer")),
            "ephemeral",
            "a build step is dispatched to a machine",
        ),
        _spec(
            "step_finished",
            (("build_id", "integer"), ("step_nr", "integer"), ("log_path", "string?")),
            "ephemeral",
            "a step completes, success or not; not when substituted",
        ),
        _spec(
            "build_finished",
            (("build_id", "integer"), ("dependent_ids", "integer[]")),
            "at_least_once",
            "a build completes, success or not, substituted or not; dependent_ids are the "
            "builds that depended on it and finished with it",
        ),
        _spec(
            "builds_added",
            _ID,
            "ephemeral",
            "an evaluation committed new builds; build_id is the lowest new one",
        ),
        _spec(
            "build_restarted",
            _ID,
            "at_least_once",
            "a finished build was restarted (a new generation)",
            hydra="builds_restarted",
        ),
        _spec(
            "build_cancelled",
            _ID,
            "at_least_once",
            "a queued or running build was cancelled",
            hydra="builds_cancelled",
        ),
        _spec(
            "build_bumped",
            (("build_id", "integer"), ("priority", "integer")),
            "ephemeral",
            "a build's priority changed",
            hydra="builds_bumped",
        ),
        _spec(
            "build_message_received",
            (("build_id", "integer"), ("type", "string")),
            "at_least_once",
            "an external system sent a pass / fail / work message for a waiting build",
            hydra=None,
        ),
    )
}


def is_custom_topic(topic: str) -> bool:
    """A dotted topic is custom: the writer owns its payload and delivery rule."""
    return "." in topic


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it may be appended, else raise :class:`InvalidTopic`."""
    if type(topic) is str and topic in CATALOGUE:
        return topic  # the catalogue's own names follow the rules
    if not isinstance(topic, str):
        raise InvalidTopic(topic, "must be a string")
    if not topic:
        raise InvalidTopic(topic, "must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(topic[:40] + "…", f"longer than {MAX_TOPIC_LENGTH} characters")
    if not _TOPIC_RE.match(topic):
        raise InvalidTopic(
            topic, "must be snake_case words, optionally dotted (build_finished, deploy.started)"
        )
    if not is_custom_topic(topic) and topic not in CATALOGUE:
        raise InvalidTopic(
            topic,
            "not in the event catalogue; custom topics need a namespace, e.g. 'acme."
            f"{topic}' (see `herald topics`)",
        )
    return topic


def topic_filter_pattern_ok(pattern: str) -> bool:
    """Whether ``pattern`` is a valid topic filter (a topic with ``*`` wildcards)."""
    return bool(pattern) and len(pattern) <= MAX_TOPIC_LENGTH and bool(_FILTER_RE.match(pattern))


def _type_ok(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    # integer[]
    return isinstance(value, list) and all(_type_ok(v, "integer") for v in value)


def validate_event(
    topic: object, payload: object, delivery: str | None = None
) -> tuple[str, Delivery, str]:
    """Check an event before it is appended.

    Returns ``(topic, delivery, payload_json)`` where ``payload_json`` is the
    compact JSON text that will be stored (its size is what the limit
    counts). Raises :class:`InvalidTopic`, :class:`InvalidPayload` or
    :class:`PayloadTooLarge`; nothing is written on any error.
    """
    name = validate_topic(topic)
    if not isinstance(payload, dict):
        raise InvalidPayload(name, f"must be a JSON object, not {_json_kind(payload)}")
    rule = _delivery_rule(name, payload, delivery)
    text = _payload_json(name, payload)
    return name, rule, text


def _delivery_rule(name: str, payload: dict[str, Any], delivery: str | None) -> Delivery:
    """Check a catalogue topic's fields; the delivery rule that applies."""
    spec = CATALOGUE.get(name)
    if spec is None:
        if delivery is None:
            return "at_least_once"
        if delivery in DELIVERIES:
            return delivery
        raise InvalidPayload(name, f"unknown delivery {delivery!r}; one of {', '.join(DELIVERIES)}")
    for field, kind in spec.fields:
        if field not in payload:
            raise InvalidPayload(name, f"missing field {field!r} ({kind})")
        if not _type_ok(payload[field], kind):
            raise InvalidPayload(
                name, f"field {field!r} must be {kind}, not {_json_kind(payload[field])}"
            )
    if delivery is not None and delivery != spec.delivery:
        raise InvalidPayload(
            name, f"delivery is fixed by the catalogue as {spec.delivery!r}, not {delivery!r}"
        )
    return spec.delivery


#: A NUL character as JSON writes it: \u0000 after an even number of backslashes
#: (an odd number means the backslash itself was escaped: the text "\\u0000").
_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _compact_encoder() -> Callable[[object], str]:
    """What ``json.dumps(value, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)`` returns, at half its cost for a small payload.

    ``json.dumps`` sets up CPython's C encoder (``_json.make_encoder``) anew
    for every call; this sets it up once. It keeps no circular-reference
    markers, so it holds no state and threads may share it: a value that
    contains itself ends in RecursionError instead, which callers treat as
    any other value JSON cannot hold.
    """
    stdlib = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        from _json import encode_basestring, make_encoder  # noqa: PLC0415 - CPython only
    except ImportError:  # pragma: no cover - another Python: the stdlib's own path
        return stdlib.encode
    encoder = make_encoder(
        None, stdlib.default, encode_basestring, None, ":", ",", False, False, False
    )

    def encode(value: object) -> str:
        return "".join(encoder(value, 0))

    return encode


#: Compact JSON text (no spaces, UTF-8 kept, no NaN): how herald stores JSON.
json_text: Final = _compact_encoder()


def _payload_json(name: str, payload: dict[str, Any]) -> str:
    """The compact JSON text that will be stored, within the size limit."""
    try:
        text = json_text(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidPayload(name, f"not serialisable as JSON: {exc}") from exc
    if "\\u0000" in text and _NUL.search(text):
        # PostgreSQL's jsonb cannot store NUL characters; refuse them everywhere alike.
        raise InvalidPayload(name, "contains a NUL character (\\u0000)")
    if text.isascii():
        # Most payloads: one byte a character, and no lone surrogate.
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidPayload(
                name, "contains text that is not valid Unicode (a lone surrogate)"
            ) from exc
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(name, size, MAX_PAYLOAD_BYTES)
    return text


_KINDS: Final[tuple[tuple[type | tuple[type, ...], str], ...]] = (
    (bool, "a boolean"),
    ((int, float), "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    for types, name in _KINDS:
        if isinstance(value, types):
            return name
    return type(value).__name__
