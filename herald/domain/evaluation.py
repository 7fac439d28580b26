"""The Evaluation aggregate: one evaluation of a jobset, event-sourced.

Hydra's evaluator starts an evaluation (an opaque trace id), and it ends in
exactly one way: *added* (recorded as a JobsetEval, with its new and cached
builds), *cached* (the inputs had not changed since an earlier, identical
evaluation) or *failed* (fetching or evaluating went wrong). The idiom is
the Build's (:mod:`herald.domain.build`): a command checks its arguments
(:class:`~herald.errors.UsageError`) and the state
(:class:`~herald.errors.InvalidTransition`) first, then calls a private
``@event`` method whose arguments are the event's log payload.
"""

from __future__ import annotations

from typing import Any, Final, Literal
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from herald.errors import InvalidTransition, UsageError

__all__ = ["EVALUATION_STATES", "Evaluation", "EvaluationState"]

EvaluationState = Literal["running", "added", "cached", "failed"]
EVALUATION_STATES: Final[tuple[EvaluationState, ...]] = ("running", "added", "cached", "failed")


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, not {value!r}")
    return value


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string, not {value!r}")
    return value


class Evaluation(Aggregate):
    """An evaluation of a jobset: started, then added, cached or failed."""

    class Started(Aggregate.Created):
        """An evaluation of a jobset began (``eval_started``)."""

        trace_id: str
        jobset_id: int

    class Added(Aggregate.Event):
        """The evaluation finished and was recorded (``eval_added``)."""

        trace_id: str
        jobset_id: int
        eval_id: int
        new_builds: int
        cached_builds: int

    class Cached(Aggregate.Event):
        """The inputs were unchanged since ``previous_eval_id`` (``eval_cached``)."""

        trace_id: str
        jobset_id: int
        previous_eval_id: int

    class Failed(Aggregate.Event):
        """Fetching or evaluating failed (``eval_failed``)."""

        trace_id: str
        jobset_id: int
        error: str

    @staticmethod
    def create_id(trace_id: str, *_: Any, **__: Any) -> UUID:
        """The aggregate id of the evaluation with ``trace_id``: the same on every writer."""
        return uuid5(NAMESPACE_URL, f"herald:eval:{trace_id}")

    @classmethod
    def id_for(cls, trace_id: str) -> UUID:
        """The aggregate id of the evaluation with ``trace_id`` (to load it)."""
        return cls.create_id(trace_id)

    @event(Started)
    def __init__(self, trace_id: str, jobset_id: int) -> None:
        # Checked while the "created" event is applied: a refused evaluation raises
        # before any aggregate exists, so nothing is recorded.
        self.trace_id: str = _check_text("trace_id", trace_id)
        self.jobset_id: int = _check_positive("jobset_id", jobset_id)
        self.state: EvaluationState = "running"
        self.eval_id: int | None = None
        self.new_builds: int | None = None
        self.cached_builds: int | None = None
        self.previous_eval_id: int | None = None
        self.error: str | None = None

    @property
    def label(self) -> str:
        """``"evaluation 7f3a…"``: how errors and logs name this evaluation."""
        return f"evaluation {self.trace_id}"

    def _check_running(self, attempted: str) -> None:
        if self.state != "running":
            raise InvalidTransition(
                aggregate=self.label,
                attempted=attempted,
                state=self.state,
                reason="an evaluation ends only once",
            )

    def add(self, eval_id: int, new_builds: int, cached_builds: int) -> None:
        """The evaluation was recorded as JobsetEval ``eval_id``."""
        _check_positive("eval_id", eval_id)
        _check_count("new_builds", new_builds)
        _check_count("cached_builds", cached_builds)
        self._check_running("add")
        self._added(
            trace_id=self.trace_id,
            jobset_id=self.jobset_id,
            eval_id=eval_id,
            new_builds=new_builds,
            cached_builds=cached_builds,
        )

    def cached(self, previous_eval_id: int) -> None:
        """The inputs were unchanged since evaluation ``previous_eval_id``."""
        _check_positive("previous_eval_id", previous_eval_id)
        self._check_running("mark as cached")
        self._cached(
            trace_id=self.trace_id, jobset_id=self.jobset_id, previous_eval_id=previous_eval_id
        )

    def fail(self, error: str) -> None:
        """Fetching or evaluating failed with ``error``."""
        _check_text("error", error)
        self._check_running("fail")
        self._failed(trace_id=self.trace_id, jobset_id=self.jobset_id, error=error)

    @event(Added)
    def _added(
        self, trace_id: str, jobset_id: int, eval_id: int, new_builds: int, cached_builds: int
    ) -> None:
        self.state = "added"
        self.eval_id = eval_id
        self.new_builds = new_builds
        self.cached_builds = cached_builds

    @event(Cached)
    def _cached(self, trace_id: str, jobset_id: int, previous_eval_id: int) -> None:
        self.state = "cached"
        self.previous_eval_id = previous_eval_id

    @event(Failed)
    def _failed(self, trace_id: str, jobset_id: int, error: str) -> None:
        self.state = "failed"
        self.error = error
