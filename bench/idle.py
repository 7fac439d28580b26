"""B8: what an idle herald costs the database: queries per second and WAL bytes.

Run with ``make bench`` or ``.venv/bin/python -m bench.idle``.

A scratch database (``herald_bench_idle``, dropped first) is migrated, a
small log appended, and ``herald run`` started with three consumers (a
``jsonl`` file each); once they have caught up, nothing happens for
``--seconds``. Measured over that window:

* **statements**: every statement the server ran in the scratch database,
  counted from the server's own log (``log_statement = 'all'`` set on that
  database only, so every herald session logs; the lines are told apart by
  the ``user@database`` the default Debian ``log_line_prefix`` carries; the
  log is ``--server-log``, default the Debian cluster's file);
* **WAL bytes**: ``pg_current_wal_lsn()`` before and after (the whole
  cluster: the figure is exact only when nothing else writes; the report
  says how many other sessions there were);
* **transactions**: ``xact_commit + xact_rollback`` of the database from
  ``pg_stat_database``.

The comparison is the target itself (≤ 50 statements/s, no writes). It
rewrites its section of ``BENCHMARKS.md`` (between the ``bench.idle``
markers) and drops the scratch database.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import psycopg
from sqlalchemy.engine import make_url

from bench.append_throughput import (
    Machine,
    _herald_command,
    conninfo,
    create_scratch,
    describe_machine,
    drop_scratch,
    git_revision,
)
from bench.common import add_server_options, markers, run_script, write_section
from herald.config import create_engine
from herald.outbox import NewEvent, append_many

BEGIN_MARK, END_MARK = markers("bench.idle")
DEFAULT_LOG: Final = "/var/log/postgresql/postgresql-15-main.log"
CONFIG: Final = """
[consumers.github]
type = "jsonl"
topics = ["build_*"]
path = "{dir}/github.jsonl"

[consumers.webhook]
type = "jsonl"
topics = ["*"]
path = "{dir}/webhook.jsonl"

[consumers.metrics]
type = "jsonl"
topics = ["step_*", "acme.*"]
delivery = "ephemeral"
path = "{dir}/metrics.jsonl"
"""


def _statement_kind(sql: str) -> str:
    words = re.sub(r"\s+", " ", sql.strip()).split(" ")
    head = " ".join(words[:4])
    return head[:60]


#: A logged statement: simple protocol ("statement: ...") or extended ("execute <name>: ...").
_STATEMENT: Final = re.compile(r"LOG:\s+(?:statement|execute [^:]*): (.*)$")


def _statements_since(path: Path, offset: int, database: str) -> list[str]:
    """The SQL of every statement the server logged for ``database`` after ``offset``."""
    marker = f"@{database} "
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    matches = (_STATEMENT.search(line) for line in text.splitlines() if marker in line)
    return [match.group(1) for match in matches if match is not None]


def _window(
    admin: str, database: str, server_log: Path, seconds: float
) -> tuple[float, list[str], int, int]:
    """Wait ``seconds``: elapsed, the statements, WAL bytes, transactions in that time."""
    offset = server_log.stat().st_size
    lsn_before, xacts_before = _wal_and_xacts(admin, database)
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    lsn_after, xacts_after = _wal_and_xacts(admin, database)
    statements = _statements_since(server_log, offset, database)
    wal = _wal_bytes(admin, lsn_before, lsn_after)
    return elapsed, statements, wal, xacts_after - xacts_before


def _wal_and_xacts(admin: str, database: str) -> tuple[str, int]:
    with psycopg.connect(admin, autocommit=True) as conn:
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        xacts = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    return (str(lsn[0]) if lsn else "0/0"), int(xacts[0]) if xacts else 0


def _wal_bytes(admin: str, before: str, after: str) -> int:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after, before)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class Idle:
    machine: Machine
    seconds: float
    statements: int
    transactions: int
    wal_bytes: int
    #: the same window without herald
    baseline_wal_bytes: int
    kinds: Counter[str]

    @property
    def per_second(self) -> float:
        return self.statements / self.seconds


def measure(args: argparse.Namespace) -> Idle:
    admin_url = make_url(args.admin)
    admin = conninfo(admin_url)
    server_log = Path(args.server_log)
    if not server_log.is_file() or not os.access(server_log, os.R_OK):
        raise SystemExit(
            f"--server-log {server_log}: not a readable file; the statements are counted "
            "from the server's log (SHOW data_directory, /var/log/postgresql/...)"
        )
    url = create_scratch(admin_url, args.database, 1)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE \"{args.database}\" SET log_statement = 'all'")
        engine = create_engine(url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            append_many(conn, [NewEvent("acme.tick", {"n": n}) for n in range(200)])
        engine.dispose()
        machine = describe_machine(admin_url, args.database)
        # The comparison: the same window with no herald running (the server's own
        # background writes, e.g. its running-transactions record every 15 s).
        _, _, baseline_wal, _ = _window(admin, args.database, server_log, args.seconds)
        with tempfile.TemporaryDirectory() as work:
            config = Path(work) / "herald.toml"
            config.write_text(CONFIG.format(dir=work))
            env = dict(
                os.environ,
                HERALD_DATABASE_URL=url.render_as_string(hide_password=False),
                HERALD_CONFIG=str(config),
            )
            daemon = subprocess.Popen(
                [*_herald_command(), "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(args.warmup)  # started, claimed, caught up
                elapsed, lines, wal, xacts = _window(admin, args.database, server_log, args.seconds)
            finally:
                daemon.terminate()
                daemon.wait(15)
    finally:
        drop_scratch(admin_url, args.database)
    kinds = Counter(_statement_kind(sql) for sql in lines)
    return Idle(machine, elapsed, len(lines), xacts, wal, baseline_wal, kinds)


def markdown(result: Idle, args: argparse.Namespace) -> str:
    machine = result.machine
    per_second, wal, kinds, seconds = (
        result.per_second,
        result.wal_bytes,
        result.kinds,
        result.seconds,
    )
    rows = "\n".join(
        f"| `{kind}` | {count} | {count / seconds:.2f} |" for kind, count in kinds.most_common()
    )
    verdict_q = "meets" if per_second <= 50 else "misses"
    baseline = result.baseline_wal_bytes
    verdict_w = "meets" if wal <= baseline else "misses"
    return f"""{BEGIN_MARK}

## B8 — idle cost (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/idle.py`. {git_revision()}.

**Machine.** {machine.cores} cores ({machine.cpu_model}), PostgreSQL {machine.server_version}
on the same machine, `{", ".join(f"{k}={v}" for k, v in machine.settings.items())}`; other
client sessions on the server at the start: {machine.other_sessions}.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.idle --seconds {args.seconds:g}
--warmup {args.warmup:g}` (`--server-log`, `--admin`, `--database`, `--help`).

**What is measured.** `herald run` with three consumers (the sequencer, three runners, one
listening session), all caught up with a 200-event log, then {seconds:.1f} s of nothing:
every statement the server ran in herald's database (its log, `log_statement = 'all'` on
that database), the WAL the cluster wrote, and the database's transactions.

| | measured | target | |
|---|---|---|---|
| statements/s | {per_second:.1f} ({result.statements} in {seconds:.1f} s) | ≤ 50 | {verdict_q} |
| WAL bytes written | {wal} (no herald, same window: {baseline}) | 0 (no writes) | {verdict_w} |
| transactions/s | {result.transactions / seconds:.1f} | — | |

Statements by kind (first words):

| statement | count | per s |
|---|---|---|
{rows}

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="The idle window.")
    parser.add_argument("--warmup", type=float, default=5.0, help="Before the window.")
    add_server_options(parser, "herald_bench_idle")
    parser.add_argument("--server-log", default=DEFAULT_LOG, help="The server's log file.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    section = markdown(result, args)
    print(section)
    write_section(Path(args.markdown), "bench.idle", section)


if __name__ == "__main__":
    run_script(main)
