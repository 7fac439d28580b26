"""A rule-based state machine on the Build aggregate (hypothesis).

Every command is driven with arbitrary arguments, including ones that must
fail. The machine predicts from the build's state before the command whether
it applies, is a bad argument (:class:`UsageError`) or does not fit the
state (:class:`InvalidTransition`). Applied: the expected event types, a
coherent state. Refused: nothing changed (state, version, no new pending
event). After every step, replaying all events collected so far on a fresh
aggregate gives the live build exactly, and every event maps to a log topic
whose payload the catalogue accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from herald.domain import Build, to_log, validate_event
from herald.domain.build import (
    ACTIVE_STATES,
    BUILD_STATES,
    MESSAGE_STATES,
    STATUS_NAMES,
    STEP_STATUS_NAMES,
    MessageState,
)
from herald.errors import HeraldError, InvalidTransition, UsageError

MESSAGE_IDS = st.sampled_from(["m1", "m2", "m3", "m4", "m5", "m6", ""])
MESSAGE_TYPES = st.sampled_from(["pass", "fail", "work", "maybe"])
STATUSES = st.integers(-1, 13)
DECISIVE = {"pass": 0, "fail": 1}


def state_of(build: Build) -> dict[str, Any]:
    """Everything the aggregate holds except its pending (unsaved) events."""
    return copy.deepcopy({k: v for k, v in vars(build).items() if k != "_pending_events"})


def expected(usage: bool, transition: bool) -> type[HeraldError] | None:
    """The error a command must raise: bad arguments are checked before the state."""
    if usage:
        return UsageError
    if transition:
        return InvalidTransition
    return None


class BuildMachine(RuleBasedStateMachine):
    """Drives one build through random commands."""

    def __init__(self) -> None:
        super().__init__()
        self.build: Build = Build(1, 1, "init", "/nix/store/init.drv", "x86_64-linux")
        self.history: list[Any] = []

    @initialize(
        build_id=st.integers(1, 60),
        priority=st.integers(-100, 1000),
        dependencies=st.lists(st.integers(1, 60), unique=True, max_size=4),
    )
    def queue(self, build_id: int, priority: int, dependencies: list[int]) -> None:
        if build_id in dependencies:
            with pytest.raises(UsageError):
                Build(
                    build_id, 3, "job", "/nix/store/x.drv", "x86_64-linux", priority, dependencies
                )
            dependencies = [d for d in dependencies if d != build_id]
        self.build = Build(
            build_id, 3, "job", "/nix/store/x.drv", "x86_64-linux", priority, dependencies
        )
        self.history = []
        self._check(self.build.collect_events(), [Build.Queued])
        assert (self.build.state, self.build.priority) == ("queued", priority)

    # -- helpers ----------------------------------------------------------------------

    def attempt(self, command: Callable[[], object], error: type[HeraldError] | None) -> Any:
        """Run ``command``; if it must fail, check it raised ``error`` and changed nothing."""
        build = self.build
        assert not build.pending_events
        if error is not None:
            before, version = state_of(build), build.version
            with pytest.raises(error):
                command()
            assert state_of(build) == before
            assert build.version == version
            assert not build.pending_events
            return None
        return command()

    def _check(self, events: Sequence[Any], types: list[type]) -> list[Any]:
        """The new events are exactly ``types``, in order; record them."""
        assert [type(e) for e in events] == [getattr(Build, t.__name__) for t in types]
        for domain_event in events:
            entry = to_log(domain_event)
            validate_event(entry.topic, entry.payload)
            assert entry.payload.get("build_id") == self.build.build_id
        self.history.extend(events)
        return list(events)

    def collected(self, types: list[type]) -> list[Any]:
        return self._check(self.build.collect_events(), types)

    @property
    def unfinished(self) -> bool:
        return any(not step["finished"] for step in self.build.steps.values())

    # -- rules ------------------------------------------------------------------------

    @rule()
    def start(self) -> None:
        error = expected(False, self.build.state != "queued")
        self.attempt(self.build.start, error)
        if error is None:
            self.collected([Build.Started])
            assert self.build.state == "running"

    @rule(step_nr=st.integers(-2, 5), machine=st.sampled_from(["builder-1", "builder-2", ""]))
    def start_step(self, step_nr: int, machine: str) -> None:
        error = expected(
            step_nr < 0 or not machine,
            self.build.state != "running" or step_nr in self.build.steps,
        )
        self.attempt(lambda: self.build.start_step(step_nr, machine), error)
        if error is None:
            self.collected([Build.StepStarted])
            assert self.build.steps[step_nr] == {
                "machine": machine,
                "status": None,
                "log_path": None,
                "finished": False,
            }

    @rule(
        step_nr=st.integers(-1, 5),
        status=STATUSES,
        log_path=st.none() | st.just("/var/log/hydra/x.drv.bz2"),
    )
    def finish_step(self, step_nr: int, status: int, log_path: str | None) -> None:
        step = self.build.steps.get(step_nr)
        error = expected(
            step_nr < 0 or status not in STEP_STATUS_NAMES,
            self.build.state != "running" or step is None or step["finished"],
        )
        self.attempt(lambda: self.build.finish_step(step_nr, status, log_path), error)
        if error is None:
            self.collected([Build.StepFinished])
            assert self.build.steps[step_nr]["finished"]
            assert self.build.steps[step_nr]["status"] == status

    @rule(status=STATUSES, dependent_ids=st.lists(st.integers(0, 60), max_size=5))
    def finish(self, status: int, dependent_ids: list[int]) -> None:
        build = self.build
        usage = (
            status not in STATUS_NAMES
            or status == 4
            or (status == 0 and bool(dependent_ids))
            or build.build_id in dependent_ids
            or 0 in dependent_ids
            or len(set(dependent_ids)) != len(dependent_ids)
        )
        fits = build.state == "queued" or (build.state == "running" and not self.unfinished)
        was_queued = build.state == "queued"
        error = expected(usage, not fits)
        self.attempt(lambda: build.finish(status, dependent_ids), error)
        if error is None:
            [finished] = self.collected([Build.Finished])
            assert finished.dependent_ids == dependent_ids
            assert (build.state, build.status) == ("finished", status)
            assert build.substituted == was_queued

    @rule(failed_build_id=st.integers(-1, 60))
    def fail_because_of(self, failed_build_id: int) -> None:
        build = self.build
        error = expected(
            failed_build_id < 1 or failed_build_id == build.build_id, build.state != "queued"
        )
        self.attempt(lambda: build.fail_because_of(failed_build_id), error)
        if error is None:
            self.collected([Build.DependencyFailed])
            assert (build.state, build.status) == ("finished", 2)

    @rule()
    def cancel(self) -> None:
        error = expected(False, self.build.state not in ACTIVE_STATES)
        self.attempt(self.build.cancel, error)
        if error is None:
            self.collected([Build.Cancelled])
            assert (self.build.state, self.build.status) == ("cancelled", 4)

    @rule(priority=st.integers(-100, 1000))
    def bump(self, priority: int) -> None:
        state = self.build.state
        error = expected(False, state not in ACTIVE_STATES)
        self.attempt(lambda: self.build.bump(priority), error)
        if error is None:
            self.collected([Build.Bumped])
            assert (self.build.priority, self.build.state) == (priority, state)

    @rule()
    def restart(self) -> None:
        build = self.build
        generation, pending = build.generation, build.pending_message_ids
        error = expected(False, build.state not in ("finished", "cancelled"))
        self.attempt(build.restart, error)
        if error is None:
            [restarted] = self.collected([Build.Restarted])
            assert restarted.stale_message_ids == pending
            assert (build.state, build.status, build.generation) == ("queued", None, generation + 1)
            assert build.steps == {}
            assert all(build.messages[m]["state"] == "stale" for m in pending)

    @rule()
    def wait_for_message(self) -> None:
        build = self.build
        error = expected(False, build.state != "running" or self.unfinished)
        pending = [build.messages[m] for m in build.pending_message_ids]
        self.attempt(build.wait_for_message, error)
        if error is None:
            types: list[type] = [Build.WaitingForMessage]
            decision = None
            for message in pending:
                types.append(Build.MessageApplied)
                if message["type"] in DECISIVE:
                    decision = DECISIVE[message["type"]]
                    types.append(Build.Finished)
                    break
            self.collected(types)
            if decision is None:
                assert build.state == "waiting"
            else:
                assert (build.state, build.status) == ("finished", decision)
            assert not build.pending_message_ids

    @rule(
        message_id=MESSAGE_IDS,
        message_type=MESSAGE_TYPES,
        generation=st.none() | st.integers(0, 4),
    )
    def receive_message(self, message_id: str, message_type: Any, generation: int | None) -> None:
        build = self.build
        usage = (
            not message_id
            or message_type not in ("pass", "fail", "work")
            or (generation is not None and generation < 1)
        )
        known = build.messages.get(message_id)
        target = build.generation if generation is None else generation
        predicted = self.predict(message_type, target)
        error = expected(usage, False)
        state = self.attempt(
            lambda: build.receive_message(message_id, message_type, generation), error
        )
        if error is not None:
            return
        if known is not None:
            assert state == known["state"]
            self.collected([])
            return
        assert state == predicted
        decides = state == "applied" and message_type in DECISIVE
        self.collected(
            [Build.MessageReceived, Build.Finished] if decides else [Build.MessageReceived]
        )
        assert build.messages[message_id]["state"] == state
        assert build.messages[message_id]["generation"] == target
        if decides:
            assert (build.state, build.status) == ("finished", DECISIVE[message_type])

    def predict(self, message_type: str, target: int) -> MessageState:
        """What a new message must become, from the build's state."""
        build = self.build
        if target < build.generation:
            return "stale"
        if target > build.generation or build.state in ("finished", "cancelled"):
            return "ignored"
        if build.state == "waiting":
            return "applied"
        if any(build.messages[m]["type"] in DECISIVE for m in build.pending_message_ids):
            return "ignored"
        return "pending"

    # -- steering: valid commands in the states where they apply, so that random
    # sequences also reach steps, waiting and applied messages, not only refusals.

    @precondition(lambda self: self.build.state == "queued")
    @rule()
    def start_when_queued(self) -> None:
        self.start()

    @precondition(lambda self: self.build.state == "running")
    @rule(step_nr=st.integers(0, 5))
    def start_a_step_when_running(self, step_nr: int) -> None:
        self.start_step(step_nr, "builder-1")

    @precondition(lambda self: self.build.state == "running" and self.unfinished)
    @rule(data=st.data(), status=st.sampled_from(sorted(STEP_STATUS_NAMES)))
    def finish_a_running_step(self, data: st.DataObject, status: int) -> None:
        running = [nr for nr, step in self.build.steps.items() if not step["finished"]]
        self.finish_step(data.draw(st.sampled_from(running)), status, None)

    @precondition(lambda self: self.build.state == "running" and not self.unfinished)
    @rule()
    def wait_when_done(self) -> None:
        self.wait_for_message()

    @precondition(lambda self: self.build.state in ("finished", "cancelled"))
    @rule()
    def restart_when_done(self) -> None:
        self.restart()

    @rule(
        message_id=st.sampled_from(["s1", "s2", "s3", "s4"]),
        message_type=st.sampled_from(["pass", "fail", "work", "work"]),
    )
    def send_a_message(self, message_id: str, message_type: Any) -> None:
        self.receive_message(message_id, message_type, None)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def replay_gives_the_same_build(self) -> None:
        if not self.history:
            return
        aggregate: Build | None = None
        for domain_event in self.history:
            aggregate = domain_event.mutate(aggregate)
        assert aggregate is not None
        assert state_of(aggregate) == state_of(self.build)
        assert aggregate.version == len(self.history) == self.build.version

    @invariant()
    def state_is_coherent(self) -> None:
        build = self.build
        assert build.state in BUILD_STATES
        assert build.generation >= 1
        assert (build.status is None) == (build.state in ACTIVE_STATES)
        assert (build.status == 4) == (build.state == "cancelled")
        if build.state == "finished":
            assert build.status in STATUS_NAMES
        if build.substituted:
            assert build.state == "finished"
            assert build.steps == {}
        if build.state in ("queued", "waiting") or build.substituted:
            assert not self.unfinished
        if build.state == "queued":
            assert build.steps == {}
        for message in build.messages.values():
            assert message["state"] in MESSAGE_STATES
            assert (message["reason"] is None) == (message["state"] in ("pending", "applied"))
            if message["state"] == "pending":
                assert message["generation"] == build.generation
                assert build.state != "waiting"
        decisive = [m for m in build.pending_message_ids if build.messages[m]["type"] in DECISIVE]
        assert len(decisive) <= 1


BuildMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestBuildMachine = BuildMachine.TestCase
