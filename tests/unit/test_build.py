"""The Build aggregate: commands, their events and log topics, refusals, messages, replay."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest

from herald.domain import Build, validate_event
from herald.domain.build import STATUS_NAMES, STEP_STATUS_NAMES, MessageType, status_text
from herald.domain.log import LogEvent, to_log_all
from herald.errors import InvalidTransition, UsageError

DRV = "/nix/store/abc-hello-2.12.drv"


def new_build(build_id: int = 42, **kwargs: Any) -> Build:
    """A queued build, its ``build_queued`` already collected."""
    build = Build(build_id, 7, "hello.x86_64-linux", DRV, "x86_64-linux", **kwargs)
    build.collect_events()
    return build


def drain(build: Build) -> list[LogEvent]:
    """The build's new events as log events."""
    return to_log_all(build.collect_events())


def topics(build: Build) -> list[str]:
    return [entry.topic for entry in drain(build)]


def replay(events: Iterable[Any]) -> Build:
    """A fresh aggregate from events alone, as a repository would rebuild it."""
    aggregate: Build | None = None
    for domain_event in events:
        aggregate = domain_event.mutate(aggregate)
    assert isinstance(aggregate, Build)
    return aggregate


def state_of(build: Build) -> dict[str, Any]:
    """Everything the aggregate holds except its pending (unsaved) events."""
    return copy.deepcopy({k: v for k, v in vars(build).items() if k != "_pending_events"})


def running(build_id: int = 42) -> Build:
    build = new_build(build_id)
    build.start()
    build.collect_events()
    return build


def waiting(build_id: int = 42) -> Build:
    build = running(build_id)
    build.wait_for_message()
    build.collect_events()
    return build


def finished(status: int = 1) -> Build:
    build = running()
    build.finish(status)
    build.collect_events()
    return build


def cancelled() -> Build:
    build = new_build()
    build.cancel()
    build.collect_events()
    return build


# -- identity and creation ------------------------------------------------------------


def test_ids_are_deterministic() -> None:
    expected = uuid5(NAMESPACE_URL, "herald:build:42")
    assert Build.id_for(42) == expected
    assert Build.create_id(42) == expected
    assert Build(42, 7, "hello", DRV, "x86_64-linux").id == expected
    assert Build.id_for(43) != expected


def test_queue_records_build_queued() -> None:
    build = Build(42, 7, "hello.x86_64-linux", DRV, "x86_64-linux", dependencies=(40, 41))
    [queued] = build.collect_events()
    assert isinstance(queued, Build.Queued)
    [entry] = to_log_all([queued])
    assert entry.topic == "build_queued"
    assert entry.payload == {
        "build_id": 42,
        "jobset_id": 7,
        "job": "hello.x86_64-linux",
        "drv_path": DRV,
        "system": "x86_64-linux",
        "priority": 100,
        "dependencies": [40, 41],
    }
    assert (entry.aggregate_id, entry.aggregate_version) == (str(build.id), 1)
    assert (build.state, build.status, build.generation) == ("queued", None, 1)
    assert build.dependencies == [40, 41]
    assert (build.steps, build.messages, build.substituted) == ({}, {}, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"build_id": 0}, "build_id must be a positive integer"),
        ({"build_id": True}, "build_id must be a positive integer"),
        ({"jobset_id": -1}, "jobset_id must be a positive integer"),
        ({"job": ""}, "job must be a non-empty string"),
        ({"drv_path": None}, "drv_path must be a non-empty string"),
        ({"system": 3}, "system must be a non-empty string"),
        ({"priority": "high"}, "priority must be an integer"),
        ({"dependencies": [42]}, "must not contain the build itself"),
        ({"dependencies": [5, 5]}, "lists build 5 twice"),
        ({"dependencies": "12"}, "dependencies must be a list of build ids"),
        ({"dependencies": [0]}, "each of dependencies must be a positive integer"),
    ],
)
def test_queue_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "build_id": 42,
        "jobset_id": 7,
        "job": "hello",
        "drv_path": DRV,
        "system": "x86_64-linux",
        **kwargs,
    }
    with pytest.raises(UsageError, match=message):
        Build(**arguments)


# -- the happy paths ------------------------------------------------------------------


def test_build_runs_steps_and_finishes() -> None:
    build = new_build()
    build.start()
    build.start_step(1, "builder-1")
    build.finish_step(1, 0, "/var/log/hydra/1.drv.bz2")
    build.start_step(2, "builder-2")
    build.finish_step(2, 0)
    build.finish(0)
    entries = drain(build)
    assert [e.topic for e in entries] == [
        "build_started",
        "step_started",
        "step_finished",
        "step_started",
        "step_finished",
        "build_finished",
    ]
    assert [e.payload for e in entries] == [
        {"build_id": 42, "generation": 1},
        {"build_id": 42, "step_nr": 1, "machine": "builder-1", "generation": 1},
        {
            "build_id": 42,
            "step_nr": 1,
            "status": 0,
            "log_path": "/var/log/hydra/1.drv.bz2",
            "generation": 1,
        },
        {"build_id": 42, "step_nr": 2, "machine": "builder-2", "generation": 1},
        {"build_id": 42, "step_nr": 2, "status": 0, "log_path": None, "generation": 1},
        {
            "build_id": 42,
            "dependent_ids": [],
            "status": 0,
            "generation": 1,
            "substituted": False,
        },
    ]
    assert [e.aggregate_version for e in entries] == [2, 3, 4, 5, 6, 7]
    assert (build.state, build.status, build.substituted) == ("finished", 0, False)
    assert build.steps == {
        1: {
            "machine": "builder-1",
            "status": 0,
            "log_path": "/var/log/hydra/1.drv.bz2",
            "finished": True,
        },
        2: {"machine": "builder-2", "status": 0, "log_path": None, "finished": True},
    }


def test_a_step_can_fail_with_a_steps_only_status() -> None:
    build = running()
    build.start_step(0, "builder-1")
    build.finish_step(0, 8)  # Hydra's "cached failure", for steps only
    build.finish(1)
    assert topics(build) == ["step_started", "step_finished", "build_finished"]
    assert STEP_STATUS_NAMES[8] == "cached failure"
    assert 8 not in STATUS_NAMES


def test_finish_from_queued_means_substituted() -> None:
    build = new_build()
    build.finish(0)
    [entry] = drain(build)
    assert entry.topic == "build_finished"
    assert entry.payload["substituted"] is True
    assert (build.state, build.status, build.substituted) == ("finished", 0, True)


def test_a_failure_lists_its_dependents_and_they_fail_because_of_it() -> None:
    failing = running(42)
    dependents = [new_build(43, dependencies=[42]), new_build(44, dependencies=[43])]
    failing.finish(1, dependent_ids=[43, 44])
    for dependent in dependents:
        dependent.fail_because_of(42)
    [finished_entry] = drain(failing)
    assert finished_entry.topic == "build_finished"
    assert finished_entry.payload["dependent_ids"] == [43, 44]
    for dependent in dependents:
        [entry] = drain(dependent)
        assert entry.topic == "herald.build_dependency_failed"
        assert entry.payload == {
            "build_id": dependent.build_id,
            "failed_build_id": 42,
            "generation": 1,
        }
        assert (dependent.state, dependent.status) == ("finished", 2)


@pytest.mark.parametrize("make", [new_build, running, waiting])
def test_cancel(make: Callable[[], Build]) -> None:
    build = make()
    build.cancel()
    [entry] = drain(build)
    assert entry.topic == "build_cancelled"
    assert entry.payload == {"build_id": 42, "generation": 1}
    assert (build.state, build.status) == ("cancelled", 4)


@pytest.mark.parametrize("make", [new_build, running, waiting])
def test_bump(make: Callable[[], Build]) -> None:
    build = make()
    state = build.state
    build.bump(500)
    [entry] = drain(build)
    assert entry.topic == "build_bumped"
    assert entry.payload == {"build_id": 42, "priority": 500}
    assert (build.priority, build.state) == (500, state)


def test_restart_starts_a_new_generation() -> None:
    build = running()
    build.start_step(1, "builder-1")
    build.finish_step(1, 1)
    build.finish(1)
    build.restart()
    [*_, entry] = drain(build)
    assert entry.topic == "build_restarted"
    assert entry.payload == {"build_id": 42, "generation": 2, "stale_message_ids": []}
    assert (build.state, build.status, build.generation) == ("queued", None, 2)
    assert (build.steps, build.substituted) == ({}, False)


def test_fail_restart_succeed_gives_two_build_finished_in_order() -> None:
    build = new_build()
    build.start()
    build.finish(1)
    build.restart()
    build.start()
    build.finish(0)
    history = list(build.collect_events())
    entries = [e for e in to_log_all(history) if e.topic == "build_finished"]
    assert [e.payload["status"] for e in entries] == [1, 0]
    assert [e.payload["generation"] for e in entries] == [1, 2]
    assert entries[0].aggregate_version < entries[1].aggregate_version
    assert [type(e) for e in history] == [
        Build.Started,
        Build.Finished,
        Build.Restarted,
        Build.Started,
        Build.Finished,
    ]


def test_finish_with_ten_thousand_dependents_round_trips() -> None:
    build = Build(1, 7, "big", DRV, "x86_64-linux")
    build.start()
    dependents = list(range(2, 10_002))
    build.finish(1, dependent_ids=dependents)
    history = list(build.collect_events())
    assert replay(history) == build
    assert state_of(replay(history)) == state_of(build)
    entry = to_log_all(history)[-1]
    assert entry.payload["dependent_ids"] == dependents
    topic, delivery, text = validate_event(entry.topic, entry.payload)
    assert (topic, delivery) == ("build_finished", "at_least_once")
    assert len(text.encode()) > 8000  # Hydra's NOTIFY broke at 8000 bytes


def test_ids_may_come_from_any_sequence() -> None:
    build = running()
    build.finish(1, dependent_ids=range(100, 103))
    [entry] = drain(build)
    assert entry.payload["dependent_ids"] == [100, 101, 102]


# -- refusals change nothing ----------------------------------------------------------


def _refused(
    build: Build, command: Callable[[Build], object], error: type[Exception]
) -> pytest.ExceptionInfo[Exception]:
    assert not build.pending_events
    before, version = state_of(build), build.version
    with pytest.raises(error) as info:
        command(build)
    assert state_of(build) == before
    assert build.version == version
    assert not build.pending_events
    return info


@pytest.mark.parametrize(
    ("make", "command", "attempted", "state", "says"),
    [
        (finished, lambda b: b.finish(0), "finish", "finished", "status 1, failed"),
        (cancelled, lambda b: b.start_step(1, "m"), "start a step of", "cancelled", ""),
        (running, lambda b: b.start(), "start", "running", "only a queued build can start"),
        (waiting, lambda b: b.finish(0), "finish", "waiting", "pass or fail message"),
        (new_build, lambda b: b.restart(), "restart", "queued", "finished or cancelled"),
        (running, lambda b: b.fail_because_of(7), "mark as dependency failed", "running", ""),
        (finished, lambda b: b.cancel(), "cancel", "finished", ""),
        (cancelled, lambda b: b.cancel(), "cancel", "cancelled", ""),
        (finished, lambda b: b.bump(5), "bump", "finished", ""),
        (new_build, lambda b: b.start_step(1, "m"), "start a step of", "queued", ""),
        (running, lambda b: b.finish_step(1, 0), "finish a step of", "running", "not started"),
        (new_build, lambda b: b.wait_for_message(), "wait for a message on", "queued", ""),
        (waiting, lambda b: b.wait_for_message(), "wait for a message on", "waiting", ""),
        (waiting, lambda b: b.start(), "start", "waiting", ""),
    ],
)
def test_invalid_transitions_say_what_and_change_nothing(
    make: Callable[[], Build],
    command: Callable[[Build], object],
    attempted: str,
    state: str,
    says: str,
) -> None:
    info = _refused(make(), command, InvalidTransition)
    error = info.value
    assert isinstance(error, InvalidTransition)
    assert (error.aggregate, error.attempted, error.state) == ("build 42", attempted, state)
    assert str(error).startswith(f"cannot {attempted} build 42: it is {state}")
    assert says in str(error)


def test_steps_must_be_new_finished_once_and_done_before_finish() -> None:
    build = running()
    build.start_step(1, "m")
    build.collect_events()
    assert "step 1 was already started" in str(
        _refused(build, lambda b: b.start_step(1, "m"), InvalidTransition).value
    )
    assert "step 1 is still running" in str(
        _refused(build, lambda b: b.finish(0), InvalidTransition).value
    )
    assert "step 1 is still running" in str(
        _refused(build, lambda b: b.wait_for_message(), InvalidTransition).value
    )
    build.finish_step(1, 0)
    build.collect_events()
    assert "step 1 already finished" in str(
        _refused(build, lambda b: b.finish_step(1, 0), InvalidTransition).value
    )


def test_a_dependency_failed_build_finishes_no_more() -> None:
    build = new_build()
    build.fail_because_of(40)
    build.collect_events()
    error = _refused(build, lambda b: b.finish(0), InvalidTransition).value
    assert str(error) == "cannot finish build 42: it is finished (status 2, dependency failed)"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (lambda b: b.finish(5), "unknown Hydra status code 5"),
        (lambda b: b.finish(-1), "unknown Hydra status code -1"),
        (lambda b: b.finish(True), "unknown Hydra status code True"),
        (lambda b: b.finish(4), "cancel()"),
        (lambda b: b.finish(0, [43]), "a succeeded build has no dependents"),
        (lambda b: b.finish(1, [42]), "must not contain the build itself"),
        (lambda b: b.finish(1, [43, 43]), "lists build 43 twice"),
        (lambda b: b.finish(1, ["43"]), "each of dependent_ids must be a positive integer"),
        (lambda b: b.start_step(-1, "m"), "step number must be a non-negative integer"),
        (lambda b: b.start_step(1, ""), "machine must be a non-empty string"),
        (lambda b: b.finish_step(-3, 0), "step number must be a non-negative integer"),
        (lambda b: b.finish_step(1, 99), "unknown Hydra status code 99"),
        (lambda b: b.finish_step(1, 0, ""), "log_path must be a non-empty string"),
        (lambda b: b.fail_because_of(0), "failed_build_id must be a positive integer"),
        (lambda b: b.fail_because_of(42), "cannot fail because of itself"),
        (lambda b: b.bump(1.5), "priority must be an integer"),
        (lambda b: b.receive_message("m1", "maybe"), "pass, fail, work"),
        (lambda b: b.receive_message("", "pass"), "message_id must be a non-empty string"),
        (lambda b: b.receive_message("m1", "pass", 0), "generation must be a positive integer"),
    ],
)
def test_bad_arguments_are_usage_errors_and_change_nothing(
    command: Callable[[Build], object], message: str
) -> None:
    info = _refused(running(), command, UsageError)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_status_text() -> None:
    assert status_text(1) == "status 1, failed"
    assert status_text(None) == "no status"
    assert STATUS_NAMES[12] == "not deterministic"


# -- Harbormaster's messages ----------------------------------------------------------


@pytest.mark.parametrize(("message_type", "status"), [("pass", 0), ("fail", 1)])
@pytest.mark.parametrize("make", [new_build, running])
def test_message_before_wait_is_kept_and_applied_when_it_waits(
    make: Callable[[], Build], message_type: MessageType, status: int
) -> None:
    build = make()
    assert build.receive_message("m1", message_type) == "pending"
    [received] = drain(build)
    assert received.topic == "build_message_received"
    assert received.payload == {
        "build_id": 42,
        "message_id": "m1",
        "type": message_type,
        "generation": 1,
        "state": "pending",
        "reason": None,
    }
    if build.state == "queued":
        build.start()
        build.collect_events()
    build.wait_for_message()
    entries = drain(build)
    assert [e.topic for e in entries] == [
        "herald.build_waiting",
        "herald.build_message_applied",
        "build_finished",
    ]
    assert entries[0].payload == {"build_id": 42, "generation": 1}
    assert entries[1].payload == {
        "build_id": 42,
        "message_id": "m1",
        "type": message_type,
        "generation": 1,
    }
    assert entries[2].payload["status"] == status
    assert (build.state, build.status) == ("finished", status)
    assert build.messages["m1"]["state"] == "applied"


@pytest.mark.parametrize(("message_type", "status"), [("pass", 0), ("fail", 1)])
def test_message_to_a_waiting_build_is_applied_at_once(
    message_type: MessageType, status: int
) -> None:
    build = waiting()
    assert build.receive_message("m1", message_type) == "applied"
    entries = drain(build)
    assert [e.topic for e in entries] == ["build_message_received", "build_finished"]
    assert entries[0].payload["state"] == "applied"
    assert entries[1].payload == {
        "build_id": 42,
        "dependent_ids": [],
        "status": status,
        "generation": 1,
        "substituted": False,
    }


def test_pass_after_fail_is_ignored_with_the_reason() -> None:
    build = waiting()
    assert build.receive_message("m1", "fail") == "applied"
    build.collect_events()
    assert build.receive_message("m2", "pass") == "ignored"
    [entry] = drain(build)
    assert entry.topic == "build_message_received"
    assert entry.payload["state"] == "ignored"
    assert entry.payload["reason"] == "build already finished with status 1"
    assert (build.state, build.status) == ("finished", 1)
    assert build.messages["m2"] == {
        "type": "pass",
        "generation": 1,
        "state": "ignored",
        "reason": "build already finished with status 1",
    }


def test_message_to_a_cancelled_build_is_ignored() -> None:
    build = cancelled()
    assert build.receive_message("m1", "pass") == "ignored"
    assert build.messages["m1"]["reason"] == "build already cancelled"


def test_message_to_an_old_generation_is_stale() -> None:
    build = waiting()
    build.receive_message("m1", "fail")
    build.restart()
    build.collect_events()
    assert build.receive_message("m2", "pass", generation=1) == "stale"
    [entry] = drain(build)
    assert entry.payload["state"] == "stale"
    assert entry.payload["generation"] == 1
    assert (build.state, build.generation) == ("queued", 2)


@pytest.mark.parametrize(
    ("end", "status"),
    [
        (lambda b: b.cancel(), "status 4, cancelled"),
        (lambda b: b.finish(1), "status 1, failed"),
    ],
)
def test_pending_messages_are_ignored_when_the_build_ends_without_waiting(
    end: Any, status: str
) -> None:
    """No message stays pending: a build that ends without waiting settles them."""
    build = running()
    build.receive_message("m1", "work")
    build.receive_message("m2", "pass")
    end(build)
    reason = f"the build ended ({status}) before it waited for a message"
    assert {m: (v["state"], v["reason"]) for m, v in build.messages.items()} == {
        "m1": ("ignored", reason),
        "m2": ("ignored", reason),
    }
    build.restart()
    entries = drain(build)
    assert entries[-1].topic == "build_restarted"
    assert entries[-1].payload["stale_message_ids"] == []
    build.start()
    build.wait_for_message()
    assert [e.topic for e in drain(build)] == ["build_started", "herald.build_waiting"]
    assert build.state == "waiting"


def test_a_dependency_failure_settles_pending_messages() -> None:
    build = Build(5, 1, "j", DRV, "x86_64-linux", dependencies=[4])
    build.receive_message("m", "pass")
    build.fail_because_of(4)
    assert build.messages["m"]["state"] == "ignored"
    assert "dependency failed" in (build.messages["m"]["reason"] or "")


def test_message_to_a_future_generation_is_ignored() -> None:
    build = running()
    assert build.receive_message("m1", "pass", generation=2) == "ignored"
    assert build.messages["m1"]["reason"] == (
        "generation 2 does not exist; the build is at generation 1"
    )


def test_the_same_message_twice_changes_nothing() -> None:
    build = waiting()
    assert build.receive_message("m1", "pass") == "applied"
    build.collect_events()
    before, version = state_of(build), build.version
    assert build.receive_message("m1", "pass") == "applied"
    assert build.receive_message("m1", "fail") == "applied"
    assert not build.pending_events
    assert (state_of(build), build.version) == (before, version)


def test_a_pending_message_received_again_stays_pending_once() -> None:
    build = running()
    assert build.receive_message("m1", "pass") == "pending"
    assert build.receive_message("m1", "pass") == "pending"
    assert topics(build) == ["build_message_received"]
    build.wait_for_message()
    assert topics(build) == [
        "herald.build_waiting",
        "herald.build_message_applied",
        "build_finished",
    ]
    assert build.receive_message("m1", "pass") == "applied"
    assert not build.pending_events


def test_work_keeps_it_waiting() -> None:
    build = running()
    assert build.receive_message("w1", "work") == "pending"
    build.collect_events()
    build.wait_for_message()
    assert topics(build) == ["herald.build_waiting", "herald.build_message_applied"]
    assert build.state == "waiting"
    assert build.receive_message("w2", "work") == "applied"
    assert topics(build) == ["build_message_received"]
    assert build.state == "waiting"
    assert build.receive_message("p1", "pass") == "applied"
    assert topics(build) == ["build_message_received", "build_finished"]
    assert (build.state, build.status) == ("finished", 0)


def test_the_first_pending_decision_wins() -> None:
    build = running()
    assert build.receive_message("m1", "fail") == "pending"
    assert build.receive_message("m2", "pass") == "ignored"
    assert build.receive_message("m3", "work") == "ignored"
    assert build.messages["m2"]["reason"] == (
        "a fail message (m1) is already pending for generation 1"
    )
    build.wait_for_message()
    assert (build.state, build.status) == ("finished", 1)
    assert [m["state"] for m in build.messages.values()] == ["applied", "ignored", "ignored"]


def test_pending_work_then_pass_are_applied_in_order() -> None:
    build = running()
    build.receive_message("w1", "work")
    build.receive_message("p1", "pass")
    build.collect_events()
    build.wait_for_message()
    history = list(build.collect_events())
    assert [type(e) for e in history] == [
        Build.WaitingForMessage,
        Build.MessageApplied,
        Build.MessageApplied,
        Build.Finished,
    ]
    assert [e.message_id for e in history if isinstance(e, Build.MessageApplied)] == [
        "w1",
        "p1",
    ]


# -- replay ---------------------------------------------------------------------------


def _everything(build: Build) -> None:
    build.bump(10)
    build.receive_message("early", "work")
    build.start()
    build.start_step(1, "builder-1")
    build.finish_step(1, 0, "/var/log/1")
    build.wait_for_message()
    build.receive_message("late", "fail")
    build.restart()
    build.receive_message("old", "pass", generation=1)
    build.receive_message("gen2", "pass")
    build.cancel()
    build.restart()
    build.finish(0)


def test_replaying_the_events_rebuilds_the_same_build() -> None:
    build = Build(42, 7, "hello", DRV, "x86_64-linux", priority=3, dependencies=[1, 2])
    _everything(build)
    history: Sequence[Any] = build.collect_events()
    rebuilt = replay(history)
    assert state_of(rebuilt) == state_of(build)
    assert rebuilt.version == len(history) == build.version
    assert rebuilt.messages == build.messages
    # Pending when the build was cancelled: ignored, with the reason.
    assert build.messages["gen2"]["state"] == "ignored"
    assert "before it waited" in (build.messages["gen2"]["reason"] or "")
