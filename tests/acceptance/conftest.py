"""Helpers for the acceptance tests: the real ``herald`` command in a subprocess.

Every test runs the installed console script (next to the test's Python) with
``HERALD_DATABASE_URL`` in its environment and checks what it printed *and*
what it left in the database. herald's own ``HERALD_*`` settings of the
calling shell never leak into the subprocess.

One ``herald`` start costs most of a second of CPU (imports), so tests that
need many independent runs start them concurrently (:func:`herald_many`).
Long-running commands (``herald run``, ``herald log --follow``) go through
the :func:`processes` fixture: their output goes to files (no pipe can fill
up and block them) and every process still alive at teardown is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from herald.config import create_engine
from herald.schema import events, log_order

HERALD = Path(sys.executable).parent / "herald"

#: The longest any single non-daemon command may take before the test fails.
COMMAND_TIMEOUT = 60.0


def herald_env(database_url: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a herald subprocess: ours without HERALD_*, plus the URL."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HERALD_")}
    if database_url is not None:
        env["HERALD_DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


@dataclass(frozen=True, slots=True)
class Call:
    """One run of ``herald`` with its arguments, database and stdin."""

    args: tuple[str, ...]
    database_url: str | None
    stdin: str | None = None
    env: dict[str, str] = field(default_factory=dict)


Result = subprocess.CompletedProcess[str]


def herald(
    database_url: str | None,
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Result:
    """Run ``herald ARGS`` to completion; never raises on a non-zero exit."""
    return subprocess.run(
        [str(HERALD), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=herald_env(database_url, env),
        cwd=cwd,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def herald_many(calls: Sequence[Call], cwd: Path | None = None) -> list[Result]:
    """Run independent herald commands concurrently; results in the calls' order."""

    def run(call: Call) -> Result:
        return herald(call.database_url, *call.args, stdin=call.stdin, env=call.env, cwd=cwd)

    # A few at a time: each start is CPU-bound (imports), more would only thrash.
    with ThreadPoolExecutor(max_workers=max(1, min(len(calls), 4))) as pool:
        return list(pool.map(run, calls))


def describe(result: Result) -> str:
    """A result for an assertion message (long outputs shortened)."""

    def short(text: str) -> str:
        return text if len(text) <= 2000 else text[:1000] + " [...] " + text[-1000:]

    args = " ".join(str(arg)[:80] for arg in result.args)
    return (
        f"\n$ {args}\nexit status {result.returncode}\n"
        f"--- stdout ---\n{short(result.stdout)}\n--- stderr ---\n{short(result.stderr)}"
    )


def assert_ok(result: Result) -> None:
    """Exit status 0 and no traceback."""
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)


def assert_one_line_error(result: Result, exit_code: int, mentions: Sequence[str] = ()) -> str:
    """The CLI's error contract: one ``herald...error`` line on stderr, the exit status,
    no traceback, nothing on stdout; returns the line."""
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr{describe(result)}"
    line = lines[0]
    assert line.startswith("herald"), describe(result)
    assert "error" in line, describe(result)
    assert result.returncode == exit_code, describe(result)
    assert result.stdout == "", describe(result)
    for text in mentions:
        assert text in line, f"the error does not mention {text!r}{describe(result)}"
    return line


# -- the database, seen directly ---------------------------------------------------------


@contextmanager
def connect(database_url: str) -> Iterator[sa.Connection]:
    """A connection to herald's database (a throwaway engine), for checking rows."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def row_counts(database_url: str) -> tuple[int, int]:
    """(rows in the events table, rows in the log order table)."""
    with connect(database_url) as conn:
        n_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
        n_log = conn.execute(sa.select(sa.func.count()).select_from(log_order)).scalar_one()
    return int(n_events), int(n_log)


def log_order_rows(database_url: str) -> list[tuple[int, int]]:
    """Every (seq, position) of the log order table, by seq."""
    with connect(database_url) as conn:
        rows = conn.execute(sa.select(log_order.c.seq, log_order.c.position).order_by("seq"))
        return [(int(seq), int(position)) for seq, position in rows]


def event_rows(database_url: str) -> list[sa.Row[Any]]:
    """Every row of the events table, by position."""
    with connect(database_url) as conn:
        return list(conn.execute(sa.select(events).order_by(events.c.position)))


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
) -> float:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, saying ``what`` did not
    happen and then ``details()``. Returns the seconds waited."""
    started = time.monotonic()
    if not poll(condition, timeout):
        pytest.fail(f"not within {timeout} s: {what}{details()}")
    return time.monotonic() - started


# -- many databases at once ----------------------------------------------------------------

#: The PostgreSQL server the test suite uses (as tests/conftest.py reads it).
ADMIN_URL = os.environ.get(
    "HERALD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg.Connection[Any]:
    url = make_url(ADMIN_URL).set(drivername="postgresql")
    return psycopg.connect(
        url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5
    )


def _pg_url(name: str) -> str:
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@contextmanager
def seeded_databases(
    request: pytest.FixtureRequest,
    backend: str,
    names: Sequence[str],
    seed: Callable[[str], None],
    directory: Path,
) -> Iterator[dict[str, str]]:
    """One migrated database per name (a URL each), all copies of one database that
    ``seed(url)`` filled; dropped afterwards. For fixtures broader than a test, which
    cannot use ``sqlite_url`` / ``pg_url``; built from the same session templates."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        seed_path = directory / "seed.db"
        shutil.copyfile(template, seed_path)
        seed(f"sqlite:///{seed_path}")
        urls: dict[str, str] = {}
        for i, name in enumerate(names):
            path = directory / f"case{i}.db"
            shutil.copyfile(seed_path, path)
            urls[name] = f"sqlite:///{path}"
        yield urls
        return
    pg_template: str = request.getfixturevalue("pg_template")
    prefix = f"herald_acceptance_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    created: list[str] = []
    try:
        with _admin() as admin:
            admin.execute(f'CREATE DATABASE "{prefix}_seed" TEMPLATE "{pg_template}"')
            created.append(f"{prefix}_seed")
        seed(_pg_url(f"{prefix}_seed"))
        urls = {}
        with _admin() as admin:
            for i, name in enumerate(names):
                admin.execute(f'CREATE DATABASE "{prefix}_{i}" TEMPLATE "{prefix}_seed"')
                created.append(f"{prefix}_{i}")
                urls[name] = _pg_url(f"{prefix}_{i}")
        yield urls
    finally:
        with _admin() as admin:
            for db in created:
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# -- long-running herald processes ---------------------------------------------------------


class HeraldProcess:
    """A herald command running in the background, its output going to files."""

    def __init__(self, name: str, args: Sequence[str], database_url: str, directory: Path) -> None:
        self.name = name
        self.args = tuple(args)
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # The child keeps its own copies of the descriptors.
            self.proc = subprocess.Popen(
                [str(HERALD), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=herald_env(database_url),
                cwd=directory,
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        status = self.proc.poll()
        return (
            f"\n[{self.name}: herald {' '.join(self.args)}; "
            f"{'running' if status is None else f'exit status {status}'}]\n"
            f"--- stdout ---\n{self.stdout()[-3000:]}\n--- stderr ---\n{self.stderr()[-3000:]}"
        )

    def wait_for_stderr(self, text: str, timeout: float) -> float:
        """Wait until ``text`` appears on stderr; fail if the process ends first or the
        time runs out. Returns the seconds waited."""
        started = time.monotonic()
        while text not in self.stderr():
            if self.proc.poll() is not None and text not in self.stderr():
                pytest.fail(f"{self.name} ended before printing {text!r}{self.describe()}")
            if time.monotonic() - started > timeout:
                pytest.fail(
                    f"{self.name} did not print {text!r} within {timeout} s{self.describe()}"
                )
            time.sleep(0.02)
        return time.monotonic() - started

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end; fail (and kill it) if it takes longer than ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name} did not exit within {timeout} s{self.describe()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Processes:
    """Starts herald processes for one test and kills the survivors at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[HeraldProcess] = []

    def start(self, name: str, database_url: str, *args: str) -> HeraldProcess:
        process = HeraldProcess(name, args, database_url, self.directory)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Start background herald commands; none outlives the test."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()
