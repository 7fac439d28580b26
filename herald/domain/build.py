"""The Build aggregate: one build of the farm, event-sourced.

A build is queued by an evaluation, started by the queue runner, runs steps
on machines and finishes with one of Hydra's status codes. It can also finish
without starting (its outputs were substituted), fail because a build it
depends on failed, be cancelled, have its priority bumped and be restarted
(a new *generation*: the next finish is a second ``build_finished``). A
running build can wait for an external ``pass`` / ``fail`` message
(Harbormaster's "wait for message"); ``work`` keeps it waiting.

The idiom, for every command: the public method checks the arguments
(:class:`~herald.errors.UsageError`) and the current state
(:class:`~herald.errors.InvalidTransition`) first, so a refused command
changes nothing and records no event; then it calls one or more private
``@event`` methods with complete, explicit arguments. Those methods are the
only code that changes state, and they run again, with the same arguments,
when the aggregate is rebuilt from its events, so a replay gives exactly the
same build. Each event's arguments are its log payload (:mod:`herald.domain.log`).

Messages (Harbormaster's rules, ``../shared/seeds/``):

* a message that arrives before the build waits is kept (``pending``) and
  applied as soon as the build waits, never lost;
* every message ends in an explicit state: ``applied``, ``ignored`` (with
  the reason) or ``stale`` (sent to an earlier generation of a restarted
  build); a ``pending`` message of a build that finished or was cancelled
  without waiting becomes ``stale`` when the build is restarted;
* receiving the same message id again changes nothing (idempotent);
* the first ``pass`` / ``fail`` of a generation decides; a later message of
  the same generation is ignored with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha1
from typing import Any, Final, Literal, TypedDict
from uuid import NAMESPACE_URL, UUID

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic

from herald.errors import InvalidTransition, UsageError

__all__ = [
    "ACTIVE_STATES",
    "BUILD_STATES",
    "MESSAGE_STATES",
    "MESSAGE_TYPES",
    "STATUS_NAMES",
    "STEP_STATUS_NAMES",
    "Build",
    "BuildState",
    "MessageInfo",
    "MessageState",
    "MessageType",
    "StepInfo",
    "status_text",
    "unwaited_reason",
]

#: Hydra's build status codes (``hydra.sql``, table ``Builds``).
STATUS_NAMES: Final[dict[int, str]] = {
    0: "succeeded",
    1: "failed",
    2: "dependency failed",
    3: "aborted",
    4: "cancelled",
    6: "failed with output",
    7: "timed out",
    9: "unsupported system",
    10: "log limit exceeded",
    11: "output limit exceeded",
    12: "not deterministic",
}

#: A step's status codes: the build's, plus Hydra's steps-only "cached failure".
STEP_STATUS_NAMES: Final[dict[int, str]] = {**STATUS_NAMES, 8: "cached failure"}

BuildState = Literal["queued", "running", "waiting", "finished", "cancelled"]
BUILD_STATES: Final[tuple[BuildState, ...]] = (
    "queued",
    "running",
    "waiting",
    "finished",
    "cancelled",
)
#: The states a build can be cancelled or bumped in.
ACTIVE_STATES: Final[tuple[BuildState, ...]] = ("queued", "running", "waiting")

MessageType = Literal["pass", "fail", "work"]
MESSAGE_TYPES: Final[tuple[MessageType, ...]] = ("pass", "fail", "work")
MessageState = Literal["pending", "applied", "ignored", "stale"]
MESSAGE_STATES: Final[tuple[MessageState, ...]] = ("pending", "applied", "ignored", "stale")

#: The namespace of builds' aggregate ids (uuid5), as bytes.
_URL_NAMESPACE: Final = NAMESPACE_URL.bytes
#: The variant and version bits of a UUID's int, cleared and set for version 5.
_NOT_VERSION: Final = ~((0xC000 << 48) | (0xF000 << 64))
_VERSION_5: Final = (0x8000 << 48) | (5 << 76)

_MESSAGE_TYPE_OF: Final[dict[str, MessageType]] = {name: name for name in MESSAGE_TYPES}
#: The build status a decisive message finishes a waiting build with.
_MESSAGE_STATUS: Final[dict[str, int]] = {"pass": 0, "fail": 1}


class StepInfo(TypedDict):
    """One build step, as the build knows it."""

    machine: str
    status: int | None
    log_path: str | None
    finished: bool


class MessageInfo(TypedDict):
    """One received Harbormaster message and what became of it."""

    type: MessageType
    generation: int
    state: MessageState
    reason: str | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The checks run for every build an evaluation adds (tens of thousands at once),
# so the usual case (a plain int, a plain str) is decided by its exact type first.


def _check_build_id(name: str, value: object) -> int:
    if type(value) is int and value >= 1:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, not {value!r}")
    return value


def _check_text(name: str, value: object) -> str:
    if type(value) is str and value:
        return value
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string, not {value!r}")
    return value


def _check_status(value: object, known: dict[int, str] = STATUS_NAMES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in known:
        codes = ", ".join(f"{code} ({name})" for code, name in known.items())
        raise UsageError(f"unknown Hydra status code {value!r}; known: {codes}")
    return value


def _check_step_nr(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"step number must be a non-negative integer, not {value!r}")
    return value


def unwaited_reason(status: int | None) -> str:
    """Why a message still pending when its build ended is ignored."""
    return f"the build ended ({status_text(status)}) before it waited for a message"


def _check_ids(name: str, values: object, build_id: int) -> list[int]:
    """A list of distinct build ids, none of them ``build_id`` itself."""
    if not isinstance(values, (list, tuple)) and (
        isinstance(values, (str, bytes)) or not isinstance(values, Sequence)
    ):
        raise UsageError(f"{name} must be a list of build ids, not {values!r}")
    seen: set[int] = set()
    for value in values:
        if type(value) is not int or value < 1:
            _check_build_id(f"each of {name}", value)
        if value == build_id:
            raise UsageError(f"{name} of build {build_id} must not contain the build itself")
        if value in seen:
            raise UsageError(f"{name} lists build {value} twice")
        seen.add(value)
    return list(values)


def status_text(status: int | None) -> str:
    """``"status 1, failed"``: a status code with its name."""
    if status is None:
        return "no status"
    return f"status {status}, {STATUS_NAMES.get(status, 'unknown')}"


class Build(Aggregate):
    """A build of the farm: its queue entry, steps, outcome and messages."""

    # -- events: each one's fields are its log payload --------------------------------

    class Queued(Aggregate.Created):
        """A new build was added to the queue (``build_queued``)."""

        build_id: int
        jobset_id: int
        job: str
        drv_path: str
        system: str
        priority: int
        dependencies: Sequence[int]

    class Started(Aggregate.Event):
        """Building began (``build_started``)."""

        build_id: int
        generation: int

    class StepStarted(Aggregate.Event):
        """A step was dispatched to a machine (``step_started``)."""

        build_id: int
        step_nr: int
        machine: str
        generation: int

    class StepFinished(Aggregate.Event):
        """A step completed, success or not (``step_finished``)."""

        build_id: int
        step_nr: int
        status: int
        log_path: str | None
        generation: int

    class Finished(Aggregate.Event):
        """The build completed (``build_finished``), listing the dependents that finished
        with it."""

        build_id: int
        dependent_ids: list[int]
        status: int
        generation: int
        substituted: bool

    class DependencyFailed(Aggregate.Event):
        """A queued build finished as "dependency failed" (status 2); the failing build's
        ``build_finished`` lists it (``herald.build_dependency_failed``)."""

        build_id: int
        failed_build_id: int
        generation: int

    class Cancelled(Aggregate.Event):
        """The build was cancelled, status 4 (``build_cancelled``)."""

        build_id: int
        generation: int

    class Bumped(Aggregate.Event):
        """The build's priority changed (``build_bumped``)."""

        build_id: int
        priority: int

    class Restarted(Aggregate.Event):
        """A finished or cancelled build was queued again as a new generation
        (``build_restarted``); its pending messages became stale."""

        build_id: int
        generation: int
        stale_message_ids: list[str]

    class WaitingForMessage(Aggregate.Event):
        """The build's work is done; it waits for a pass / fail message
        (``herald.build_waiting``)."""

        build_id: int
        generation: int

    class MessageReceived(Aggregate.Event):
        """A Harbormaster message arrived, and what became of it
        (``build_message_received``)."""

        build_id: int
        message_id: str
        type: MessageType
        generation: int
        state: MessageState
        reason: str | None

    class MessageApplied(Aggregate.Event):
        """A pending message was applied when the build began to wait
        (``herald.build_message_applied``)."""

        build_id: int
        message_id: str
        type: MessageType
        generation: int

    # -- identity ---------------------------------------------------------------------

    @staticmethod
    def create_id(build_id: int, *_: Any, **__: Any) -> UUID:
        """The aggregate id of Hydra build ``build_id``: the same on every writer.

        ``uuid5(NAMESPACE_URL, f"herald:build:{build_id}")``, computed as
        :func:`uuid.uuid5` does, without its per-call import and namespace
        conversion and with the version bits set here (half its time, and
        this runs for every build an evaluation adds).
        """
        name = f"herald:build:{build_id}".encode()
        digest = sha1(_URL_NAMESPACE + name, usedforsecurity=False).digest()
        return UUID(int=int.from_bytes(digest[:16]) & _NOT_VERSION | _VERSION_5)

    @classmethod
    def id_for(cls, build_id: int) -> UUID:
        """The aggregate id of Hydra build ``build_id`` (to load it)."""
        return cls.create_id(build_id)

    # -- creation ---------------------------------------------------------------------

    @event(Queued)
    def __init__(
        self,
        build_id: int,
        jobset_id: int,
        job: str,
        drv_path: str,
        system: str,
        priority: int = 100,
        dependencies: Sequence[int] = (),
    ) -> None:
        # The arguments are checked here, while the "created" event is applied: a
        # refused build raises before any aggregate exists, so nothing is recorded.
        self.build_id: int = _check_build_id("build_id", build_id)
        self.jobset_id: int = _check_build_id("jobset_id", jobset_id)
        self.job: str = _check_text("job", job)
        self.drv_path: str = _check_text("drv_path", drv_path)
        self.system: str = _check_text("system", system)
        if not _is_int(priority):
            raise UsageError(f"priority must be an integer, not {priority!r}")
        self.priority: int = priority
        self.dependencies: list[int] = _check_ids("dependencies", dependencies, build_id)
        self.state: BuildState = "queued"
        self.status: int | None = None
        self.generation: int = 1
        self.steps: dict[int, StepInfo] = {}
        self.messages: dict[str, MessageInfo] = {}
        self.substituted: bool = False

    @classmethod
    def queue(
        cls,
        build_id: int,
        jobset_id: int,
        job: str,
        drv_path: str,
        system: str,
        priority: int = 100,
        dependencies: Sequence[int] = (),
    ) -> Build:
        """A new queued build: exactly what ``Build(...)`` makes (the same checks, the
        same state, its ``Queued`` event pending), at a third of the cost.

        For evaluations that add tens of thousands of builds. ``Build(...)``
        spends most of its time in the library's generic handling of the
        call (matching arguments to parameters, twice, by name); this makes
        the event with its fields given and applies it the way the library
        applies a "created" event (``CanInitAggregate.mutate``): the base
        attributes, then ``__init__`` with the event's arguments, whose
        checks raise before the event is recorded.
        """
        originator_id = cls.create_id(build_id)
        timestamp = cls.Queued.create_timestamp()
        build = cls.__new__(cls)
        build.__base_init__(originator_id, cls.INITIAL_VERSION, timestamp)
        cls.__init__(build, build_id, jobset_id, job, drv_path, system, priority, dependencies)
        # The event's fields set as its dataclass __init__ sets them, in the same
        # order, in one step (a frozen dataclass sets them one object.__setattr__ at
        # a time, and checks that the id is a UUID: it is one, made just above).
        created = cls.Queued.__new__(cls.Queued)
        vars(created).update(
            originator_id=originator_id,
            originator_version=cls.INITIAL_VERSION,
            timestamp=timestamp,
            originator_topic=_BUILD_TOPIC,
            build_id=build_id,
            jobset_id=jobset_id,
            job=job,
            drv_path=drv_path,
            system=system,
            priority=priority,
            dependencies=dependencies,
        )
        build.pending_events.append(created)
        return build

    # -- queries ----------------------------------------------------------------------

    @property
    def label(self) -> str:
        """``"build 42"``: how errors and logs name this build."""
        return f"build {self.build_id}"

    @property
    def unfinished_steps(self) -> list[int]:
        """The numbers of the steps started and not finished, in order."""
        return sorted(nr for nr, step in self.steps.items() if not step["finished"])

    @property
    def pending_message_ids(self) -> list[str]:
        """The messages kept until the build waits, in the order they arrived."""
        return [mid for mid, msg in self.messages.items() if msg["state"] == "pending"]

    def _refused(self, attempted: str, reason: str = "") -> InvalidTransition:
        if not reason and self.state == "finished":
            reason = status_text(self.status)
        return InvalidTransition(
            aggregate=self.label, attempted=attempted, state=self.state, reason=reason
        )

    # -- commands ---------------------------------------------------------------------

    def start(self) -> None:
        """The queue runner begins building (queued → running)."""
        if self.state != "queued":
            raise self._refused("start", "only a queued build can start")
        self._started(build_id=self.build_id, generation=self.generation)

    def start_step(self, step_nr: int, machine: str) -> None:
        """A new step of a running build is dispatched to ``machine``."""
        _check_step_nr(step_nr)
        _check_text("machine", machine)
        if self.state != "running":
            raise self._refused("start a step of", "only a running build runs steps")
        if step_nr in self.steps:
            raise self._refused("start a step of", f"step {step_nr} was already started")
        self._step_started(
            build_id=self.build_id, step_nr=step_nr, machine=machine, generation=self.generation
        )

    def finish_step(self, step_nr: int, status: int, log_path: str | None = None) -> None:
        """A started step completes with a Hydra status code, success or not."""
        _check_step_nr(step_nr)
        _check_status(status, STEP_STATUS_NAMES)
        if log_path is not None:
            _check_text("log_path", log_path)
        if self.state != "running":
            raise self._refused("finish a step of", "only a running build runs steps")
        step = self.steps.get(step_nr)
        if step is None:
            raise self._refused("finish a step of", f"step {step_nr} was not started")
        if step["finished"]:
            raise self._refused("finish a step of", f"step {step_nr} already finished")
        self._step_finished(
            build_id=self.build_id,
            step_nr=step_nr,
            status=status,
            log_path=log_path,
            generation=self.generation,
        )

    def finish(self, status: int, dependent_ids: Sequence[int] = ()) -> None:
        """The build completes with ``status``.

        From ``running`` once every step finished; from ``queued`` when its
        outputs were substituted (no ``build_started`` is ever recorded).
        ``dependent_ids`` are the queued builds that finish with it as
        "dependency failed" (the caller knows the queue); a succeeded build has
        none.
        """
        _check_status(status)
        if status == 4:
            raise UsageError("status 4 (cancelled) is recorded by cancel(), not finish()")
        ids = _check_ids("dependent_ids", dependent_ids, self.build_id)
        if status == 0 and ids:
            raise UsageError("a succeeded build has no dependents that finish with it")
        if self.state == "running":
            if unfinished := self.unfinished_steps:
                raise self._refused("finish", f"step {unfinished[0]} is still running")
        elif self.state == "waiting":
            raise self._refused("finish", "it waits for a pass or fail message")
        elif self.state != "queued":
            raise self._refused("finish")
        self._finished(
            build_id=self.build_id,
            dependent_ids=ids,
            status=status,
            generation=self.generation,
            substituted=self.state == "queued",
        )

    def fail_because_of(self, failed_build_id: int) -> None:
        """A queued build finishes as "dependency failed" (status 2) because
        ``failed_build_id`` failed; that build's ``build_finished`` lists it."""
        _check_build_id("failed_build_id", failed_build_id)
        if failed_build_id == self.build_id:
            raise UsageError(f"{self.label} cannot fail because of itself")
        if self.state != "queued":
            raise self._refused(
                "mark as dependency failed", "only a queued build fails because of a dependency"
            )
        self._dependency_failed(
            build_id=self.build_id, failed_build_id=failed_build_id, generation=self.generation
        )

    def cancel(self) -> None:
        """The build is removed from the queue or stopped (status 4)."""
        if self.state not in ACTIVE_STATES:
            raise self._refused("cancel")
        self._cancelled(build_id=self.build_id, generation=self.generation)

    def bump(self, priority: int) -> None:
        """The build's priority changes (it has not finished)."""
        if not _is_int(priority):
            raise UsageError(f"priority must be an integer, not {priority!r}")
        if self.state not in ACTIVE_STATES:
            raise self._refused("bump")
        self._bumped(build_id=self.build_id, priority=priority)

    def restart(self) -> None:
        """A finished or cancelled build is queued again as a new generation.

        Its status and steps are cleared; the messages still pending for the old
        generation become stale.
        """
        if self.state not in ("finished", "cancelled"):
            raise self._refused("restart", "only a finished or cancelled build can restart")
        self._restarted(
            build_id=self.build_id,
            generation=self.generation + 1,
            stale_message_ids=self.pending_message_ids,
        )

    def wait_for_message(self, dependent_ids: Sequence[int] = ()) -> None:
        """The running build's work is done: it waits for a pass or fail message.

        Messages of this generation that arrived earlier are applied at once, in
        the order they arrived: ``work`` keeps the build waiting, ``pass`` /
        ``fail`` finish it with status 0 / 1. ``dependent_ids`` are the queued
        builds that fail with it if a ``fail`` finishes it (the caller knows the
        queue); a ``pass`` lists none.
        """
        dependents = _check_ids("dependent_ids", dependent_ids, self.build_id)
        if self.state != "running":
            raise self._refused("wait for a message on", "only a running build can wait")
        if unfinished := self.unfinished_steps:
            raise self._refused("wait for a message on", f"step {unfinished[0]} is still running")
        self._waiting_for_message(build_id=self.build_id, generation=self.generation)
        for message_id in self.pending_message_ids:
            message = self.messages[message_id]
            self._message_applied(
                build_id=self.build_id,
                message_id=message_id,
                type=message["type"],
                generation=message["generation"],
            )
            if message["type"] in _MESSAGE_STATUS:
                # receive_message() ignores anything after a pending pass / fail, so
                # this is the last pending message of the generation.
                self._finish_by_message(message["type"], dependents)
                break

    def receive_message(
        self,
        message_id: str,
        type: str,  # noqa: A002 -- Harbormaster's own name, and the payload's
        generation: int | None = None,
        dependent_ids: Sequence[int] = (),
    ) -> MessageState:
        """Record a Harbormaster message; return the state it ends in.

        ``generation`` defaults to the build's current one. A message id seen
        before changes nothing and returns the state it already has.
        ``dependent_ids``: as for :meth:`wait_for_message`, listed only if this
        message is a ``fail`` that finishes the build now.
        """
        dependents = _check_ids("dependent_ids", dependent_ids, self.build_id)
        _check_text("message_id", message_id)
        message_type = _MESSAGE_TYPE_OF.get(type) if isinstance(type, str) else None
        if message_type is None:
            raise UsageError(f"message type must be one of pass, fail, work, not {type!r}")
        if generation is not None:
            _check_build_id("generation", generation)
        known = self.messages.get(message_id)
        if known is not None:
            return known["state"]
        target = self.generation if generation is None else generation
        state, reason = self._message_outcome(target)
        self._message_received(
            build_id=self.build_id,
            message_id=message_id,
            type=message_type,
            generation=target,
            state=state,
            reason=reason,
        )
        if state == "applied" and message_type in _MESSAGE_STATUS:
            self._finish_by_message(message_type, dependents)
        return state

    def _message_outcome(self, generation: int) -> tuple[MessageState, str | None]:
        """What becomes of a new message for ``generation``."""
        if generation < self.generation:
            return "stale", (
                f"sent to generation {generation}; the build was restarted "
                f"(generation {self.generation})"
            )
        if self.state == "waiting" and generation == self.generation:
            return "applied", None
        reason: str | None
        if generation > self.generation:
            reason = (
                f"generation {generation} does not exist; the build is at "
                f"generation {self.generation}"
            )
        elif self.state == "finished":
            reason = f"build already finished with status {self.status}"
        elif self.state == "cancelled":
            reason = "build already cancelled"
        else:
            reason = self._pending_decision()
        return ("pending", None) if reason is None else ("ignored", reason)

    def _pending_decision(self) -> str | None:
        """Why a new message of this generation cannot be applied: a pass or fail
        message already pending decides the generation (None if there is none)."""
        for message_id in self.pending_message_ids:
            pending = self.messages[message_id]
            if pending["type"] in _MESSAGE_STATUS and pending["generation"] == self.generation:
                return (
                    f"a {pending['type']} message ({message_id}) is already pending "
                    f"for generation {self.generation}"
                )
        return None

    def _finish_by_message(self, message_type: MessageType, dependents: list[int]) -> None:
        status = _MESSAGE_STATUS[message_type]
        self._finished(
            build_id=self.build_id,
            dependent_ids=dependents if status else [],
            status=status,
            generation=self.generation,
            substituted=False,
        )

    # -- event application: the only code that changes state --------------------------

    @event(Started)
    def _started(self, build_id: int, generation: int) -> None:
        self.state = "running"

    @event(StepStarted)
    def _step_started(self, build_id: int, step_nr: int, machine: str, generation: int) -> None:
        self.steps[step_nr] = StepInfo(machine=machine, status=None, log_path=None, finished=False)

    @event(StepFinished)
    def _step_finished(
        self, build_id: int, step_nr: int, status: int, log_path: str | None, generation: int
    ) -> None:
        step = self.steps[step_nr]
        step["status"] = status
        step["log_path"] = log_path
        step["finished"] = True

    @event(Finished)
    def _finished(
        self,
        build_id: int,
        dependent_ids: list[int],
        status: int,
        generation: int,
        substituted: bool,
    ) -> None:
        self.state = "finished"
        self.status = status
        self.substituted = substituted
        self._settle_pending_messages()

    @event(DependencyFailed)
    def _dependency_failed(self, build_id: int, failed_build_id: int, generation: int) -> None:
        self.state = "finished"
        self.status = 2
        self.substituted = False
        self._settle_pending_messages()

    @event(Cancelled)
    def _cancelled(self, build_id: int, generation: int) -> None:
        self.state = "cancelled"
        self.status = 4
        self._settle_pending_messages()

    def _settle_pending_messages(self) -> None:
        """A build that ends without waiting leaves no message pending: each is ignored."""
        reason = unwaited_reason(self.status)
        for message_id in self.pending_message_ids:
            self.messages[message_id]["state"] = "ignored"
            self.messages[message_id]["reason"] = reason

    @event(Bumped)
    def _bumped(self, build_id: int, priority: int) -> None:
        self.priority = priority

    @event(Restarted)
    def _restarted(self, build_id: int, generation: int, stale_message_ids: list[str]) -> None:
        self.generation = generation
        self.state = "queued"
        self.status = None
        self.steps = {}
        self.substituted = False
        for message_id in stale_message_ids:
            message = self.messages[message_id]
            message["state"] = "stale"
            message["reason"] = f"the build was restarted (generation {generation})"

    @event(WaitingForMessage)
    def _waiting_for_message(self, build_id: int, generation: int) -> None:
        self.state = "waiting"

    @event(MessageReceived)
    def _message_received(
        self,
        build_id: int,
        message_id: str,
        type: MessageType,  # noqa: A002
        generation: int,
        state: MessageState,
        reason: str | None,
    ) -> None:
        self.messages[message_id] = MessageInfo(
            type=type, generation=generation, state=state, reason=reason
        )

    @event(MessageApplied)
    def _message_applied(
        self,
        build_id: int,
        message_id: str,
        type: MessageType,  # noqa: A002
        generation: int,
    ) -> None:
        self.messages[message_id]["state"] = "applied"


#: The topic the library records a build's "created" event with (its class's path).
_BUILD_TOPIC: Final = get_topic(Build)
