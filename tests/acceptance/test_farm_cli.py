"""The farm on the command line, run for real: `herald message send`, `herald build show`
and `herald log --format hydra`.

Builds are seeded in-process through the unit of work (as a queue runner would save
them); the real ``herald`` command then sends messages and reads the projections and
the log, and the tests check what it printed *and* what it left in the database.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herald import cli
from herald.config import create_engine
from herald.domain import Build
from herald.errors import VersionConflict
from herald.outbox import UnitOfWork, append
from herald.schema import build_messages, build_steps, builds

from .conftest import (
    HERALD,
    Call,
    Result,
    assert_ok,
    assert_one_line_error,
    connect,
    describe,
    event_rows,
    herald,
    herald_env,
    herald_many,
    poll,
    row_counts,
)

pytestmark = pytest.mark.acceptance


# -- seeding, in-process -------------------------------------------------------------------


@contextmanager
def unit_of_work(url: str) -> Iterator[UnitOfWork]:
    """A unit of work in one committed transaction (saved on leaving the block)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            yield uow
            uow.save()
    finally:
        engine.dispose()


def queue(uow: UnitOfWork, build_id: int, dependencies: tuple[int, ...] = ()) -> Build:
    return uow.add(
        Build(
            build_id,
            1,
            f"job-{build_id}",
            f"/nix/store/{build_id}-job.drv",
            "x86_64-linux",
            dependencies=dependencies,
        )
    )


def seed_waiting(url: str, build_id: int = 42) -> None:
    """Build ``build_id`` queued, started, one step done, waiting for a message."""
    with unit_of_work(url) as uow:
        build = queue(uow, build_id)
        build.start()
        build.start_step(1, "builder-1")
        build.finish_step(1, 0, f"/log/{build_id}-1")
        build.wait_for_message()


def build_row(url: str, build_id: int = 42) -> dict[str, Any]:
    with connect(url) as conn:
        return dict(
            conn.execute(sa.select(builds).where(builds.c.build_id == build_id)).one()._mapping
        )


def message_rows(url: str, build_id: int = 42) -> dict[str, dict[str, Any]]:
    with connect(url) as conn:
        rows = conn.execute(sa.select(build_messages).where(build_messages.c.build_id == build_id))
        return {row.message_id: dict(row._mapping) for row in rows}


def topics_of(url: str) -> list[str]:
    return [row.topic for row in event_rows(url)]


def send(url: str, *args: str, cwd: Path) -> Result:
    return herald(url, "message", "send", "42", *args, cwd=cwd)


# -- herald message send ---------------------------------------------------------------------


def test_pass_finishes_a_waiting_build(db_url: str, tmp_path: Path) -> None:
    seed_waiting(db_url)
    result = send(db_url, "--type", "pass", "--id", "m1", cwd=tmp_path)
    assert_ok(result)
    assert result.stdout.splitlines() == [
        "message m1 to build 42 (pass, generation 1): applied",
        "build 42 finished: status 0, succeeded",
    ], describe(result)

    row = build_row(db_url)
    assert (row["state"], row["status"], row["generation"]) == ("finished", 0, 1)
    assert row["finished_at"] is not None
    assert message_rows(db_url)["m1"]["state"] == "applied"
    events = event_rows(db_url)
    assert [e.topic for e in events[-2:]] == ["build_message_received", "build_finished"]
    received, finished = events[-2].payload, events[-1].payload
    assert (received["message_id"], received["type"], received["state"]) == (
        "m1",
        "pass",
        "applied",
    )
    assert (finished["build_id"], finished["status"], finished["dependent_ids"]) == (42, 0, [])


def test_a_message_before_the_wait_is_kept_then_applied(db_url: str, tmp_path: Path) -> None:
    with unit_of_work(db_url) as uow:
        queue(uow, 42).start()
    early = send(db_url, "--type", "pass", "--id", "early", "--json", cwd=tmp_path)
    assert_ok(early)
    sent = json.loads(early.stdout)
    assert sent == {
        "build_id": 42,
        "message_id": "early",
        "type": "pass",
        "generation": 1,
        "state": "pending",
        "reason": None,
        "already_received": False,
        "build_finished": False,
        "build": {"state": "running", "status": None, "status_name": None, "generation": 1},
    }
    assert message_rows(db_url)["early"]["state"] == "pending"
    assert build_row(db_url)["state"] == "running"

    with unit_of_work(db_url) as uow:  # the queue runner: the work is done
        uow.build(42).wait_for_message()

    assert message_rows(db_url)["early"]["state"] == "applied"
    row = build_row(db_url)
    assert (row["state"], row["status"]) == ("finished", 0)
    assert topics_of(db_url)[-3:] == [
        "herald.build_waiting",
        "herald.build_message_applied",
        "build_finished",
    ]


def test_pass_after_fail_is_ignored_with_the_reason(db_url: str, tmp_path: Path) -> None:
    seed_waiting(db_url)
    fail = send(db_url, "--type", "fail", "--id", "f1", cwd=tmp_path)
    assert_ok(fail)
    assert fail.stdout.splitlines() == [
        "message f1 to build 42 (fail, generation 1): applied",
        "build 42 finished: status 1, failed",
    ], describe(fail)

    late = send(db_url, "--type", "pass", "--id", "p1", cwd=tmp_path)
    assert_ok(late)  # the message was recorded: ignored is an outcome, not an error
    assert late.stdout.splitlines() == [
        "message p1 to build 42 (pass, generation 1): ignored: build already finished with status 1"
    ], describe(late)

    row = build_row(db_url)
    assert (row["state"], row["status"]) == ("finished", 1)
    messages = message_rows(db_url)
    assert (messages["p1"]["state"], messages["p1"]["reason"]) == (
        "ignored",
        "build already finished with status 1",
    )
    assert topics_of(db_url).count("build_finished") == 1


def test_a_message_to_an_earlier_generation_is_stale(db_url: str, tmp_path: Path) -> None:
    with unit_of_work(db_url) as uow:
        build = queue(uow, 42)
        build.start()
        build.finish(1)
        build.restart()
        build.start()
        build.wait_for_message()
    result = send(db_url, "--type", "pass", "--generation", "1", "--json", cwd=tmp_path)
    assert_ok(result)
    sent = json.loads(result.stdout)
    assert (sent["state"], sent["generation"], sent["build_finished"]) == ("stale", 1, False)
    assert sent["reason"] == "sent to generation 1; the build was restarted (generation 2)"
    assert sent["build"] == {
        "state": "waiting",
        "status": None,
        "status_name": None,
        "generation": 2,
    }
    assert len(sent["message_id"]) == 32  # a new uuid4, in hex
    assert build_row(db_url)["state"] == "waiting"
    assert message_rows(db_url)[sent["message_id"]]["state"] == "stale"


def test_the_same_id_twice_is_one_message(db_url: str, tmp_path: Path) -> None:
    seed_waiting(db_url)
    first = send(db_url, "--type", "work", "--id", "w1", cwd=tmp_path)
    assert_ok(first)
    assert first.stdout.splitlines() == ["message w1 to build 42 (work, generation 1): applied"]
    before = row_counts(db_url)

    again, other_type = herald_many(
        [
            Call(("message", "send", "42", "--type", "work", "--id", "w1", "--json"), db_url),
            Call(("message", "send", "42", "--type", "pass", "--id", "w1"), db_url),
        ],
        cwd=tmp_path,
    )
    assert_ok(again)
    sent = json.loads(again.stdout)
    assert (sent["state"], sent["already_received"], sent["build_finished"]) == (
        "applied",
        True,
        False,
    )
    assert_one_line_error(other_type, 2, mentions=["w1", "already received", "work"])
    assert row_counts(db_url) == before, "a repeated message wrote something"
    assert topics_of(db_url).count("build_message_received") == 1
    assert build_row(db_url)["state"] == "waiting"  # work keeps it waiting


def test_unknown_builds_and_bad_types_are_one_line_errors(db_url: str, tmp_path: Path) -> None:
    seed_waiting(db_url)
    before = row_counts(db_url)
    send_unknown, show_unknown, bad_type = herald_many(
        [
            Call(("message", "send", "99", "--type", "pass"), db_url),
            Call(("build", "show", "99"), db_url),
            Call(("message", "send", "42", "--type", "maybe"), db_url),
        ],
        cwd=tmp_path,
    )
    assert_one_line_error(send_unknown, 2, mentions=["build 99 does not exist"])
    assert_one_line_error(show_unknown, 2, mentions=["build 99 does not exist"])
    assert_one_line_error(bad_type, 2, mentions=["--type", "'maybe'", "'pass', 'fail', 'work'"])
    assert row_counts(db_url) == before


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (("message", "send", "42"), ["Missing option '--type'", "pass, fail, work"]),
        (("message", "send", "0", "--type", "pass"), ["BUILD"]),
        (("message", "send", "42", "--type", "pass", "--generation", "0"), ["--generation"]),
        (("message", "send", "42", "--type", "pass", "--id", "x" * 201), ["--id", "200"]),
        (("message", "send", "42", "--type", "pass", "--id", "a\tb"), ["--id", "control"]),
        (("build", "show", "forty-two"), ["BUILD"]),
        (("log", "--json", "--format", "hydra"), ["--json", "--format hydra"]),
        (("log", "--format", "xml"), ["--format", "xml"]),
    ],
    ids=[
        "no-type",
        "build-zero",
        "generation-zero",
        "id-too-long",
        "id-control",
        "build-not-a-number",
        "json-and-hydra",
        "unknown-format",
    ],
)
def test_bad_arguments_are_refused_before_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], mentions: list[str]
) -> None:
    """Refused while parsing, before a database is opened: cheap enough to check each
    in-process, through the command's own entry point."""
    database = tmp_path / "never.db"
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", f"sqlite:///{database}", *args])
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("herald"), err
    assert ": error: " in err, err
    for text in mentions:
        assert text in err, err
    assert not database.exists()


# -- version conflicts: reload and apply again -----------------------------------------------


@pytest.mark.postgresql
def test_a_concurrent_writer_is_retried_not_lost(pg_url: str, tmp_path: Path) -> None:
    """Another writer saves build 42 between the command's read and its write: the
    command's append waits for it, gets a version conflict, reloads and applies again;
    both changes are kept."""
    seed_waiting(pg_url)
    version = build_row(pg_url)["version"]
    engine = create_engine(pg_url)
    try:
        observing = engine.execution_options(isolation_level="AUTOCOMMIT")
        with engine.connect() as theirs, observing.connect() as observer:
            uow = UnitOfWork(theirs)
            uow.build(42).bump(500)
            uow.save()  # version + 1, not committed yet
            proc = subprocess.Popen(
                [str(HERALD), "message", "send", "42", "--type", "pass", "--id", "m1", "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=herald_env(pg_url, {"HERALD_DEBUG": "1"}),
                cwd=tmp_path,
            )
            try:
                # The command read version N and now waits on our uncommitted N + 1.
                waiting = sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                blocked = poll(lambda: observer.execute(waiting).scalar_one() > 0, timeout=30)
                theirs.commit()
                stdout, stderr = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    finally:
        engine.dispose()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert blocked, f"the command never waited for the other writer{describe(result)}"
    assert result.returncode == 0, describe(result)
    assert "retrying (attempt 2 of 3)" in stderr, describe(result)
    sent = json.loads(stdout)
    assert (sent["state"], sent["build_finished"]) == ("applied", True)
    row = build_row(pg_url)
    assert (row["state"], row["status"], row["priority"]) == ("finished", 0, 500)
    assert row["version"] == version + 3  # bumped, message received, finished
    events = event_rows(pg_url)
    assert [e.topic for e in events[-3:]] == [
        "build_bumped",
        "build_message_received",
        "build_finished",
    ]


def _conflicting_save(monkeypatch: pytest.MonkeyPatch, conflicts: int) -> Callable[[], int]:
    """Make the first ``conflicts`` saves raise VersionConflict (writing nothing)."""
    original = UnitOfWork.save
    calls = 0

    def save(self: UnitOfWork, *args: Any, **kwargs: Any) -> list[int]:
        nonlocal calls
        calls += 1
        if calls <= conflicts:
            raise VersionConflict("build-42", calls)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UnitOfWork, "save", save)
    return lambda: calls


def test_send_message_retries_a_version_conflict(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_waiting(db_url)
    calls = _conflicting_save(monkeypatch, conflicts=2)
    engine = create_engine(db_url)
    try:
        sent = cli.send_message(engine, 42, "m1", "pass")
    finally:
        engine.dispose()
    assert calls() == 3
    assert (sent.state, sent.build_finished, sent.already_received) == ("applied", True, False)
    assert topics_of(db_url).count("build_message_received") == 1
    assert build_row(db_url)["status"] == 0


def test_message_send_gives_up_after_three_conflicts(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_waiting(sqlite_url)
    before = row_counts(sqlite_url)
    calls = _conflicting_save(monkeypatch, conflicts=10)
    with pytest.raises(SystemExit) as info:
        cli.main(["--database-url", sqlite_url, "message", "send", "42", "--type", "pass"])
    out, err = capsys.readouterr()
    assert info.value.code == 1
    assert calls() == 3
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("herald: error: version conflict"), err
    assert row_counts(sqlite_url) == before


# -- herald build show -----------------------------------------------------------------------


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat()
    return value


def _projection(url: str, build_id: int, generation: int) -> dict[str, Any]:
    with connect(url) as conn:
        row = conn.execute(sa.select(builds).where(builds.c.build_id == build_id)).one()
        steps = conn.execute(
            sa.select(build_steps)
            .where(build_steps.c.build_id == build_id, build_steps.c.generation == generation)
            .order_by(build_steps.c.step_nr)
        ).all()
        messages = conn.execute(
            sa.select(build_messages).where(build_messages.c.build_id == build_id)
        ).all()
    return {
        "build": {k: _iso(v) for k, v in row._mapping.items()},
        "steps": [{k: _iso(v) for k, v in s._mapping.items()} for s in steps],
        "messages": {m.message_id: {k: _iso(v) for k, v in m._mapping.items()} for m in messages},
    }


def test_build_show_prints_the_projection(db_url: str, tmp_path: Path) -> None:
    with unit_of_work(db_url) as uow:
        build = queue(uow, 42, dependencies=(7, 8))
        build.start()
        build.start_step(1, "builder-1")
        build.finish_step(1, 1, "/log/42-1")
        build.finish(1)
        build.receive_message("late", "pass")  # ignored: already finished
        build.restart()
        build.start()
        build.start_step(1, "builder-2")
        build.finish_step(1, 0, "/log/42-2")
        build.start_step(2, "builder-3")
        build.receive_message("early", "fail")  # pending: not waiting yet
    shown, shown_json = herald_many(
        [Call(("build", "show", "42"), db_url), Call(("build", "show", "42", "--json"), db_url)],
        cwd=tmp_path,
    )
    assert_ok(shown_json)
    view = json.loads(shown_json.stdout)
    expected = _projection(db_url, 42, generation=2)
    assert {k: v for k, v in view.items() if k not in ("steps", "messages", "status_name")} == (
        expected["build"]
    )
    assert view["status_name"] is None
    assert [{k: v for k, v in s.items() if k != "status_name"} for s in view["steps"]] == (
        expected["steps"]
    )
    assert [s["status_name"] for s in view["steps"]] == ["succeeded", None]
    assert {m["message_id"]: m for m in view["messages"]} == expected["messages"]
    assert [m["message_id"] for m in view["messages"]] == ["late", "early"]  # as received

    assert_ok(shown)
    lines = shown.stdout.splitlines()
    assert lines[0] == "build 42: running", describe(shown)
    text = shown.stdout
    for fragment in (
        "job-42 (jobset 1)",
        "/nix/store/42-job.drv",
        "x86_64-linux",
        "dependencies  7, 8",
        "generation    2",
        "steps of generation 2: 2",
        "1  builder-2  status 0 (succeeded)  log /log/42-2",
        "2  builder-3  running",
        "late  pass  generation 1  ignored: build already finished with status 1",
        "early  fail  generation 2  pending",
    ):
        assert fragment in text, f"{fragment!r} missing{describe(shown)}"
    assert "builder-1" not in text  # a step of the earlier generation


def test_build_show_names_hydra_statuses(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with unit_of_work(sqlite_url) as uow:
        queue(uow, 42).finish(0)  # substituted: it never started
        timed_out = queue(uow, 43)
        timed_out.start()
        timed_out.finish(7)
        queue(uow, 44).cancel()
    headlines = []
    for build_id in (42, 43, 44):
        cli.main(["--database-url", sqlite_url, "build", "show", str(build_id)])
        headlines.append(capsys.readouterr().out.splitlines()[0])
    assert headlines == [
        "build 42: finished, status 0 (succeeded), outputs substituted",
        "build 43: finished, status 7 (timed out)",
        "build 44: cancelled, status 4 (cancelled)",
    ]


# -- herald log --format hydra -----------------------------------------------------------------


def test_log_in_hydra_s_form(db_url: str, tmp_path: Path) -> None:
    with unit_of_work(db_url) as uow:
        failing = queue(uow, 42)
        queue(uow, 43, dependencies=(42,))
        queue(uow, 44, dependencies=(42,))
        failing.start()
        failing.start_step(1, "builder-1")
        failing.finish_step(1, 1, None)
        failing.finish(1, dependent_ids=[43, 44])
        uow.build(43).fail_because_of(42)
        uow.build(44).fail_because_of(42)
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            append(conn, "acme.deploy_started", {"build_id": 42})
            append(conn, "cached_build_finished", {"eval_id": 3, "build_id": 42})
    finally:
        engine.dispose()

    hydra, hydra_two, as_json = herald_many(
        [
            Call(("log", "--format", "hydra"), db_url),
            Call(("log", "--format", "hydra", "--limit", "2", "--from", "7"), db_url),
            Call(("log", "--format", "json"), db_url),
        ],
        cwd=tmp_path,
    )
    for result in (hydra, hydra_two, as_json):
        assert_ok(result)
    assert hydra.stdout.splitlines() == [
        "build_queued\t42",
        "build_queued\t43",
        "build_queued\t44",
        "build_started\t42",
        "step_started\t42\t1",
        "step_finished\t42\t1\t",  # no log file: the empty value
        "build_finished\t42\t43\t44",
        # herald.build_dependency_failed (twice) and acme.deploy_started: no Hydra form
        "cached_build_finished\t3\t42",
    ], describe(hydra)
    # --limit counts printed lines: seqs 8-10 have no Hydra form and are skipped.
    assert hydra_two.stdout.splitlines() == [
        "build_finished\t42\t43\t44",
        "cached_build_finished\t3\t42",
    ], describe(hydra_two)
    assert [json.loads(line)["topic"] for line in as_json.stdout.splitlines()] == topics_of(db_url)
