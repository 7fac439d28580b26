"""Hydra's tab-separated payload form, rendered from a catalogue event.

Hydra's queue runner and evaluator send their notifications through
PostgreSQL ``NOTIFY`` with the values tab-separated, in a fixed order
(``../shared/seeds/``): ``step_finished`` is "the ID of the build, the step
number, and the path on disk to the log file"; ``build_finished`` is "the ID
of the build, followed by IDs of all of the builds which also depended upon
this build"; ``cached_build_finished`` is the evaluation's id, then the
build's. herald's catalogue lists every topic's fields in exactly that order
(:attr:`~herald.domain.catalogue.TopicSpec.fields`), so the form is the
catalogue's fields, in order, joined by tabs:

* an integer is written in decimal, a string as it is;
* a list field (``build_finished``'s ``dependent_ids``) becomes one value per
  element, so a build with no dependents is a single value;
* null (``step_finished`` without a log file) is the empty string;
* fields beyond the catalogue's (herald's ``status``, ``generation``, …) are
  not part of the form.

Custom (dotted) topics, herald's own ``herald.*`` topics included, have no
Hydra form: :func:`hydra_form` refuses them, as it refuses a payload the
catalogue does not accept or a value that would not survive the form (a
string with a tab or a line break in it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from herald.domain.catalogue import CATALOGUE, is_custom_topic
from herald.errors import InvalidPayload, UsageError

__all__ = ["hydra_form", "hydra_values"]

#: Characters that would split or end a value of the tab-separated form.
_SEPARATORS = ("\t", "\n", "\r")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value(topic: str, field: str, kind: str, value: object) -> list[str]:
    """The form's values for one field (a list field gives one per element)."""
    if value is None:
        if not kind.endswith("?"):
            raise InvalidPayload(topic, f"field {field!r} must be {kind}, not null")
        return [""]
    base = kind.rstrip("?")
    if base == "integer" and _is_int(value):
        return [str(value)]
    if base == "integer[]" and isinstance(value, list) and all(_is_int(v) for v in value):
        return [str(v) for v in value]
    if base == "string" and isinstance(value, str):
        if any(sep in value for sep in _SEPARATORS):
            raise InvalidPayload(
                topic,
                f"field {field!r} contains a tab or a line break; Hydra's tab-separated "
                "form cannot carry it",
            )
        return [value]
    raise InvalidPayload(topic, f"field {field!r} must be {kind}, not {type(value).__name__}")


def hydra_values(topic: str, payload: Mapping[str, Any]) -> list[str]:
    """The values of Hydra's form of ``topic``'s ``payload``, in Hydra's order.

    Raises :class:`~herald.errors.UsageError` for a topic with no Hydra form
    (custom and ``herald.*`` topics, unknown names) and
    :class:`~herald.errors.InvalidPayload` (a ``UsageError``) for a payload
    that lacks a field, has one of the wrong type, or a string the form
    cannot carry.
    """
    spec = CATALOGUE.get(topic)
    if spec is None:
        if isinstance(topic, str) and is_custom_topic(topic):
            raise UsageError(f"topic {topic!r} is a custom topic: it has no Hydra form")
        raise UsageError(f"topic {topic!r} is not in the event catalogue: it has no Hydra form")
    values: list[str] = []
    for field, kind in spec.fields:
        if field not in payload:
            raise InvalidPayload(topic, f"missing field {field!r} ({kind})")
        values.extend(_value(topic, field, kind, payload[field]))
    return values


def hydra_form(topic: str, payload: Mapping[str, Any]) -> str:
    """Hydra's ``NOTIFY`` payload for a catalogue event: its values, tab-separated.

    >>> hydra_form("build_finished", {"build_id": 42, "dependent_ids": [43, 44]})
    '42\\t43\\t44'
    >>> hydra_form("step_finished", {"build_id": 42, "step_nr": 1, "log_path": None})
    '42\\t1\\t'

    Raises :class:`~herald.errors.UsageError` where there is no such form
    (see :func:`hydra_values`).
    """
    return "\t".join(hydra_values(topic, payload))
