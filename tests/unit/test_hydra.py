"""Hydra's tab-separated form of catalogue events (``herald log --format hydra``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.domain import CATALOGUE, Build, hydra_form, hydra_values, to_log_all, validate_event
from herald.errors import InvalidPayload, UsageError

#: One payload per catalogue topic (with herald's extra fields where the domain adds
#: them) and the form Hydra would have sent for it.
EXAMPLES: dict[str, tuple[dict[str, Any], str]] = {
    "eval_started": ({"trace_id": "t-1", "jobset_id": 7}, "t-1\t7"),
    "eval_added": ({"trace_id": "t-1", "jobset_id": 7, "eval_id": 3, "new_builds": 2}, "t-1\t7\t3"),
    "eval_cached": ({"trace_id": "t-2", "jobset_id": 7, "previous_eval_id": 3}, "t-2\t7\t3"),
    "eval_failed": ({"trace_id": "t-3", "jobset_id": 7, "error": "no such attr"}, "t-3\t7"),
    "build_queued": ({"build_id": 42, "job": "hello", "priority": 100}, "42"),
    # Hydra: "the ID of the evaluation which contains the finished build, followed by
    # the ID of the finished build"; the same order for the queued one.
    "cached_build_queued": ({"eval_id": 3, "build_id": 42}, "3\t42"),
    "cached_build_finished": ({"build_id": 42, "eval_id": 3}, "3\t42"),
    "build_started": ({"build_id": 42, "generation": 1}, "42"),
    "step_started": ({"build_id": 42, "step_nr": 1, "machine": "m1"}, "42\t1"),
    # Hydra: "the ID of the build which the step is part of, the step number, and the
    # path on disk to the log file".
    "step_finished": (
        {"build_id": 42, "step_nr": 2, "log_path": "/nix/var/log/nix/drvs/ab/c.drv.bz2"},
        "42\t2\t/nix/var/log/nix/drvs/ab/c.drv.bz2",
    ),
    # Hydra: "the ID of the build which finished, followed by IDs of all of the builds
    # which also depended upon this build".
    "build_finished": (
        {"build_id": 42, "dependent_ids": [43, 44], "status": 1, "generation": 1},
        "42\t43\t44",
    ),
    "builds_added": ({"build_id": 40}, "40"),
    "build_restarted": ({"build_id": 42, "generation": 2, "stale_message_ids": []}, "42"),
    "build_cancelled": ({"build_id": 42, "generation": 1}, "42"),
    "build_bumped": ({"build_id": 42, "priority": 500}, "42\t500"),
    "build_message_received": (
        {"build_id": 42, "message_id": "m1", "type": "pass", "state": "applied"},
        "42\tpass",
    ),
}


def test_every_catalogue_topic_has_an_example() -> None:
    assert set(EXAMPLES) == set(CATALOGUE)


@pytest.mark.parametrize("topic", sorted(EXAMPLES))
def test_the_form_of_every_catalogue_topic(topic: str) -> None:
    payload, expected = EXAMPLES[topic]
    validate_event(topic, payload)  # the examples are payloads the log accepts
    assert hydra_form(topic, payload) == expected
    assert hydra_values(topic, payload) == expected.split("\t")


@pytest.mark.parametrize("topic", sorted(EXAMPLES))
def test_the_form_follows_the_catalogue_order(topic: str) -> None:
    """The payload's own key order does not matter: the catalogue's does."""
    payload, expected = EXAMPLES[topic]
    assert hydra_form(topic, dict(reversed(payload.items()))) == expected


def test_build_finished_without_dependents_is_one_value() -> None:
    assert hydra_form("build_finished", {"build_id": 42, "dependent_ids": []}) == "42"


def test_build_finished_with_ten_thousand_dependents() -> None:
    dependents = list(range(1000, 11000))
    form = hydra_form("build_finished", {"build_id": 42, "dependent_ids": dependents})
    values = form.split("\t")
    assert len(values) == 10_001
    assert values[0] == "42"
    assert [int(v) for v in values[1:]] == dependents


def test_null_is_the_empty_string() -> None:
    form = hydra_form("step_finished", {"build_id": 42, "step_nr": 1, "log_path": None})
    assert form == "42\t1\t"
    assert form.split("\t") == ["42", "1", ""]


@pytest.mark.parametrize(
    "topic",
    ["acme.deploy_started", "herald.build_waiting", "herald.build_dependency_failed", "a.b.c"],
)
def test_custom_topics_have_no_hydra_form(topic: str) -> None:
    with pytest.raises(UsageError, match="custom topic: it has no Hydra form"):
        hydra_form(topic, {"build_id": 42})


def test_unknown_topics_have_no_hydra_form() -> None:
    with pytest.raises(UsageError, match="not in the event catalogue"):
        hydra_form("build_finshed", {"build_id": 42, "dependent_ids": []})


@pytest.mark.parametrize(
    ("topic", "payload", "problem"),
    [
        ("build_finished", {"build_id": 42}, "missing field 'dependent_ids'"),
        ("build_finished", {"build_id": "42", "dependent_ids": []}, "'build_id' must be integer"),
        ("build_finished", {"build_id": True, "dependent_ids": []}, "'build_id' must be integer"),
        ("build_finished", {"build_id": 42, "dependent_ids": [1, "2"]}, "'dependent_ids'"),
        ("build_finished", {"build_id": 42, "dependent_ids": None}, "not null"),
        ("step_started", {"build_id": 42, "step_nr": None}, "not null"),
        ("step_finished", {"build_id": 42, "step_nr": 1, "log_path": 7}, "'log_path'"),
        ("eval_started", {"trace_id": "a\tb", "jobset_id": 1}, "tab or a line break"),
        ("eval_started", {"trace_id": "a\nb", "jobset_id": 1}, "tab or a line break"),
    ],
)
def test_payloads_without_a_faithful_form_are_refused(
    topic: str, payload: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidPayload, match=problem):
        hydra_form(topic, payload)


def test_the_forms_of_a_build_s_domain_events() -> None:
    """Every event a build's life appends: catalogue topics render, herald.* do not."""
    build = Build(42, 1, "hello", "/nix/store/x-hello.drv", "x86_64-linux")
    build.start()
    build.start_step(1, "builder-1")
    build.finish_step(1, 0, "/log/1")
    build.wait_for_message()
    build.receive_message("m1", "pass")
    forms: list[tuple[str, str | None]] = []
    for event in to_log_all(build.collect_events()):
        try:
            forms.append((event.topic, hydra_form(event.topic, event.payload)))
        except UsageError:
            forms.append((event.topic, None))
    assert forms == [
        ("build_queued", "42"),
        ("build_started", "42"),
        ("step_started", "42\t1"),
        ("step_finished", "42\t1\t/log/1"),
        ("herald.build_waiting", None),
        ("build_message_received", "42\tpass"),
        ("build_finished", "42"),
    ]


_ids = st.integers(min_value=1, max_value=2**62)


@given(build_id=_ids, dependents=st.lists(_ids, max_size=50))
def test_build_finished_round_trips(build_id: int, dependents: list[int]) -> None:
    form = hydra_form("build_finished", {"build_id": build_id, "dependent_ids": dependents})
    first, *rest = form.split("\t")
    assert int(first) == build_id
    assert [int(v) for v in rest] == dependents


@given(
    log_path=st.none()
    | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\t\r\n"))
)
def test_step_finished_round_trips(log_path: str | None) -> None:
    form = hydra_form("step_finished", {"build_id": 1, "step_nr": 0, "log_path": log_path})
    assert form.split("\t") == ["1", "0", log_path or ""]
