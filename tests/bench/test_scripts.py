"""Every benchmark script of ``make bench`` runs to the end at a small size.

``make bench`` takes half an hour and is not part of ``make test``; these runs
keep its scripts working between full runs. Each script runs as ``make
bench`` runs it (``python -m bench.NAME``, a subprocess) against the test
server, with sizes that take seconds, and writes its section into a report
in a temporary directory. Each test checks that the script ended with exit
status 0, that its section is in the report between its markers with
today's date, that the consistency checks the script makes of its own runs
(rows written against rows counted, events delivered against events
appended) say so, and that its scratch databases are gone.

The figures are not checked: at these sizes they mean nothing. Not run
here: ``bench.plot``, which draws the other scripts' samples with
matplotlib, the ``bench`` extra that ``make test`` does not install.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from bench.common import markers
from tests.conftest import PREFIX, _admin, _admin_url

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]


def _scratch(name: str) -> str:
    # The test runs' prefix: a run killed midway leaves databases the next one drops.
    return f"{PREFIX}_bench_{name}"


#: script → (its arguments at a small size, with {admin}, {database}, {dir}; the sections it
#: writes; phrases its section must hold). Sizes: seconds of work each.
SCRIPTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "append_throughput": (
        [
            "--database-url", "{admin}", "--database", "{database}", "--sqlite-dir", "{dir}",
            "--seconds", "0.2", "--warmup", "0.05", "--rounds", "1", "--writers", "1",
            "--no-thread-check", "--rows", "20", "--sqlite-writers", "1", "--rate", "50",
            "--latency-seconds", "0.5", "--latency-warmup", "0.1",
        ],
        ["## B1 — append throughput", "## B9 — B1 on the SQLite default"],
        ["they match", "all equal"],
    ),
    "unit_of_work": (
        [
            "--database-url", "{admin}", "--database", "{database}", "--sqlite-dir", "{dir}",
            "--seconds", "0.4", "--warmup", "0.05", "--rounds", "1", "--writers", "1",
            "--sqlite-writers", "1", "--calibration", "20",
        ],
        ["## Unit of work: saving a build finish"],
        ["consistent"],
    ),
    "consumers": (
        [
            "--database-url", "{admin}", "--database", "{database}", "--sqlite-dir", "{dir}",
            "--samples", "{dir}/samples", "--quick", "--write", "--events", "2000",
            "--sqlite-events", "500", "--daemon-batch-sizes", "100", "--rates", "50",
            "--rounds", "1", "--latency-seconds", "0.5", "--latency-warmup", "0.1",
            "--sqlite-rates", "20",
        ],
        ["## B3 — the consumer daemon"],
        ["consistent", "0 missing, 0 duplicate"],
    ),
    "idle": (
        ["--admin", "{admin}", "--database", "{database}", "--seconds", "1", "--warmup", "0.2"],
        ["## B8 — idle cost"],
        ["| statements/s |", "| WAL bytes written |"],
    ),
    "long_transaction": (
        [
            "--admin", "{admin}", "--database", "{database}", "--samples", "{dir}/samples",
            "--hold", "1", "--rate", "20", "--lead", "0.3", "--tail", "0.3", "--warmup", "0.2",
        ],
        ["## B6 — latency while a write transaction stays open"],
        ["herald p99"],
    ),
    "replay": (
        ["--admin", "{admin}", "--database", "{database}", "--events", "2000", "--batch", "100"],
        ["## B4 — replay of 2,000 events"],
        ["| herald replay, batch_size 100 | 2,000 |"],
    ),
    "bulk": (
        ["--admin", "{admin}", "--database", "{database}", "--builds", "200", "--rounds", "1"],
        ["## B2 — bulk: one evaluation adding 200 builds"],
        ["COPY / herald = **"],
    ),
    "scale": (
        [
            "--admin", "{admin}", "--database", "{database}", "--small", "2000", "--big", "6000",
            "--rounds", "1", "--window", "500", "--page", "100", "--writers", "1",
            "--seconds", "0.3", "--warmup", "0.1", "--read-trials", "1",
            "--ordering-trials", "1", "--read-seconds", "0.05", "--ordering-seconds", "0.05",
            "--chunk", "1000",
        ],
        ["## B7 — append and read rates with 6,000 events in the log"],
        ["Result: **", "Where the newest window lies at the end", " reads, the first "],
    ),
    "free_space": (
        [
            "--admin", "{admin}", "--database", "{database}", "--events", "5000",
            "--appends", "200", "--writers", "2", "--chunk", "1000",
        ],
        ["## B7's scatter: where appends go on a big log"],
        ["| lifecycle | 200 |", "| build_finished alone | 200 |"],
    ),
}  # fmt: skip


#: the scripts that name the server (a superuser's URL) --database-url, not --admin
_DATABASE_URL = ("append_throughput", "unit_of_work", "consumers")
#: the scripts that name the report they write into --output, not --markdown
_OUTPUT = ("unit_of_work", "consumers")


def _url_option(script: str) -> str:
    return "--database-url" if script in _DATABASE_URL else "--admin"


def _report_option(script: str) -> str:
    return "--output" if script in _OUTPUT else "--markdown"


def _databases(prefix: str) -> list[str]:
    with _admin() as admin:
        rows = admin.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    return [name for (name,) in rows]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_benchmark_script_runs_and_writes_its_section(script: str, tmp_path: Path) -> None:
    arguments, headings, phrases = SCRIPTS[script]
    database = _scratch(script)
    admin = _admin_url().render_as_string(hide_password=False)
    values = {"admin": admin, "database": database, "dir": str(tmp_path)}
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# herald benchmarks\n\n## Reliability\n\nkept as it is\n", encoding="utf-8")
    command = [sys.executable, "-m", f"bench.{script}", _report_option(script), str(report)]
    command += [argument.format(**values) for argument in arguments]

    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit status {done.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    text = report.read_text(encoding="utf-8")
    begin, end = markers(f"bench.{script}")
    assert text.count(begin) == 1, f"no section of bench.{script} in the report:\n{text[:2000]}"
    assert text.count(end) == 1
    section = text[text.index(begin) : text.index(end)]
    assert f"Date: {datetime.now(UTC):%Y-%m-%d}" in section
    for heading in headings:
        assert heading in section, f"{heading!r} is not in the section:\n{section[:2000]}"
    for phrase in phrases:
        assert phrase in section, f"{phrase!r} is not in the section:\n{section}"
    assert "inconsistent" not in section
    # The hand-written part of the report is left as it was, after the new section.
    assert text.endswith("## Reliability\n\nkept as it is\n")
    assert text.index(end) < text.index("## Reliability")
    assert _databases(database) == []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_server_that_does_not_answer_is_one_line_and_no_report(
    script: str, tmp_path: Path
) -> None:
    report = tmp_path / "BENCHMARKS.md"
    # Port 9 (discard): nothing listens there.
    unreachable = _admin_url().set(host="127.0.0.1", port=9).render_as_string(hide_password=False)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(unreachable.replace("+psycopg", ""), connect_timeout=2).close()
    done = subprocess.run(
        [
            sys.executable, "-m", f"bench.{script}", _url_option(script), unreachable,
            _report_option(script), str(report), "--database", _scratch(script),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m bench.{script}: cannot connect to PostgreSQL: "), lines
    assert "port 9" in lines[0]
    assert not report.exists()
