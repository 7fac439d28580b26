"""``herald demo``: a day on a build farm, written through the domain, then read back.

Three evaluations arrive: one adds a few hundred builds (with dependencies),
one finds its inputs unchanged (cached), one fails. Queue-runner workers
(concurrent writer threads) then build: each build starts, runs its steps
and finishes, each change in its own transaction through the unit of work.
One base build fails and takes its queued dependents with it ("dependency
failed", listed in its ``build_finished``); it is restarted and succeeds.
One build waits for an external system's message, which arrived while the
build was still running, and is applied the moment it waits; a second
message to it, after it finished, is ignored with the reason. The summary
and the timeline of the interesting builds are read back from the log.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import sqlalchemy as sa

from herald.domain import STATUS_NAMES, Evaluation
from herald.errors import InvalidTransition, VersionConflict
from herald.outbox import LogEntry, LogReader, UnitOfWork
from herald.outbox.farm import (
    NewBuild,
    add_evaluation,
    finish_build,
    receive_message,
    wait_for_message,
)
from herald.schema import builds, evaluations

__all__ = ["run_demo"]

FAILING = 1  # a base build whose failure takes its dependents with it
WAITING = 7  # a build that waits for an external pass / fail message
BASES = 10  # builds 1..10 are bases; every later build depends on one of them


def run_demo(
    engine: sa.Engine, *, builds: int, writers: int, seed: int, echo: Callable[[str], None]
) -> None:
    """Simulate the day, then print what the log and the projections hold."""
    rng = random.Random(seed)
    start_seq = max((e.seq for e in LogReader(engine).until_head(0, batch=10_000)), default=0)
    started = time.perf_counter()
    first = _next_build_id(engine)
    ids = list(range(first, first + max(builds, BASES + 2)))
    _evaluations(engine, rng, ids)
    failing, waiting = ids[FAILING - 1], ids[WAITING - 1]
    # Bases first, so that the failing one fails while its dependents still queue.
    _run_workers(engine, seed, writers, ids[:BASES], failing, waiting)
    _run_workers(engine, seed + 1, writers, ids[BASES:], failing, waiting)
    _restart_and_succeed(engine, failing)
    _late_message(engine, waiting)
    elapsed = time.perf_counter() - started

    entries = list(LogReader(engine).until_head(start_seq))
    echo(
        f"herald demo: a farm day on {engine.url.get_backend_name()}: {len(entries)} events "
        f"from {writers} concurrent writers in {elapsed:.2f} s"
    )
    _summary(engine, entries, echo)
    for build_id, why in (
        (failing, "failed, took its dependents with it, restarted, succeeded"),
        (waiting, "waited for a message that had arrived early"),
    ):
        echo("")
        echo(f"timeline of build {build_id} ({why}):")
        for entry in entries:
            if entry.payload.get("build_id") == build_id:
                echo(_line(entry, build_id))
            elif entry.payload.get("failed_build_id") == build_id:
                echo(_line(entry, None))


def _next_build_id(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return (
            int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(builds.c.build_id), 0))
                ).scalar_one()
            )
            + 1
        )


def _evaluations(engine: sa.Engine, rng: random.Random, ids: list[int]) -> None:
    """Evaluation 1 adds the builds; evaluation 2 is cached; evaluation 3 fails."""
    stamp = f"{rng.getrandbits(32):08x}"
    specs = [
        NewBuild(
            build_id,
            f"pkgs.job{i}",
            f"/nix/store/{rng.getrandbits(64):016x}-job{i}.drv",
            rng.choice(["x86_64-linux", "aarch64-linux"]),
            dependencies=() if i < BASES else (ids[rng.randrange(BASES)],),
        )
        for i, build_id in enumerate(ids)
    ]
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation(f"{stamp}-1", 1))
        add_evaluation(uow, f"{stamp}-1", 1, specs)
        uow.add(Evaluation(f"{stamp}-2", 2)).cached(previous_eval_id=1)
        uow.add(Evaluation(f"{stamp}-3", 3)).fail("error: attribute 'hello' missing")
        uow.save()


def _run_workers(
    engine: sa.Engine, seed: int, writers: int, work: list[int], failing: int, waiting: int
) -> None:
    queue = list(work)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(rng: random.Random) -> None:
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    build_id = queue.pop(0)
                _build(engine, rng, build_id, failing, waiting)
        except BaseException as exc:  # noqa: BLE001 - re-raised after join
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(random.Random(seed * 100 + i),), name=f"worker-{i}")
        for i in range(writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _change(engine: sa.Engine, build_id: int, command: Callable[[UnitOfWork], object]) -> bool:
    """Run one command on a build in its own transaction; False if it no longer applies."""
    for _ in range(5):
        try:
            with engine.begin() as conn:
                uow = UnitOfWork(conn)
                command(uow)
                uow.save()
        except VersionConflict:
            continue  # another worker changed the build first: load it again
        except InvalidTransition:
            return False  # e.g. it already finished as "dependency failed"
        return True
    return False


def _build(
    engine: sa.Engine, rng: random.Random, build_id: int, failing: int, waiting: int
) -> None:
    """A queue-runner worker's life of one build."""
    if not _change(engine, build_id, lambda uow: uow.build(build_id).start()):
        return
    for step in range(1, rng.randint(1, 3) + 1):
        machine = f"builder-{rng.randint(1, 4)}"
        status = 1 if build_id == failing else 0
        log_path = f"/nix/var/log/nix/drvs/{build_id:06d}-{step}.drv.bz2"

        def start_step(uow: UnitOfWork, step: int = step, machine: str = machine) -> None:
            uow.build(build_id).start_step(step, machine)

        def finish_step(
            uow: UnitOfWork, step: int = step, status: int = status, log_path: str = log_path
        ) -> None:
            uow.build(build_id).finish_step(step, status, log_path)

        _change(engine, build_id, start_step)
        time.sleep(rng.uniform(0, 0.002))
        _change(engine, build_id, finish_step)
        if status:
            break
    if build_id == waiting:
        # The external system answers before the build has even finished its work.
        _change(engine, build_id, lambda uow: receive_message(uow, build_id, "ci-1", "pass"))
        _change(engine, build_id, lambda uow: wait_for_message(uow, build_id))
        return
    status = 1 if build_id == failing else 0
    _change(engine, build_id, lambda uow: finish_build(uow, build_id, status))


def _restart_and_succeed(engine: sa.Engine, build_id: int) -> None:
    def again(uow: UnitOfWork) -> None:
        build = uow.build(build_id)
        build.restart()
        build.start()
        build.start_step(1, "builder-2")
        build.finish_step(1, 0, f"/nix/var/log/nix/drvs/{build_id:06d}-1.drv.bz2")

    _change(engine, build_id, again)
    _change(engine, build_id, lambda uow: finish_build(uow, build_id, 0))


def _late_message(engine: sa.Engine, build_id: int) -> None:
    """A second opinion after the build finished: recorded, ignored with the reason."""
    _change(engine, build_id, lambda uow: receive_message(uow, build_id, "ci-2", "fail"))


def _summary(engine: sa.Engine, entries: list[LogEntry], echo: Callable[[str], None]) -> None:
    with engine.connect() as conn:
        states = conn.execute(
            sa.select(evaluations.c.jobset_id, evaluations.c.state).order_by(
                evaluations.c.jobset_id
            )
        ).all()
        outcome = conn.execute(
            sa.select(builds.c.state, builds.c.status, sa.func.count())
            .group_by(builds.c.state, builds.c.status)
            .order_by(builds.c.state, builds.c.status)
        ).all()
    echo("")
    echo("evaluations: " + ", ".join(f"jobset {j} {s}" for j, s in states))
    echo("builds:")
    for state, status, count in outcome:
        name = STATUS_NAMES.get(status, "") if status is not None else ""
        echo(f"  {count:>5}  {state}{f' ({name})' if name else ''}")
    echo("events per topic:")
    for topic, count in sorted(Counter(e.topic for e in entries).items()):
        echo(f"  {count:>5}  {topic}")
    seqs = [e.seq for e in entries]
    dense = seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    echo(f"seqs {seqs[0]}..{seqs[-1]}: {'dense, no gaps' if dense else 'NOT DENSE'}")


def _line(entry: LogEntry, build_id: int | None) -> str:
    """One timeline line; the build's own id is left out of its own events."""
    shown = {k: v for k, v in entry.payload.items() if k != "build_id" or v != build_id}
    if isinstance(shown.get("dependent_ids"), list) and len(shown["dependent_ids"]) > 6:
        ids = shown["dependent_ids"]
        shown["dependent_ids"] = f"[{', '.join(map(str, ids[:6]))}, … {len(ids)} in all]"
    text = ", ".join(f"{k}={v}" for k, v in shown.items())
    when = entry.recorded_at.strftime("%H:%M:%S.%f")[:-3]
    return f"  seq {entry.seq:>5}  {when}  {entry.topic:<32} {text}"
