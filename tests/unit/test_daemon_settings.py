"""The process settings `herald run` applies before it starts the daemon."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from herald.cli import cli
from herald.config import create_engine
from herald.consumers import Daemon, tune_garbage_collector, tune_interpreter
from herald.outbox import append
from tests.conftest import migrate_url


@pytest.fixture
def collector() -> Iterator[None]:
    """Gives the test process its collector settings back afterwards."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("collector")
def test_the_collector_is_tuned_and_still_collects_cycles() -> None:
    tune_garbage_collector()
    assert gc.get_threshold() == (10_000, 50, 100)
    assert gc.get_freeze_count() > 0, "nothing loaded so far was frozen"
    ring: list[object] = []
    ring.append(ring)
    del ring
    assert gc.collect() >= 1, "a cycle made afterwards was not collected"


@pytest.fixture
def switch_interval() -> Iterator[None]:
    """Gives the test process its thread switch interval back afterwards."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


#: what tune_interpreter() leaves: (switch interval, collector thresholds)
TUNED: tuple[Any, ...] = (pytest.approx(0.001), (10_000, 50, 100))


@pytest.mark.usefixtures("collector", "switch_interval")
def test_the_interpreter_switches_threads_every_millisecond() -> None:
    sys.setswitchinterval(0.005)
    tune_interpreter()
    assert (sys.getswitchinterval(), gc.get_threshold()) == TUNED


@pytest.mark.usefixtures("collector", "switch_interval")
def test_herald_run_tunes_the_interpreter_before_the_daemon_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'herald.db'}"
    migrate_url(url)
    monkeypatch.chdir(tmp_path)  # no ./herald.toml: no consumers
    monkeypatch.delenv("HERALD_CONFIG", raising=False)
    sys.setswitchinterval(0.005)
    seen: list[tuple[float, tuple[int, ...]]] = []

    def run(self: Daemon, stop: threading.Event) -> None:
        seen.append((sys.getswitchinterval(), gc.get_threshold()))

    monkeypatch.setattr(Daemon, "run", run)
    result = CliRunner().invoke(cli, ["--database-url", url, "run"])
    assert result.exit_code == 0, result.output
    assert seen == [TUNED], "the daemon did not run once, under the tuned interpreter"


#: what `note_interval` saw: the switch interval and collector thresholds at each call
REPLAYED: list[tuple[float, tuple[int, ...]]] = []


def note_interval(entry: object) -> None:
    """A `type = "python"` handler: notes the settings the replay runs it under."""
    REPLAYED.append((sys.getswitchinterval(), gc.get_threshold()))


@pytest.mark.usefixtures("collector", "switch_interval")
def test_herald_replay_tunes_the_interpreter_before_it_delivers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'herald.db'}"
    migrate_url(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for build_id in (1, 2):
                append(conn, "build_finished", {"build_id": build_id, "dependent_ids": []})
    finally:
        engine.dispose()
    config = tmp_path / "herald.toml"
    config.write_text(
        '[consumers.settings]\ntype = "python"\ntopics = ["build_finished"]\n'
        f'handler = "{__name__}:note_interval"\n',
        encoding="utf-8",
    )
    REPLAYED.clear()
    sys.setswitchinterval(0.005)
    result = CliRunner().invoke(
        cli,
        ["--database-url", url, "replay", "settings", "--from", "1", "--config", str(config)],
    )
    assert result.exit_code == 0, result.output
    assert REPLAYED == [TUNED, TUNED], "not one call per event, under the tuned interpreter"
