"""``herald demo``: a burst of farm events from concurrent writers, then the log.

An evaluation queues builds in one transaction (eval_started, build_queued
for each build, builds_added, eval_added); then several writer threads, like
queue-runner workers, start builds, run their steps and finish them, each
change in its own transaction. One build fails and takes its dependents with
it; a later evaluation re-uses finished builds (cached_build_finished, once
per evaluation even when sent twice). The log is then read back in order.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import sqlalchemy as sa

from herald.outbox import LogEntry, LogReader, NewEvent, append, append_many

__all__ = ["run_demo"]

_EVAL_ID = 1
_JOBSET_ID = 3


def run_demo(
    engine: sa.Engine, *, builds: int, writers: int, seed: int, echo: Callable[[str], None]
) -> None:
    """Append the burst and print what the log holds afterwards."""
    reader = LogReader(engine)
    start_seq = max((e.seq for e in reader.until_head(0, batch=10_000)), default=0)
    build_ids = list(range(1, builds + 1))
    failing = build_ids[0]
    # The builds that depend on the failing one finish with it ("dependency failed").
    dependents = [b for b in build_ids[1:] if b % 10 == 0]
    started = time.perf_counter()
    _queue_evaluation(engine, random.Random(seed), build_ids)
    _run_writers(
        engine, seed, writers, [b for b in build_ids if b not in dependents], failing, dependents
    )
    _second_evaluation(engine)
    elapsed = time.perf_counter() - started
    entries = list(reader.until_head(start_seq))

    echo(
        f"herald demo: {len(entries)} events appended by {writers} concurrent writers "
        f"for {builds} builds in {elapsed:.2f} s ({engine.url.get_backend_name()})"
    )
    echo("")
    echo("events per topic:")
    for topic, count in sorted(Counter(e.topic for e in entries).items()):
        echo(f"  {topic:<24}{count:>6}")
    seqs = [e.seq for e in entries]
    dense = seqs == list(range(start_seq + 1, start_seq + len(entries) + 1))
    echo(f"seqs {seqs[0]}..{seqs[-1]}: {'dense, no gaps' if dense else 'NOT DENSE'}")
    echo("")
    echo(f"build {failing} failed; {len(dependents)} dependents finished with it:")
    for entry in entries:
        if entry.payload.get("build_id") == failing:
            echo(_line(entry))
    echo("")
    echo("the last 8 events:")
    for entry in entries[-8:]:
        echo(_line(entry))


def _queue_evaluation(engine: sa.Engine, rng: random.Random, build_ids: list[int]) -> None:
    """One evaluation adds every build: all its events in one transaction."""
    trace = uuid.UUID(int=rng.getrandbits(128)).hex
    with engine.begin() as conn:
        append_many(
            conn,
            [NewEvent("eval_started", {"trace_id": trace, "jobset_id": _JOBSET_ID}, trace_id=trace)]
            + [NewEvent("build_queued", {"build_id": b}, trace_id=trace) for b in build_ids]
            + [
                NewEvent("builds_added", {"build_id": build_ids[0]}, trace_id=trace),
                NewEvent(
                    "eval_added",
                    {"trace_id": trace, "jobset_id": _JOBSET_ID, "eval_id": _EVAL_ID},
                    trace_id=trace,
                ),
            ],
        )


def _run_writers(
    engine: sa.Engine,
    seed: int,
    writers: int,
    work: list[int],
    failing: int,
    dependents: list[int],
) -> None:
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(rng: random.Random) -> None:
        try:
            while True:
                with lock:
                    if not work:
                        return
                    build = work.pop(0)
                _run_build(engine, rng, build, dependents if build == failing else None)
        except BaseException as exc:  # noqa: BLE001 - re-raised after join
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(random.Random(seed * 100 + i),), name=f"writer-{i}")
        for i in range(writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _run_build(
    engine: sa.Engine, rng: random.Random, build: int, fails_with: list[int] | None
) -> None:
    """A queue-runner worker's life of one build: each change its own transaction."""
    with engine.begin() as conn:
        append(conn, "build_started", {"build_id": build})
    for step in range(1, rng.randint(1, 3) + 1):
        with engine.begin() as conn:
            append(conn, "step_started", {"build_id": build, "step_nr": step})
        time.sleep(rng.uniform(0, 0.002))
        with engine.begin() as conn:
            log_path = f"/nix/var/log/nix/drvs/{build:04d}-{step}.drv.bz2"
            append(
                conn, "step_finished", {"build_id": build, "step_nr": step, "log_path": log_path}
            )
    with engine.begin() as conn:
        payload = {
            "build_id": build,
            "dependent_ids": fails_with or [],
            "status": 1 if fails_with is not None else 0,
        }
        append(conn, "build_finished", payload)


def _second_evaluation(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        # Once per (eval, build), even though the evaluator sends the first twice.
        for build in (2, 2, 3):
            append(conn, "cached_build_finished", {"eval_id": _EVAL_ID + 1, "build_id": build})
        append(conn, "acme.cache.pushed", {"build_id": 2, "paths": 3}, delivery="ephemeral")


def _line(entry: LogEntry) -> str:
    text = ", ".join(f"{k}={v}" for k, v in entry.payload.items())
    text = text if len(text) <= 70 else text[:67] + "..."
    return f"  seq {entry.seq:>5}  {entry.topic:<22} {text}"
