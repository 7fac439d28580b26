"""The Evaluation aggregate: started, then added, cached or failed; only once."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest

from herald.domain import Evaluation, to_log_all, validate_event
from herald.errors import InvalidTransition, UsageError

TRACE = "3f9c6f0e-eval"


def state_of(evaluation: Evaluation) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in vars(evaluation).items() if k != "_pending_events"})


def replay(events: list[Any]) -> Evaluation:
    aggregate: Evaluation | None = None
    for domain_event in events:
        aggregate = domain_event.mutate(aggregate)
    assert isinstance(aggregate, Evaluation)
    return aggregate


def test_ids_are_deterministic() -> None:
    expected = uuid5(NAMESPACE_URL, f"herald:eval:{TRACE}")
    assert Evaluation.id_for(TRACE) == expected
    assert Evaluation(TRACE, 5).id == expected


def test_started() -> None:
    evaluation = Evaluation(TRACE, 5)
    [entry] = to_log_all(evaluation.collect_events())
    assert entry.topic == "eval_started"
    assert entry.payload == {"trace_id": TRACE, "jobset_id": 5}
    assert (entry.aggregate_id, entry.aggregate_version) == (str(evaluation.id), 1)
    assert evaluation.state == "running"
    assert (evaluation.eval_id, evaluation.previous_eval_id, evaluation.error) == (None,) * 3


def test_added() -> None:
    evaluation = Evaluation(TRACE, 5)
    evaluation.add(eval_id=900, new_builds=250, cached_builds=4000)
    history = list(evaluation.collect_events())
    entries = to_log_all(history)
    assert [e.topic for e in entries] == ["eval_started", "eval_added"]
    assert entries[1].payload == {
        "trace_id": TRACE,
        "jobset_id": 5,
        "eval_id": 900,
        "new_builds": 250,
        "cached_builds": 4000,
    }
    assert (evaluation.state, evaluation.eval_id) == ("added", 900)
    assert (evaluation.new_builds, evaluation.cached_builds) == (250, 4000)
    assert state_of(replay(history)) == state_of(evaluation)


def test_cached() -> None:
    evaluation = Evaluation(TRACE, 5)
    evaluation.cached(previous_eval_id=899)
    history = list(evaluation.collect_events())
    [_, entry] = to_log_all(history)
    assert entry.topic == "eval_cached"
    assert entry.payload == {"trace_id": TRACE, "jobset_id": 5, "previous_eval_id": 899}
    assert (evaluation.state, evaluation.previous_eval_id) == ("cached", 899)
    assert state_of(replay(history)) == state_of(evaluation)


def test_failed() -> None:
    evaluation = Evaluation(TRACE, 5)
    evaluation.fail("error: attribute 'hello' missing")
    history = list(evaluation.collect_events())
    [_, entry] = to_log_all(history)
    assert entry.topic == "eval_failed"
    assert entry.payload == {
        "trace_id": TRACE,
        "jobset_id": 5,
        "error": "error: attribute 'hello' missing",
    }
    assert (evaluation.state, evaluation.error) == ("failed", "error: attribute 'hello' missing")
    assert state_of(replay(history)) == state_of(evaluation)


ENDS: dict[str, Callable[[Evaluation], None]] = {
    "added": lambda e: e.add(1, 2, 3),
    "cached": lambda e: e.cached(7),
    "failed": lambda e: e.fail("boom"),
}
COMMANDS: dict[str, Callable[[Evaluation], None]] = {
    "add": lambda e: e.add(2, 0, 0),
    "mark as cached": lambda e: e.cached(8),
    "fail": lambda e: e.fail("again"),
}


@pytest.mark.parametrize("end", sorted(ENDS))
def test_payloads_pass_the_catalogue(end: str) -> None:
    evaluation = Evaluation(TRACE, 5)
    ENDS[end](evaluation)
    for entry in to_log_all(evaluation.collect_events()):
        validate_event(entry.topic, entry.payload)


@pytest.mark.parametrize("end", sorted(ENDS))
@pytest.mark.parametrize("attempted", sorted(COMMANDS))
def test_an_evaluation_ends_only_once(end: str, attempted: str) -> None:
    evaluation = Evaluation(TRACE, 5)
    ENDS[end](evaluation)
    evaluation.collect_events()
    before, version = state_of(evaluation), evaluation.version
    with pytest.raises(InvalidTransition) as info:
        COMMANDS[attempted](evaluation)
    error = info.value
    assert (error.aggregate, error.attempted, error.state) == (
        f"evaluation {TRACE}",
        attempted,
        end,
    )
    assert str(error).startswith(f"cannot {attempted} evaluation {TRACE}: it is {end}")
    assert (state_of(evaluation), evaluation.version) == (before, version)
    assert not evaluation.pending_events


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (lambda e: e.add(0, 1, 1), "eval_id must be a positive integer"),
        (lambda e: e.add(1, -1, 1), "new_builds must be a non-negative integer"),
        (lambda e: e.add(1, 1, None), "cached_builds must be a non-negative integer"),
        (lambda e: e.cached(False), "previous_eval_id must be a positive integer"),
        (lambda e: e.fail(""), "error must be a non-empty string"),
    ],
)
def test_bad_arguments_change_nothing(command: Callable[[Evaluation], None], message: str) -> None:
    evaluation = Evaluation(TRACE, 5)
    evaluation.collect_events()
    before = state_of(evaluation)
    with pytest.raises(UsageError, match=message):
        command(evaluation)
    assert state_of(evaluation) == before
    assert not evaluation.pending_events


@pytest.mark.parametrize(
    ("trace_id", "jobset_id", "message"),
    [("", 5, "trace_id must be a non-empty string"), (TRACE, 0, "jobset_id must be a positive")],
)
def test_bad_start_creates_nothing(trace_id: str, jobset_id: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Evaluation(trace_id, jobset_id)
