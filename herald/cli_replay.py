"""Moving and replaying consumers: ``herald consumers reset`` and ``herald replay``.

Kafka's conventions, which operators know: a reset moves a consumer's offset
(``--to-earliest``, ``--to-latest``, ``--to-seq N`` — N is the next event it
reads — ``--to-datetime T``, ``--shift-by K``); a replay delivers a range
again through the consumer's handler and leaves the offset alone. Both are
recorded in ``herald_operations``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from herald import operations
from herald.cli_common import (
    SINCE_OPTION,
    UNTIL_OPTION,
    State,
    pass_state,
    stop_on_signals,
    until_seq,
)
from herald.cli_consumers import CONFIG_OPTION, consumers_running
from herald.consumers import load_config, tune_interpreter
from herald.consumers.model import validate_name
from herald.consumers.replay import replay
from herald.consumers.store import consumer_row, consumer_rows, ensure_consumer, reset_offset
from herald.errors import ConsumerBusy, UnknownConsumer, UsageError
from herald.outbox import Sequencer, first_seq, head
from herald.outbox.reader import MAX_SEQ, after_for
from herald.times import parse_time

__all__ = ["replay_command", "reset_command"]

_TARGETS = ("--to-earliest", "--to-latest", "--to-seq", "--to-datetime", "--shift-by")


@click.command("reset")
@click.argument("consumer")
@click.option("--to-earliest", is_flag=True, help="Read again from the oldest event the log holds.")
@click.option("--to-latest", is_flag=True, help="Skip to the head: read only what comes next.")
@click.option(
    "--to-seq",
    type=click.IntRange(min=1, max=MAX_SEQ),
    default=None,
    metavar="N",
    help="Seq N is the next event read.",
)
@click.option(
    "--to-datetime",
    default=None,
    metavar="TIME",
    help="The first event recorded at or after TIME is the next read (ISO 8601, UTC unless "
    "zoned; or an age ago: 2h, 7d).",
)
@click.option(
    "--shift-by",
    type=int,
    default=None,
    metavar="K",
    help="Move the offset by K events (negative: back), within the log.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Reset even while a live `herald run` runs the consumer (it takes the new offset "
    "at its next batch).",
)
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_state
def reset_command(
    state: State,
    consumer: str,
    to_earliest: bool,
    to_latest: bool,
    to_seq: int | None,
    to_datetime: str | None,
    shift_by: int | None,
    force: bool,
    dry_run: bool,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Move CONSUMER's offset: the events after it are (re)delivered by `herald run`.

    Give exactly one of --to-earliest, --to-latest, --to-seq, --to-datetime,
    --shift-by. Refused while a live `herald run` runs the consumer, unless
    --force. Parked events stay parked. The reset is recorded (who, when,
    from, to): `herald audit consumer CONSUMER` lists it. JSON keys: consumer,
    old_offset, new_offset, head, how, forced, run_by, dry_run, operation_id.
    """
    validate_name(consumer)
    flags = (to_earliest, to_latest, to_seq is not None, to_datetime is not None)
    chosen = [name for name, on in zip(_TARGETS, (*flags, shift_by is not None), strict=True) if on]
    if len(chosen) != 1:
        given = f" (got {' and '.join(chosen)})" if chosen else ""
        raise click.UsageError(f"give exactly one of {', '.join(_TARGETS)}{given}")
    how = chosen[0]
    when = parse_time(to_datetime, "--to-datetime") if to_datetime is not None else None
    engine = state.engine()
    with engine.connect() as conn:
        Sequencer().cycle(conn)
        with conn.begin():
            row = consumer_row(conn, consumer)
            if row is None:
                config = load_config(config_path, build_handlers=False)
                if config.consumer(consumer) is None:
                    raise UnknownConsumer(consumer, [r.name for r in consumer_rows(conn)])
                # Configured but never run: it gets its row now, at the offset asked for.
                ensure_consumer(conn, consumer)
                row = consumer_row(conn, consumer)
                assert row is not None
            top = head(conn)
            new = _target_offset(conn, row.offset, top, to_latest, to_seq, when, shift_by)
            run_by = consumers_running(conn).get(consumer)
            if run_by is not None and not force and not dry_run:
                raise ConsumerBusy(consumer, run_by, "a reset")
            detail: dict[str, Any] = {
                "from": row.offset,
                "to": new,
                "how": how
                if how in ("--to-earliest", "--to-latest")
                else f"{how} {to_seq if to_seq is not None else to_datetime or shift_by}",
                "forced": bool(run_by and force),
                "run_by": run_by,
            }
            operation_id = None
            if not dry_run:
                reset_offset(conn, consumer, new)
                operation_id = operations.record(conn, "reset", consumer, detail)
            else:
                conn.rollback()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "consumer": consumer,
                    "old_offset": row.offset,
                    "new_offset": new,
                    "head": top,
                    "how": detail["how"],
                    "forced": detail["forced"],
                    "run_by": run_by,
                    "dry_run": dry_run,
                    "operation_id": operation_id,
                },
                sort_keys=True,
            )
        )
        return
    verb = "would move" if dry_run else "moved"
    click.echo(f"{consumer}: offset {verb} from {row.offset} to {new} ({detail['how']})")
    if new < top:
        click.echo(f"next event read: seq {new + 1}; {top - new} events to the head (seq {top})")
    else:
        click.echo(f"at the head (seq {top}): only events appended from now on are read")
    if run_by is not None and not dry_run:
        click.echo(f"{run_by} runs it: it takes the new offset at its next batch")


def _target_offset(
    conn: sa.Connection,
    offset: int,
    top: int,
    to_latest: bool,
    to_seq: int | None,
    when: datetime | None,
    shift_by: int | None,
) -> int:
    """The offset a reset asks for (--to-earliest when no other target is given)."""
    earliest = max(first_seq(conn) - 1, 0)
    if to_latest:
        return top
    if to_seq is not None:
        if to_seq > top + 1:
            raise UsageError(
                f"--to-seq {to_seq}: the log ends at seq {top}; "
                f"--to-seq {top + 1} (or --to-latest) reads only what comes next"
            )
        if to_seq <= earliest:
            raise UsageError(
                f"--to-seq {to_seq}: the log starts at seq {earliest + 1} "
                "(older events were pruned)"
            )
        return to_seq - 1
    if when is not None:
        return after_for(conn, when)
    if shift_by is not None:
        return min(max(offset + shift_by, earliest), top)
    return earliest


@click.command("replay")
@click.argument("consumer")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1, max=MAX_SEQ),
    default=None,
    metavar="SEQ",
    help="The first seq to deliver again.",
)
@SINCE_OPTION
@UNTIL_OPTION
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@pass_state
def replay_command(
    state: State,
    consumer: str,
    from_seq: int | None,
    since: str | None,
    until: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Deliver a range of the log again through CONSUMER's handler.

    For a one-off re-post: the consumer's offset, its parked events and the
    daemon running it are untouched. Every attempt is recorded with kind
    `replay`; failures are recorded, never parked; no event is too old to
    replay. Give --from SEQ or --since TIME. The consumer must be in the
    configuration file (its handler is needed). SIGINT stops it after the
    calls in flight and says where to resume. Exit status 0 if every event
    was delivered, 1 if some failed, 130 if interrupted. JSON keys: consumer,
    from, until, events, delivered, failed, attempts, interrupted,
    resume_from, seconds, operation_id.
    """
    validate_name(consumer)
    if (from_seq is None) == (since is None):
        raise click.UsageError("give one of --from SEQ and --since TIME")
    start = parse_time(since, "--since") if since is not None else None
    config = load_config(config_path)
    try:
        target = config.consumer(consumer)
        if target is None:
            where = f" in {config.path}" if config.path else " (no configuration file was found)"
            raise UsageError(
                f"consumer {consumer!r} is not configured{where}: a replay needs its handler"
            )
        engine = state.engine()
        with engine.connect() as conn:
            Sequencer().cycle(conn)
            last = head(conn) if until is None else until_seq(conn, until)
            if start is not None:
                first = after_for(conn, start) + 1
            else:
                assert from_seq is not None
                first = from_seq
            conn.rollback()
        if first > last:
            raise UsageError(
                f"nothing to replay: the range starts at seq {first} and ends at seq {last}"
            )
        stop = threading.Event()
        started = time.monotonic()
        progress = Progress(
            TextColumn(f"replaying to {consumer}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("seqs"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not sys.stderr.isatty(),
        )
        # A replay of millions of events is a long run too: as `herald run`.
        tune_interpreter()
        with progress, stop_on_signals(stop):
            task = progress.add_task("replay", total=last - first + 1)
            result = replay(
                engine,
                target,
                first,
                last,
                stop=stop,
                progress=lambda n: progress.advance(task, n),
            )
        seconds = round(time.monotonic() - started, 3)
        with engine.begin() as conn:
            operation_id = operations.record(
                conn, "replay", consumer, {**result.to_json(), "seconds": seconds}
            )
    finally:
        config.close()
    if as_json:
        click.echo(
            json.dumps(
                {**result.to_json(), "seconds": seconds, "operation_id": operation_id},
                sort_keys=True,
            )
        )
    else:
        click.echo(
            f"replayed seq {first}-{last} to {consumer}: {result.events} events, "
            f"{result.delivered} delivered, {result.failed} failed "
            f"({result.attempts} attempts) in {seconds:g} s"
        )
        if result.failed:
            click.echo(f"the failures are recorded: herald audit consumer {consumer}")
        if result.interrupted:
            click.echo(f"interrupted: resume with --from {result.resume_from}")
    if result.interrupted:
        sys.exit(130)
    if result.failed:
        sys.exit(1)
