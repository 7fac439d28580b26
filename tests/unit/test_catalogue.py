"""The event catalogue's validation: topics, payloads, sizes, delivery rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.domain import CATALOGUE, MAX_PAYLOAD_BYTES, validate_event, validate_topic
from herald.domain.catalogue import MAX_TOPIC_LENGTH, topic_filter_pattern_ok
from herald.errors import InvalidPayload, InvalidTopic, PayloadTooLarge, UsageError


@pytest.mark.parametrize(
    "topic", ["build_finished", "step_started", "acme.deploy", "acme.cache.pushed", "a.b2_c"]
)
def test_good_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "empty"),
        ("buld_finished", "not in the event catalogue"),
        ("Build_finished", "snake_case"),
        ("build finished", "snake_case"),
        ("build-finished", "snake_case"),
        ("1build", "snake_case"),
        ("acme.", "snake_case"),
        (".acme", "snake_case"),
        ("acme..x", "snake_case"),
        ("'; drop table herald_events; --", "snake_case"),
        ("a" * (MAX_TOPIC_LENGTH + 1), "longer than"),
    ],
)
def test_bad_topics(topic: str, why: str) -> None:
    with pytest.raises(InvalidTopic, match=why):
        validate_topic(topic)


def test_non_string_topic() -> None:
    with pytest.raises(InvalidTopic, match="string"):
        validate_topic(42)


def test_catalogue_topic_fixes_its_delivery() -> None:
    _, delivery, text = validate_event("build_finished", {"build_id": 1, "dependent_ids": [2]})
    assert delivery == "at_least_once"
    assert json.loads(text) == {"build_id": 1, "dependent_ids": [2]}
    assert validate_event("step_started", {"build_id": 1, "step_nr": 1})[1] == "ephemeral"
    with pytest.raises(InvalidPayload, match="fixed by the catalogue"):
        validate_event("build_finished", {"build_id": 1, "dependent_ids": []}, "ephemeral")


def test_custom_topic_chooses_delivery() -> None:
    assert validate_event("acme.x", {})[1] == "at_least_once"
    assert validate_event("acme.x", {}, "ephemeral")[1] == "ephemeral"
    with pytest.raises(InvalidPayload, match="unknown delivery"):
        validate_event("acme.x", {}, "sometimes")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ([1], "must be a JSON object, not an array"),
        ("x", "not a string"),
        (3, "not a number"),
        (None, "not null"),
        ({"build_id": 1}, "missing field 'dependent_ids'"),
        ({"build_id": "1", "dependent_ids": []}, "'build_id' must be integer, not a string"),
        ({"build_id": True, "dependent_ids": []}, "must be integer, not a boolean"),
        ({"build_id": 1.5, "dependent_ids": []}, "must be integer, not a number"),
        ({"build_id": 1, "dependent_ids": [1, "2"]}, "'dependent_ids' must be integer"),
        ({"build_id": 1, "dependent_ids": None}, "must be integer\\[\\], not null"),
    ],
)
def test_bad_payloads(payload: Any, why: str) -> None:
    with pytest.raises(InvalidPayload, match=why):
        validate_event("build_finished", payload)


def test_nullable_field() -> None:
    ok = {"build_id": 1, "step_nr": 2, "log_path": None}
    assert validate_event("step_finished", ok)[0] == "step_finished"
    with pytest.raises(InvalidPayload, match="log_path"):
        validate_event("step_finished", {"build_id": 1, "step_nr": 2, "log_path": 3})


def test_size_limit_counts_compact_utf8_json() -> None:
    overhead = len('{"s":""}')
    exactly = {"s": "x" * (MAX_PAYLOAD_BYTES - overhead)}
    assert validate_event("acme.big", exactly)
    with pytest.raises(PayloadTooLarge) as info:
        validate_event("acme.big", {"s": "x" * (MAX_PAYLOAD_BYTES - overhead + 1)})
    assert info.value.size == MAX_PAYLOAD_BYTES + 1
    # Multi-byte characters count as their UTF-8 bytes.
    with pytest.raises(PayloadTooLarge):
        validate_event("acme.big", {"s": "é" * (MAX_PAYLOAD_BYTES // 2)})


def test_unserialisable_and_nul_payloads() -> None:
    with pytest.raises(InvalidPayload, match="not serialisable"):
        validate_event("acme.x", {"x": float("nan")})
    with pytest.raises(InvalidPayload, match="not serialisable"):
        validate_event("acme.x", {"x": object()})
    with pytest.raises(InvalidPayload, match="NUL"):
        validate_event("acme.x", {"x": "a\x00b"})


def test_every_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        validate_event("nope", {})


def test_catalogue_matches_the_design() -> None:
    """EVENTS.md's delivery rules, topic by topic."""
    ephemeral = {
        "eval_started",
        "eval_added",
        "eval_cached",
        "eval_failed",
        "build_queued",
        "build_started",
        "step_started",
        "step_finished",
        "builds_added",
    }
    assert {t for t, s in CATALOGUE.items() if s.delivery == "ephemeral"} >= ephemeral
    assert CATALOGUE["build_finished"].delivery == "at_least_once"
    assert CATALOGUE["cached_build_queued"].delivery == "once_per_eval"
    assert CATALOGUE["cached_build_finished"].delivery == "once_per_eval"
    assert [f for f, _ in CATALOGUE["step_finished"].fields] == ["build_id", "step_nr", "log_path"]


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("build_*", True),
        ("*", True),
        ("acme.*", True),
        ("", False),
        ("build-*", False),
        ("%", False),
        ("a" * 101, False),
    ],
)
def test_filter_patterns(pattern: str, ok: bool) -> None:
    assert topic_filter_pattern_ok(pattern) is ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(payload=st.dictionaries(st.text(), json_values, max_size=5))
def test_custom_topics_take_any_object(payload: dict[str, Any]) -> None:
    if any("\x00" in s for s in _strings(payload)):
        with pytest.raises(InvalidPayload):
            validate_event("acme.any", payload)
        return
    _, _, text = validate_event("acme.any", payload)
    assert json.loads(text) == payload


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_lone_surrogates_are_bad_input() -> None:
    """Valid JSON syntax ("\\ud800") that is not valid Unicode."""
    with pytest.raises(InvalidPayload, match="not valid Unicode"):
        validate_event("acme.x", json.loads('{"text": "\\ud800"}'))


@pytest.mark.parametrize(
    ("text", "refused"),
    [("a\x00b", True), ("\\u0000", False), ("\\\x00", True), ("\\\\u0000", False)],
)
def test_only_real_nul_characters_are_refused(text: str, refused: bool) -> None:
    if refused:
        with pytest.raises(InvalidPayload, match="NUL"):
            validate_event("acme.x", {"k": text})
    else:
        assert validate_event("acme.x", {text: text})
