"""B4: replaying 1,000,000 events through a no-op handler.

Run with ``make bench`` or ``.venv/bin/python -m bench.replay``.

A scratch database (``herald_bench_replay``, dropped first) gets ``--events``
events (one SQL ``INSERT ... SELECT`` from ``generate_series``: 1,000 builds'
``acme.tick`` events, ordered, then ``ANALYZE``). Then, in one run:

* **herald**: :func:`herald.consumers.replay.replay` — what ``herald replay``
  runs — of the whole range through a consumer whose handler does nothing,
  at batch sizes ``--batch`` (every event a handler call and a delivery record
  of kind ``replay``, committed page by page);
* **raw read** (for scale): psycopg 3 reading the same rows (seq, position,
  topic, payload, times) page by page, with nothing done with them.

Target: herald's replay of 1,000,000 events ≤ 20 s. Writes its section of
``BENCHMARKS.md`` (between the ``bench.replay`` markers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.append_throughput import (
    Machine,
    conninfo,
    create_scratch,
    describe_machine,
    drop_scratch,
    git_revision,
)
from bench.common import add_server_options, markers, run_script, write_section
from herald.config import create_engine
from herald.consumers import Consumer, tune_interpreter
from herald.consumers.replay import replay

BEGIN_MARK, END_MARK = markers("bench.replay")


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def fill(dsn: str, count: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO herald_events (topic, payload, delivery, occurred_at) "
            "SELECT 'acme.tick', jsonb_build_object('n', g, 'build_id', g %% 1000), "
            "'at_least_once', now() FROM generate_series(1, %s) AS g",
            (count,),
        )
        conn.execute("INSERT INTO herald_log (seq, position) SELECT position, position "
                     "FROM herald_events")  # fmt: skip
        conn.execute("UPDATE herald_sequencer SET last_seq = %s", (count,))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def raw_read(dsn: str, count: int, batch: int) -> Run:
    started = time.perf_counter()
    read, after = 0, 0
    with psycopg.connect(dsn) as conn:
        while after < count:
            rows = conn.execute(
                "SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.occurred_at, "
                "e.recorded_at FROM herald_log l JOIN herald_events e USING (position) "
                "WHERE l.seq > %s ORDER BY l.seq LIMIT %s",
                (after, batch),
            ).fetchall()
            if not rows:
                break
            read += len(rows)
            after = rows[-1][0]
        conn.rollback()
    return Run(f"raw psycopg read, pages of {batch}", read, time.perf_counter() - started)


def herald_replay(url: str, count: int, batch: int) -> Run:
    # As `herald replay` runs it (with the daemon's interpreter settings).
    tune_interpreter()
    engine = create_engine(url)
    try:
        consumer = Consumer(
            name=f"noop-{batch}", topics=["acme.*"], handler=lambda _entry: None, batch_size=batch
        )
        started = time.perf_counter()
        result = replay(engine, consumer, 1, count)
        seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    if result.delivered != count:
        raise SystemExit(f"replay delivered {result.delivered} of {count}")
    return Run(f"herald replay, batch_size {batch}", result.events, seconds)


def markdown(machine: Machine, runs: list[Run], fill_seconds: float, count: int) -> str:
    rows = "\n".join(
        f"| {run.label} | {run.events:,} | {run.seconds:.1f} s | {run.rate:,.0f} |" for run in runs
    )
    best = min((r for r in runs if r.label.startswith("herald")), key=lambda r: r.seconds)
    scaled = best.seconds * 1_000_000 / count
    verdict = "meets" if scaled <= 20 else "misses"
    return f"""{BEGIN_MARK}

## B4 — replay of {count:,} events (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/replay.py`. {git_revision()}.

**Machine.** {machine.cores} cores ({machine.cpu_model}), PostgreSQL {machine.server_version}
on the same machine; other client sessions on the server at the start: {machine.other_sessions}.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.replay --events {count}`
(`--batch`, `--admin`, `--database`, `--help`). The {count:,} events were written and
analyzed in {fill_seconds:.1f} s.

**What is measured.** `herald.consumers.replay.replay` (what `herald replay` runs) of the
whole log through a handler that does nothing: every event a handler call (on a worker
thread, with its deadline) and a delivery record, committed page by page; beside it, a raw
psycopg read of the same rows for scale.

| run | events | time | events/s |
|---|---|---|---|
{rows}

The fastest herald replay: {best.seconds:.1f} s for {best.events:,} events ({scaled:.1f} s per
1,000,000) against the target of 20 s: **{verdict}**.

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="Events in the log.")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[500, 5000], help="Consumer batch sizes."
    )
    add_server_options(parser, "herald_bench_replay")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    admin = make_url(args.admin)
    url = create_scratch(admin, args.database, 1)
    try:
        machine = describe_machine(admin, args.database)
        seconds = fill(conninfo(url), args.events)
        text_url = url.render_as_string(hide_password=False)
        runs = [raw_read(conninfo(url), args.events, max(args.batch))]
        runs += [herald_replay(text_url, args.events, batch) for batch in args.batch]
    finally:
        drop_scratch(admin, args.database)
    section = markdown(machine, runs, seconds, args.events)
    print(section)
    write_section(Path(args.markdown), "bench.replay", section)


if __name__ == "__main__":
    run_script(main)
