"""From domain events to log events: every event has a topic the catalogue accepts."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.domain import Aggregate, CanMutateAggregate

from herald.domain import (
    CATALOGUE,
    TOPICS,
    Build,
    Evaluation,
    LogEvent,
    from_log,
    is_custom_topic,
    replay,
    to_log,
    to_log_all,
    validate_event,
    validate_topic,
)
from herald.errors import UsageError

BOOKKEEPING = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def domain_event_classes(aggregate: type[Aggregate]) -> set[type]:
    """The event classes an aggregate defines itself (not the library's base ones)."""
    return {
        value
        for name, value in vars(aggregate).items()
        if isinstance(value, type)
        and issubclass(value, CanMutateAggregate)
        and name not in ("Event", "Created")
    }


def every_event() -> list[Any]:
    """A history in which every event type of both aggregates occurs."""
    events: list[Any] = []
    for end in ("add", "cached", "fail"):
        evaluation = Evaluation(f"trace-{end}", 3)
        if end == "add":
            evaluation.add(10, 5, 2)
        elif end == "cached":
            evaluation.cached(9)
        else:
            evaluation.fail("cannot fetch input 'nixpkgs'")
        events += evaluation.collect_events()
    build = Build(42, 3, "hello", "/nix/store/a.drv", "x86_64-linux", dependencies=[41])
    build.bump(200)
    build.start()
    build.start_step(1, "builder-1")
    build.receive_message("m1", "pass")
    build.finish_step(1, 0, "/var/log/hydra/a.drv.bz2")
    build.wait_for_message()
    build.restart()
    build.cancel()
    dependent = Build(43, 3, "world", "/nix/store/b.drv", "x86_64-linux", dependencies=[42])
    dependent.fail_because_of(42)
    events += build.collect_events()
    events += dependent.collect_events()
    return events


def test_every_domain_event_class_has_a_topic() -> None:
    classes = domain_event_classes(Build) | domain_event_classes(Evaluation)
    assert len(classes) == 16
    assert classes == set(TOPICS)


def test_the_topics() -> None:
    assert {cls.__qualname__: topic for cls, topic in TOPICS.items()} == {
        "Evaluation.Started": "eval_started",
        "Evaluation.Added": "eval_added",
        "Evaluation.Cached": "eval_cached",
        "Evaluation.Failed": "eval_failed",
        "Build.Queued": "build_queued",
        "Build.Started": "build_started",
        "Build.StepStarted": "step_started",
        "Build.StepFinished": "step_finished",
        "Build.Finished": "build_finished",
        "Build.DependencyFailed": "herald.build_dependency_failed",
        "Build.Cancelled": "build_cancelled",
        "Build.Bumped": "build_bumped",
        "Build.Restarted": "build_restarted",
        "Build.WaitingForMessage": "herald.build_waiting",
        "Build.MessageReceived": "build_message_received",
        "Build.MessageApplied": "herald.build_message_applied",
    }
    for topic in TOPICS.values():
        assert validate_topic(topic) == topic
        assert (topic in CATALOGUE) != topic.startswith("herald.")
        assert is_custom_topic(topic) == topic.startswith("herald.")


def test_every_event_maps_to_a_payload_the_catalogue_accepts() -> None:
    events = every_event()
    assert {type(e) for e in events} == set(TOPICS)
    for domain_event in events:
        entry = to_log(domain_event)
        validate_event(entry.topic, entry.payload)
        fields = {f.name for f in dataclasses.fields(domain_event)} - BOOKKEEPING
        assert set(entry.payload) == fields
        if entry.topic in CATALOGUE:
            assert set(CATALOGUE[entry.topic].required) <= set(entry.payload)


def test_every_event_type_occurs_in_the_scenario() -> None:
    seen = {to_log(e).topic for e in every_event()}
    assert seen == set(TOPICS.values())


def test_log_event_carries_the_aggregate_id_version_and_time() -> None:
    build = Build(42, 3, "hello", "/nix/store/a.drv", "x86_64-linux")
    build.start()
    queued, started = build.collect_events()
    first, second = to_log_all([queued, started])
    assert first == LogEvent(
        topic="build_queued",
        payload={
            "build_id": 42,
            "jobset_id": 3,
            "job": "hello",
            "drv_path": "/nix/store/a.drv",
            "system": "x86_64-linux",
            "priority": 100,
            "dependencies": [],
        },
        aggregate_id=str(Build.id_for(42)),
        aggregate_version=1,
        occurred_at=queued.timestamp,
    )
    assert (second.aggregate_version, second.occurred_at) == (2, started.timestamp)
    assert second.occurred_at.tzinfo is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.topic = "other"  # type: ignore[misc]


def test_payload_is_a_copy() -> None:
    build = Build(1, 3, "big", "/nix/store/a.drv", "x86_64-linux")
    build.start()
    build.finish(1, dependent_ids=[2, 3])
    *_, finished = build.collect_events()
    assert isinstance(finished, Build.Finished)
    entry = to_log(finished)
    entry.payload["dependent_ids"].append(99)
    assert finished.dependent_ids == [2, 3]
    assert to_log(finished).payload["dependent_ids"] == [2, 3]


def test_ten_thousand_dependents_pass_the_catalogue() -> None:
    build = Build(1, 3, "big", "/nix/store/a.drv", "x86_64-linux")
    build.finish(1, dependent_ids=list(range(100_000, 110_000)))
    *_, finished = build.collect_events()
    entry = to_log(finished)
    _, delivery, text = validate_event(entry.topic, entry.payload)
    assert delivery == "at_least_once"
    assert len(entry.payload["dependent_ids"]) == 10_000
    assert len(text) > 8000


def test_other_objects_have_no_topic() -> None:
    with pytest.raises(UsageError, match="no log topic for object"):
        to_log(object())


def test_a_build_read_back_from_its_log_events_is_the_same_build() -> None:
    """to_log then from_log/replay: what the unit of work stores is enough to load."""
    build = Build(7, 1, "hello", "/nix/store/x-hello.drv", "x86_64-linux", dependencies=[3])
    build.start()
    build.start_step(1, "builder-1")
    build.finish_step(1, 1, "/log/1")
    build.finish(1, [8, 9])
    build.restart()
    build.receive_message("m1", "pass")
    build.start()
    build.wait_for_message()
    logged = to_log_all(build.collect_events())
    # Through JSON, as the log stores it.
    stored = [
        LogEvent(
            e.topic,
            json.loads(json.dumps(e.payload)),
            e.aggregate_id,
            e.aggregate_version,
            e.occurred_at,
        )
        for e in logged
    ]
    loaded = replay(stored)
    assert loaded is not None
    assert loaded.id == build.id
    assert loaded.version == build.version
    assert loaded.state == build.state == "finished"
    assert loaded.status == build.status == 0
    assert loaded.generation == build.generation == 2
    assert loaded.messages == build.messages
    assert loaded.steps == build.steps
    loaded.restart()
    assert loaded.collect_events()[0].originator_version == build.version + 1


def test_evaluations_read_back_too() -> None:
    evaluation = Evaluation("trace-1", 4)
    evaluation.add(10, 3, 1)
    loaded = replay(to_log_all(evaluation.collect_events()))
    assert (loaded.state, loaded.eval_id, loaded.version) == ("added", 10, 2)


def test_from_log_refuses_foreign_topics() -> None:
    event = LogEvent(
        "acme.deploy", {}, "00000000-0000-0000-0000-000000000001", 1, datetime.now(UTC)
    )
    with pytest.raises(UsageError, match="not a domain event"):
        from_log(event)
    assert replay([]) is None
