"""The shortcuts bulk saves take, against the general code they stand in for.

``Build.queue`` against ``Build(...)``; ``Build.create_id`` against
:func:`uuid.uuid5`; the catalogue's fast path for its own topics; ``json_text``
against :func:`json.dumps`; the order a save appends events in; the garbage
collector paused for a bulk operation.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest

from herald.domain import CATALOGUE, TOPIC_PATTERN, Build, json_text, to_log, validate_event
from herald.errors import InvalidPayload, UsageError
from herald.outbox import unit_of_work
from herald.outbox.unit_of_work import PAUSE_COLLECTOR_FROM, collector_paused

WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eventsourcing.domain.datetime_now_with_tzinfo", lambda: WHEN)


@pytest.mark.parametrize(
    "args",
    [
        (1, 2, "job", "/nix/store/x.drv", "x86_64-linux"),
        (7, 2, "job", "/nix/store/x.drv", "x86_64-linux", -5, [1, 2, 3]),
        (8, 3, "jöb", "/d", "s", 100, (4,)),
    ],
)
def test_queue_makes_what_the_constructor_makes(fixed_clock: None, args: tuple[Any, ...]) -> None:
    made, queued = Build(*args), Build.queue(*args)
    assert type(queued) is Build
    assert made == queued  # every attribute, the pending Queued event included
    (event,) = queued.collect_events()
    (made_event,) = made.collect_events()
    assert type(event) is type(made_event)
    assert list(vars(event).items()) == list(vars(made_event).items())  # in the same order
    assert to_log(event) == to_log(made_event)
    queued.start()
    assert queued.version == 2
    assert [e.originator_version for e in queued.collect_events()] == [2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 2, "j", "/d", "s"), "build_id"),
        ((True, 2, "j", "/d", "s"), "build_id"),
        ((1, 2, "", "/d", "s"), "job"),
        ((1, 2, "j", None, "s"), "drv_path"),
        ((1, 2, "j", "/d", "s", "high"), "priority"),
        ((1, 2, "j", "/d", "s", 1, [1]), "itself"),
        ((1, 2, "j", "/d", "s", 1, [2, 2]), "twice"),
        ((1, 2, "j", "/d", "s", 1, [2, False]), "each of dependencies"),
        ((1, 2, "j", "/d", "s", 1, "23"), "list of build ids"),
    ],
)
def test_queue_refuses_what_the_constructor_refuses(args: tuple[Any, ...], message: str) -> None:
    for make in (Build, Build.queue):
        with pytest.raises(UsageError, match=message):
            make(*args)


def test_build_ids_are_uuid5_of_the_build_number() -> None:
    for build_id in (1, 42, 500_000_123, 2**40):
        assert Build.create_id(build_id) == uuid5(NAMESPACE_URL, f"herald:build:{build_id}")


def test_every_catalogue_topic_follows_the_topic_rules() -> None:
    """validate_topic takes the catalogue's own names without checking them again."""
    for topic in CATALOGUE:
        assert re.fullmatch(TOPIC_PATTERN, topic)
        assert "." not in topic
        assert len(topic) <= 100


@dataclass
class _Event:
    name: str
    timestamp: datetime


@dataclass
class _Aggregate:
    events: list[_Event]

    def collect_events(self) -> Sequence[_Event]:
        collected, self.events = self.events, []
        return collected


def _order(*aggregates: _Aggregate) -> list[str]:
    ordered = unit_of_work._in_command_order(aggregates)  # type: ignore[arg-type]
    return [event.name for event in ordered]


def test_a_save_appends_in_command_order_across_aggregates() -> None:
    t = [WHEN + timedelta(seconds=s) for s in range(6)]
    a = _Aggregate([_Event("a1", t[0]), _Event("a2", t[3])])
    b = _Aggregate([_Event("b1", t[1]), _Event("b2", t[2]), _Event("b3", t[5])])
    c = _Aggregate([_Event("c1", t[4])])
    assert _order(a, b, c) == ["a1", "b1", "b2", "a2", "c1", "b3"]


def test_an_aggregates_events_keep_their_order_whatever_the_clock_did() -> None:
    t = [WHEN + timedelta(seconds=s) for s in range(6)]
    # b's clock went back between its events; a's events at the same time as b's
    a = _Aggregate([_Event("a1", t[2]), _Event("a2", t[4])])
    b = _Aggregate([_Event("b1", t[3]), _Event("b2", t[1]), _Event("b3", t[5])])
    ordered = _order(a, b)
    assert [n for n in ordered if n[0] == "b"] == ["b1", "b2", "b3"]
    assert [n for n in ordered if n[0] == "a"] == ["a1", "a2"]
    assert ordered == ["a1", "b1", "b2", "a2", "b3"]


def test_equal_times_keep_the_aggregates_order() -> None:
    a = _Aggregate([_Event("a1", WHEN)])
    b = _Aggregate([_Event("b1", WHEN)])
    assert _order(b, a) == ["b1", "a1"]


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_paused_for_a_bulk_operation_only(collector_on: None) -> None:
    with collector_paused(PAUSE_COLLECTOR_FROM - 1):
        assert gc.isenabled()
    with collector_paused(PAUSE_COLLECTOR_FROM):
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_is_enabled_again_after_a_failure(collector_on: None) -> None:
    with pytest.raises(RuntimeError), collector_paused(10**6):
        raise RuntimeError("the bulk save failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with collector_paused(10**6):
        assert not gc.isenabled()
    assert not gc.isenabled()


@pytest.mark.parametrize(
    "value",
    [
        {"build_id": 1, "job": "hello", "dependencies": [1, 2, 3]},
        {"ü": "日本", "nested": {"a": [None, True, False, 1.5, -2]}, "empty": {}},
        {"quote": "'\"\\\\", "control": "\x01\n\t", "big": 2**70},
        [1, "two", [3.0]],
        "text",
    ],
)
def test_json_text_is_what_json_dumps_makes(value: Any) -> None:
    assert json_text(value) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [({"n": float("nan")}, ValueError), ({"s": {1, 2}}, TypeError), ({(1, 2): "x"}, TypeError)],
)
def test_json_text_refuses_what_json_dumps_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        json_text(value)
    with pytest.raises(error):
        json.dumps(value, allow_nan=False)


def test_a_payload_that_contains_itself_is_refused_clearly() -> None:
    payload: dict[str, Any] = {"build_id": 1}
    payload["self"] = payload
    with pytest.raises(InvalidPayload, match="not serialisable as JSON"):
        validate_event("acme.loop", payload)


class _Made:
    """An object the collector tracks (it has a __dict__)."""


def test_objects_made_while_paused_join_the_oldest_generation(collector_on: None) -> None:
    with collector_paused(10**6):
        made = [_Made() for _ in range(5)]
    assert gc.get_count()[0] < 700, "no young collection is due for them"
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert all(id(o) in oldest for o in made)
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_keeps_them_frozen(collector_on: None) -> None:
    frozen = _Made()
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with collector_paused(10**6):
            _Made()
        assert gc.get_freeze_count() == before, "thawed"
    finally:
        gc.unfreeze()
    assert id(frozen) in {id(o) for o in gc.get_objects(generation=2)}
