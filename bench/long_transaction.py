"""B6: latency of other events while one write transaction stays open.

Run with ``make bench`` or ``.venv/bin/python -m bench.long_transaction``.

A scratch database (``herald_bench_long``, dropped first) is migrated and
``herald run`` (the sequencer daemon) started. One transaction appends an
event and then stays open for ``--hold`` seconds (a slow evaluation, a stuck
queue runner). Meanwhile one writer commits ``--rate`` events a second, one
per transaction (from ``--lead`` seconds before the transaction begins until
``--tail`` seconds after it ends), and two readers follow the log:

* **herald**: :meth:`herald.outbox.LogReader.follow` (the sequencer orders each
  transaction when it becomes visible, whatever is still open);
* **xid horizon** (the comparison): the approach that reads an event only once
  every transaction older than it has ended — each poll (every 5 ms) reads the
  events with ``tx >= <previous horizon> AND tx < pg_snapshot_xmin(
  pg_current_snapshot())``. It is exact, and it cannot pass the open
  transaction.

Latency of an event = the time a reader gets it − the time its writer's
COMMIT returned (one clock: the same machine). The report gives p50, p99
and max for events committed while the transaction was open, and writes its
section of ``BENCHMARKS.md`` (between the ``bench.long_transaction``
markers). Target: herald's p99 ≤ 100 ms. Every event's sample (its commit
time and each reader's latency) and when the transaction began and ended are
kept in ``--samples``/``b6.json`` for ``python -m bench.plot``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.append_throughput import (
    Machine,
    conninfo,
    create_scratch,
    describe_machine,
    drop_scratch,
    git_revision,
    herald_daemon,
    percentile,
)
from bench.common import add_server_options, markers, run_script, write_section
from bench.plot import SAMPLES, machine_facts, write_samples
from herald.config import create_engine
from herald.outbox import LogReader, NewEvent, append_many

BEGIN_MARK, END_MARK = markers("bench.long_transaction")


@dataclass(frozen=True, slots=True)
class Result:
    machine: Machine
    hold: float
    rate: float
    #: events committed while the long transaction was open
    during: int
    herald: list[float]
    horizon: list[float]
    #: events committed during the hold that each reader never got
    herald_missing: int
    horizon_missing: int
    #: every event, during the hold or not: [s from the writer's start to its COMMIT,
    #: herald's latency, the horizon's latency] (None: that reader never got it)
    samples: list[tuple[float, float | None, float | None]]
    #: when the long transaction began and when its COMMIT was sent, s from the writer's start
    began: float
    ended: float


class Commits:
    """The writer: one event per transaction at a steady rate; n → commit time."""

    def __init__(self, dsn: str, rate: float, stop: threading.Event) -> None:
        self.dsn, self.rate, self.stop = dsn, rate, stop
        self.at: dict[int, float] = {}
        #: time.time() when the writer was started: the samples' zero
        self.started = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-writer")

    def start(self) -> None:
        self.started = time.time()
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            n, next_at = 0, time.monotonic()
            while not self.stop.is_set():
                append_many(conn, [NewEvent("acme.tick", {"n": n})])
                conn.commit()
                self.at[n] = time.time()
                n += 1
                next_at += 1.0 / self.rate
                time.sleep(max(0.0, next_at - time.monotonic()))


def follow_herald(url: str, got: dict[int, float], stop: threading.Event) -> None:
    engine = create_engine(url)
    try:
        for entry in LogReader(engine).follow(0, poll_interval=0.05, stop=stop):
            n = entry.payload.get("n")
            if isinstance(n, int) and entry.topic == "acme.tick":
                got.setdefault(n, time.time())
    finally:
        engine.dispose()


def follow_horizon(dsn: str, got: dict[int, float], stop: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        horizon = conn.execute("SELECT '1'::xid8").fetchone()
        low = horizon[0] if horizon else 1
        while not stop.is_set():
            top = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())").fetchone()
            high = top[0] if top else low
            rows = conn.execute(
                "SELECT topic, (payload->>'n')::int FROM herald_events "
                "WHERE tx >= %s AND tx < %s ORDER BY position",
                (low, high),
            ).fetchall()
            now = time.time()
            for topic, n in rows:
                if topic == "acme.tick" and n is not None:
                    got.setdefault(int(n), now)
            low = high
            stop.wait(0.005)


def measure(args: argparse.Namespace) -> Result:
    admin_url = make_url(args.admin)
    url = create_scratch(admin_url, args.database, 1)
    dsn = conninfo(url)
    text_url = url.render_as_string(hide_password=False)
    try:
        machine = describe_machine(admin_url, args.database)
        with herald_daemon(text_url, print):
            time.sleep(args.warmup)
            stop = threading.Event()
            by_herald: dict[int, float] = {}
            by_horizon: dict[int, float] = {}
            readers = [
                threading.Thread(target=follow_herald, args=(text_url, by_herald, stop)),
                threading.Thread(target=follow_horizon, args=(dsn, by_horizon, stop)),
            ]
            for reader in readers:
                reader.start()
            writer_stop = threading.Event()
            writer = Commits(dsn, args.rate, writer_stop)
            writer.start()
            time.sleep(args.lead)
            with psycopg.connect(dsn) as long_conn:
                append_many(long_conn, [NewEvent("acme.long", {"held": args.hold})])
                opened = time.time()
                time.sleep(args.hold)
                closing = time.time()
                long_conn.commit()
            time.sleep(args.tail)
            writer_stop.set()
            writer.thread.join(10)
            # Both readers get everything once the horizon has passed.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (
                len(by_herald) < len(writer.at) or len(by_horizon) < len(writer.at)
            ):
                time.sleep(0.05)
            stop.set()
            for reader in readers:
                reader.join(10)
    finally:
        drop_scratch(admin_url, args.database)
    during = [n for n, at in writer.at.items() if opened <= at <= closing]
    herald = [by_herald[n] - writer.at[n] for n in during if n in by_herald]
    horizon = [by_horizon[n] - writer.at[n] for n in during if n in by_horizon]
    samples = [
        (
            at - writer.started,
            by_herald[n] - at if n in by_herald else None,
            by_horizon[n] - at if n in by_horizon else None,
        )
        for n, at in sorted(writer.at.items())
    ]
    return Result(
        machine,
        args.hold,
        args.rate,
        len(during),
        herald,
        horizon,
        len(during) - len(herald),
        len(during) - len(horizon),
        samples,
        opened - writer.started,
        closing - writer.started,
    )


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def samples_record(result: Result, args: argparse.Namespace) -> dict[str, Any]:
    """Every event's sample, for ``bench.plot``."""
    return {
        "benchmark": "B6",
        "script": "bench/long_transaction.py",
        "measures": "commit → a reader gets the event, seconds; herald and the xid horizon",
        "machine": machine_facts(result.machine),
        "parameters": {
            "hold": args.hold,
            "rate": args.rate,
            "lead": args.lead,
            "tail": args.tail,
            "warmup": args.warmup,
        },
        "targets": {"herald_p99": 0.100},
        "began": round(result.began, 4),
        "ended": round(result.ended, 4),
        # [s from the writer's start to the COMMIT, herald's latency, the horizon's latency]
        "samples": [
            [round(at, 4), _rounded(herald, 6), _rounded(horizon, 6)]
            for at, herald, horizon in result.samples
        ],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def markdown(result: Result, args: argparse.Namespace) -> str:
    machine = result.machine
    rows = []
    for name, values, missing in (
        ("herald (`LogReader.follow`)", result.herald, result.herald_missing),
        ("xid horizon (`tx < pg_snapshot_xmin(...)`)", result.horizon, result.horizon_missing),
    ):
        rows.append(
            f"| {name} | {len(values)} | {missing} | {_ms(percentile(values, 0.5))} | "
            f"{_ms(percentile(values, 0.99))} | {_ms(max(values, default=float('nan')))} |"
        )
    p99 = percentile(result.herald, 0.99)
    verdict = "meets" if p99 <= 0.1 and result.herald_missing == 0 else "misses"
    ratio = percentile(result.horizon, 0.99) / p99 if p99 > 0 else float("nan")
    return f"""{BEGIN_MARK}

## B6 — latency while a write transaction stays open (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/long_transaction.py`. {git_revision()}.

**Machine.** {machine.cores} cores ({machine.cpu_model}), PostgreSQL {machine.server_version}
on the same machine; other client sessions on the server at the start: {machine.other_sessions}.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.long_transaction --hold
{args.hold:g} --rate {args.rate:g}` (`--lead`, `--tail`, `--warmup`, `--samples`, `--admin`,
`--database`, `--help`).

**What is measured.** `herald run` orders the log. One transaction appends an event and stays
open {result.hold:g} s; meanwhile a writer commits {result.rate:g} events/s, one per
transaction, from {args.lead:g} s before the transaction begins until {args.tail:g} s after it
ends. Latency = a reader gets the event − its COMMIT returned, for the
{result.during} events committed while the transaction was open.

| reader | events got | not got | p50 | p99 | max |
|---|---|---|---|---|---|
{chr(10).join(rows)}

herald p99 {_ms(p99)} against the target of 100 ms: **{verdict}**. The xid-horizon reader's
p99 is {ratio:.0f}× herald's: it cannot read past the open transaction, so the events
committed while it was open wait for its end.

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.long_transaction", description=__doc__)
    parser.add_argument("--hold", type=float, default=30.0, help="How long it stays open.")
    parser.add_argument("--rate", type=float, default=100.0, help="Other events a second.")
    parser.add_argument("--lead", type=float, default=2.0, help="Writing before it begins.")
    parser.add_argument("--tail", type=float, default=2.0, help="Writing after it commits.")
    parser.add_argument("--warmup", type=float, default=2.0, help="After herald run starts.")
    parser.add_argument(
        "--samples",
        type=Path,
        default=SAMPLES,
        help="Where the per-event samples go, as b6.json (for python -m bench.plot).",
    )
    add_server_options(parser, "herald_bench_long")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    section = markdown(result, args)
    print(section)
    print(f"wrote {write_samples(args.samples, 'b6.json', samples_record(result, args))}")
    write_section(Path(args.markdown), "bench.long_transaction", section)


if __name__ == "__main__":
    run_script(main)
