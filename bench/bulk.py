"""B2: one evaluation adding 50,000 builds, against a raw COPY of the same rows.

Run with ``make bench`` or ``.venv/bin/python -m bench.bulk``.

A template database (``herald_bench_bulk``, dropped first and at the end) is
migrated as ``herald db upgrade`` does and holds one started evaluation
(``eval_started``, saved through the unit of work). Every timed run gets a
fresh copy of it (``herald_bench_bulk_round``, ``CREATE DATABASE ...
TEMPLATE``), so both sides write into the same state: the same tables,
indexes, constraints and triggers, and no rows of an earlier run. Then, in
``--rounds`` mirrored rounds (herald then COPY, COPY then herald, ...):

* **herald**: one transaction, timed from ``engine.begin()`` until the commit
  returned: ``herald.outbox.farm.add_evaluation(uow, trace_id, eval_id,
  new_builds)`` with ``--builds`` ``NewBuild``\\ s (after the first 100
  builds each depends on one of those 100, like a jobset whose packages share
  a few base builds), ``uow.save()``, commit. The rows it wrote are read back
  afterwards (not timed).
* **raw COPY**: psycopg 3, one transaction, timed from the first statement
  until the commit returned: ``COPY ... FROM STDIN (FORMAT BINARY)`` of
  exactly the rows herald wrote (the latest herald run's), from Python
  tuples: ``herald_events`` (``tx`` and ``recorded_at`` left to their
  defaults, as herald leaves them), ``herald_builds``,
  ``herald_build_dependencies``, then the one ``UPDATE`` of the evaluation's
  ``herald_evaluations`` row. On PostgreSQL the sequencer orders the events
  later, in its own transaction, so ``herald_log`` is written by neither.

Target: COPY time / herald time ≥ 0.5. Writes its section of
``BENCHMARKS.md`` (between the ``bench.bulk`` markers).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from bench.append_throughput import (
    Machine,
    conninfo,
    describe_machine,
    git_revision,
)
from bench.common import add_server_options, markers, run_script, write_section
from herald.config import create_engine
from herald.domain import Evaluation
from herald.outbox import UnitOfWork, sync_catalogue
from herald.outbox.farm import NewBuild, add_evaluation
from herald.schema import migrate

BEGIN_MARK, END_MARK = markers("bench.bulk")

TRACE_ID: Final = "bench-bulk-eval"
JOBSET: Final = 2
EVAL_ID: Final = 1
#: the build ids of the evaluation's builds
IDS_FROM: Final = 500_000_000
#: builds the others depend on
BASES: Final = 100

#: The tables herald writes in the transaction, with the columns the COPY
#: gives (``herald_events``: all but ``tx`` and ``recorded_at``, which keep
#: their defaults, as in herald's own INSERT).
EVENT_COLUMNS: Final = (
    "position",
    "topic",
    "payload",
    "delivery",
    "dedupe_key",
    "aggregate_id",
    "aggregate_version",
    "trace_id",
    "occurred_at",
)
COPIED: Final = ("herald_events", "herald_builds", "herald_build_dependencies")
EVALUATION_COLUMNS: Final = (
    "state",
    "eval_id",
    "new_builds",
    "cached_builds",
    "version",
    "updated_at",
)


def new_builds(count: int) -> list[NewBuild]:
    """``count`` builds; after the first 100, each depends on one of those 100."""
    rng = random.Random(3)
    bases = min(BASES, count)
    return [
        NewBuild(
            IDS_FROM + i,
            f"bench.eval.job{i}",
            f"/nix/store/{rng.getrandbits(128):032x}-job{i}.drv",
            rng.choice(["x86_64-linux", "aarch64-linux"]),
            dependencies=() if i < bases else (IDS_FROM + rng.randrange(bases),),
        )
        for i in range(count)
    ]


# -- the databases ----------------------------------------------------------------


def _admin(admin: URL) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo(admin), autocommit=True, connect_timeout=5)


def _drop(admin: URL, name: str) -> None:
    with _admin(admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_template(admin: URL, name: str) -> None:
    """``name``, migrated, with the evaluation started (its own transaction)."""
    _drop(admin, name)
    with _admin(admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(admin.set(database=name))
    try:
        with engine.connect() as conn:
            migrate.upgrade(conn)
            with conn.begin():
                sync_catalogue(conn)
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            uow.add(Evaluation(TRACE_ID, JOBSET))
            uow.save()
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()
    finally:
        engine.dispose()


@contextmanager
def fresh_copy(admin: URL, template: str) -> Iterator[URL]:
    """A new database copied from ``template``, dropped on the way out."""
    name = f"{template}_round"
    _drop(admin, name)
    with _admin(admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield admin.set(database=name)
    finally:
        _drop(admin, name)


# -- the runs ---------------------------------------------------------------------


@dataclass(slots=True)
class Captured:
    """The rows one herald transaction wrote, as Python tuples (what COPY is given)."""

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the evaluation's row, as the UPDATE leaves it
    evaluation: tuple[Any, ...] = ()

    @property
    def total(self) -> int:
        return sum(len(rows) for rows in self.rows.values()) + 1


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    round: int
    seconds: float
    #: herald: add_evaluation, save, commit; COPY: each table's COPY, the UPDATE, commit
    phases: tuple[tuple[str, float], ...]
    rows: int
    #: this process's CPU time in the timed part (the client's share of the work)
    cpu: float
    #: the server process's CPU time in the timed part (nan where /proc cannot tell)
    server_cpu: float


def backend_cpu(pid: int) -> float:
    """CPU seconds the server process ``pid`` has used (from /proc: same machine only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # after the command name: utime and stime are fields 14 and 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _columns(conn: psycopg.Connection[Any], table: str) -> tuple[str, ...]:
    names = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return tuple(str(row[0]) for row in names)


def capture(url: URL, first_position: int) -> Captured:
    """What herald's transaction wrote in the database at ``url`` (after ``first_position``)."""
    found = Captured()
    with psycopg.connect(conninfo(url)) as conn:
        found.columns["herald_events"] = EVENT_COLUMNS
        found.rows["herald_events"] = conn.execute(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM herald_events WHERE position >= %s "
            "ORDER BY position",
            (first_position,),
        ).fetchall()
        for table in ("herald_builds", "herald_build_dependencies"):
            columns = _columns(conn, table)
            found.columns[table] = columns
            found.rows[table] = conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} WHERE build_id >= %s ORDER BY build_id",
                (IDS_FROM,),
            ).fetchall()
        row = conn.execute(
            f"SELECT {', '.join(EVALUATION_COLUMNS)} FROM herald_evaluations WHERE trace_id = %s",
            (TRACE_ID,),
        ).fetchone()
        if row is None or row[0] != "added":
            raise SystemExit("herald's transaction did not record the evaluation as added")
        found.evaluation = tuple(row)
    return found


def herald_run(url: URL, specs: Sequence[NewBuild], round_nr: int) -> tuple[Run, Captured]:
    """One evaluation adding ``specs`` through the domain, end to end; the rows it wrote."""
    # One connection, made before the clock starts (its server process is watched).
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            first = conn.execute(
                sa.text("SELECT coalesce(max(position), 0) + 1 FROM herald_events")
            )
            first_position = int(first.scalar_one())
            pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        server0 = backend_cpu(pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            add_evaluation(uow, TRACE_ID, EVAL_ID, specs)
            t1 = time.perf_counter()
            uow.save()
            t2 = time.perf_counter()
        t3, cpu = time.perf_counter(), time.process_time() - cpu0
        server = backend_cpu(pid) - server0
    finally:
        engine.dispose()
    found = capture(url, first_position)
    phases = (("add_evaluation", t1 - t0), ("save", t2 - t1), ("commit", t3 - t2))
    return Run("herald", round_nr, t3 - t0, phases, found.total, cpu, server), found


def copy_run(url: URL, found: Captured, round_nr: int) -> Run:
    """The rows in ``found`` written by binary COPY (and one UPDATE), end to end."""
    phases: list[tuple[str, float]] = []
    with psycopg.connect(conninfo(url)) as conn:
        types: dict[str, list[int]] = {}
        for table, columns in found.columns.items():
            rows = conn.execute(
                "SELECT attname, atttypid::int FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0",
                (table,),
            ).fetchall()
            oid: dict[str, int] = dict(rows)
            types[table] = [oid[name] for name in columns]
        conn.rollback()
        server0 = backend_cpu(conn.info.backend_pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        mark = t0
        with conn.cursor() as cur:
            for table in COPIED:
                columns = found.columns[table]
                sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
                with cur.copy(sql) as copy:
                    copy.set_types(types[table])
                    for row in found.rows[table]:
                        copy.write_row(row)
                now = time.perf_counter()
                phases.append((f"COPY {table}", now - mark))
                mark = now
            assignments = ", ".join(f"{name} = %s" for name in EVALUATION_COLUMNS)
            cur.execute(
                f"UPDATE herald_evaluations SET {assignments} WHERE trace_id = %s",
                (*found.evaluation, TRACE_ID),
            )
            if cur.rowcount != 1:
                raise SystemExit("the COPY run found no evaluation row to update")
        now = time.perf_counter()
        phases.append(("UPDATE herald_evaluations", now - mark))
        conn.commit()
        t1, cpu = time.perf_counter(), time.process_time() - cpu0
        server = backend_cpu(conn.info.backend_pid) - server0
        phases.append(("commit", t1 - now))
    return Run("raw COPY", round_nr, t1 - t0, tuple(phases), found.total, cpu, server)


# -- report -----------------------------------------------------------------------


def _phases(run: Run) -> str:
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run.phases)
    return f"{phases}; CPU: client {run.cpu:.2f}, server {run.server_cpu:.2f}"


def verdict(ratio: float) -> str:
    return "meets" if ratio >= 0.5 else "misses"


COLUMNS: Final = (
    "round",
    "herald s",
    "add_evaluation s",
    "save s",
    "commit s",
    "CPU s client / server",
    "raw COPY s",
    "of which COPY s",
    "CPU s client / server",
    "COPY / herald",
)


def _phase(run: Run, name: str) -> float:
    return sum(seconds for phase, seconds in run.phases if phase.startswith(name))


def markdown(
    machine: Machine,
    args: argparse.Namespace,
    runs: list[Run],
    found: Captured,
    elapsed: float,
) -> str:
    heralds = [r for r in runs if r.label == "herald"]
    copies = [r for r in runs if r.label == "raw COPY"]
    herald_s = statistics.median(r.seconds for r in heralds)
    copy_s = statistics.median(r.seconds for r in copies)
    ratio = copy_s / herald_s
    lines = []
    for h in heralds:
        c = next(r for r in copies if r.round == h.round)
        lines.append(
            f"| {h.round} | **{h.seconds:.2f}** | {_phase(h, 'add_evaluation'):.2f} | "
            f"{_phase(h, 'save'):.2f} | {_phase(h, 'commit'):.2f} | {h.cpu:.2f} / "
            f"{h.server_cpu:.2f} | **{c.seconds:.2f}** | {_phase(c, 'COPY'):.2f} | "
            f"{c.cpu:.2f} / {c.server_cpu:.2f} | {c.seconds / h.seconds:.2f} |"
        )
    table = "\n".join(lines)
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    tables = {t: statistics.median(_phase(c, f"COPY {t}") for c in copies) for t in found.rows}
    per_table = ", ".join(f"`{t}` {s:.2f} s" for t, s in tables.items())
    counts = ", ".join(f"`{t}` {len(rows):,}" for t, rows in found.rows.items())
    settings = ", ".join(f"`{k}={v}`" for k, v in machine.settings.items())
    return f"""{BEGIN_MARK}

## B2 — bulk: one evaluation adding {args.builds:,} builds, against raw COPY (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/bulk.py` (whole run {elapsed:.0f} s).
{git_revision()}.

**Machine.** {machine.cores} cores ({machine.cpu_model}), {machine.ram_gib:.1f} GiB RAM,
{machine.os}; PostgreSQL {machine.server_version} on the same machine over TCP loopback,
{settings}; Python {machine.python}, SQLAlchemy {machine.sqlalchemy}, psycopg
{machine.psycopg}. Load average (1 min) {machine.load[0]:.2f} at the start; other client
sessions on the server: {machine.other_sessions}.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.bulk --builds {args.builds}
--rounds {args.rounds}` (`--admin`, `--database`, `--markdown`, `--help`).

**What is measured.** Every run writes into a fresh copy of one template database
(migrated, one evaluation started), so both sides meet the same tables, indexes,
constraints and triggers and no rows of an earlier run; the rounds are mirrored (herald
first, then COPY first), after one untimed herald run of 1,000 builds. *herald*: one
transaction, from `engine.begin()` until the commit returned:
`herald.outbox.farm.add_evaluation(uow, trace_id, eval_id, new_builds)` with
{args.builds:,} `NewBuild`s (after the first 100, each depends on one of those 100, like a
jobset whose packages share a few base builds), `uow.save()`, commit. *Raw COPY*: psycopg 3, one
transaction, binary `COPY ... FROM STDIN` from Python tuples of exactly the rows herald's
transaction wrote ({counts}; `tx` and `recorded_at` left to their defaults, as herald
leaves them), then the one `UPDATE` of the evaluation's row, commit: {found.total:,} rows.
`herald_log` is written by neither: on PostgreSQL the sequencer orders the events later,
in its own transaction. CPU is this process's (client) and the server process's of the
connection (server, from `/proc`), in the timed part.

{header}
{table}

Raw COPY per table (median): {per_table}.

Medians: herald {herald_s:.2f} s ({args.builds / herald_s:,.0f} builds/s), raw COPY
{copy_s:.2f} s; COPY / herald = **{ratio:.2f}** against the target of ≥ 0.5:
**{verdict(ratio)}**.

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    parser.add_argument("--builds", type=int, default=50_000, help="Builds the evaluation adds.")
    parser.add_argument(
        "--rounds", type=int, default=2, help="Mirrored rounds (each: herald and COPY)."
    )
    add_server_options(parser, "herald_bench_bulk")
    args = parser.parse_args(argv)
    if args.builds < 1 or args.rounds < 1:
        parser.error("--builds and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    admin = make_url(args.admin)
    specs = new_builds(args.builds)
    runs: list[Run] = []
    found: Captured | None = None
    create_template(admin, args.database)
    try:
        machine = describe_machine(admin, args.database)
        with fresh_copy(admin, args.database) as url:
            herald_run(url, new_builds(min(1000, args.builds)), 0)  # warm-up, not reported
        for round_nr in range(1, args.rounds + 1):
            # The first round runs herald first: its rows are what COPY is given.
            order = ("herald", "copy") if round_nr % 2 else ("copy", "herald")
            for side in order:
                with fresh_copy(admin, args.database) as url:
                    if side == "herald":
                        run, found = herald_run(url, specs, round_nr)
                        check(found, specs)
                    else:
                        assert found is not None
                        run = copy_run(url, found, round_nr)
                print(f"round {round_nr}: {run.label} {run.seconds:.2f} s ({_phases(run)})")
                runs.append(run)
    finally:
        _drop(admin, args.database)
    assert found is not None
    section = markdown(machine, args, runs, found, time.perf_counter() - started)
    print(section)
    write_section(Path(args.markdown), "bench.bulk", section)


def check(found: Captured, specs: Sequence[NewBuild]) -> None:
    """herald's transaction wrote every build, edge and event it should have."""
    edges = sum(len(spec.dependencies) for spec in specs)
    expected = {
        # a build_queued each, the eval_added, one builds_added
        "herald_events": len(specs) + 2,
        "herald_builds": len(specs),
        "herald_build_dependencies": edges,
    }
    written = {table: len(rows) for table, rows in found.rows.items()}
    if written != expected:
        raise SystemExit(f"herald's transaction wrote {written}, not {expected}")


if __name__ == "__main__":
    run_script(main)
