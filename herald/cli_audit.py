"""``herald audit``: questions about the log, for people (tables) and scripts (--json).

Registered on the top-level group by :mod:`herald.cli`. The commands change
nothing: no consumer row, record or operation is written. On PostgreSQL each
first runs the sequencer cycle every read of the log runs (it gives seqs to
events that have committed and have none yet), so that it sees every event
committed before it began.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herald import operations
from herald.audit import (
    BuildTimeline,
    ConsumerReport,
    DeliveryRecord,
    Pending,
    TopicCounts,
    build_timeline,
    consumer_report,
    pending,
    topic_counts,
)
from herald.cli_common import State, pass_state
from herald.cli_consumers import CONFIG_OPTION
from herald.consumers.config import Config, load_config
from herald.consumers.model import OUTCOMES, validate_name
from herald.operations import Action
from herald.outbox import Sequencer
from herald.times import format_age, parse_time

__all__ = ["audit_group"]

_log = logging.getLogger("herald.audit")

#: The largest id a build can have (PostgreSQL's BIGINT).
_MAX_ID: Final = 2**63 - 1

#: The widest a table printed into a file or a pipe may be before it folds.
_UNFOLDED_WIDTH: Final = 1000

_SINCE_OPTION = click.option(
    "--since",
    default=None,
    metavar="TIME",
    help="Only since TIME: ISO 8601 (UTC unless a zone is given) or an age ago (30m, 12h, 7d) "
    "[default: all].",
    show_default=False,
)

_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@click.group("audit")
def audit_group() -> None:
    """Ask the log what happened: a build's timeline, a consumer's backlog and history."""


@contextmanager
def _reading(state: State) -> Iterator[sa.Connection]:
    """A connection that sees every event committed before the command began.

    The sequencer cycle is the only write a read may cause (it gives committed
    events their seqs). A role that may not order the log (the auditor) still
    gets its answer: events without a seq then show as such.
    """
    engine = state.engine()
    with engine.connect() as conn:
        Sequencer().cycle(conn)  # a role that may not order reads what is ordered
        yield conn


def _since(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text, "--since")


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ago(value: datetime) -> str:
    return format_age(max(0.0, (datetime.now(UTC) - value).total_seconds()))


def _echo_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, sort_keys=True))


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _print(table: Table) -> None:
    """Print a table: folded to a terminal's width, unfolded into a file or a pipe."""
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        wide = console.options.update_width(_UNFOLDED_WIDTH)
        console.width = max(console.width, console.measure(table, options=wide).maximum)
    console.print(table)


def _short(text: str | None, width: int = 120) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return escape(line if len(line) <= width else line[: width - 1] + "…")


def _config(config_path: str | None) -> Config:
    # Handlers are not built: a webhook's secret variable need not be set to audit it.
    return load_config(config_path, build_handlers=False)


# -- build ------------------------------------------------------------------------------


@audit_group.command("build", short_help="A build's events, each with its delivery records.")
@click.argument("build_id", metavar="BUILD", type=click.IntRange(min=1, max=_MAX_ID))
@_JSON_OPTION
@pass_state
def audit_build(state: State, build_id: int, as_json: bool) -> None:
    """BUILD's timeline: every event of the build, and under each event every
    consumer's delivery records of it; then the build's messages and its state.

    The events are those of the build's aggregate (what herald's domain
    wrote), in seq order; one committed but not yet ordered has no seq.

    --json prints one object: build_id, aggregate_id; build (the projection:
    state, status, status_name, generation; null without a projection row);
    events, each with seq, position, topic, aggregate_version, delivery,
    recorded_at, occurred_at, generation (null if the payload has none),
    payload and deliveries (by consumer, then as written: id, consumer, seq,
    attempt, outcome, kind, started_at, duration_ms, error, http_status,
    detail); messages, each with message_id, type, generation, state, reason,
    received_at, updated_at. Times are ISO 8601, UTC. An unknown build is
    one line and exit status 2.
    """
    with _reading(state) as conn:
        timeline = build_timeline(conn, build_id)
    if as_json:
        _echo_json(timeline.to_json())
        return
    for line in _describe_build(timeline):
        click.echo(line)
    if timeline.events:
        _print(_timeline_table(timeline))
    for line in _describe_messages(timeline):
        click.echo(line)


def _describe_build(timeline: BuildTimeline) -> list[str]:
    build = timeline.build
    if build is None:
        state = "no projection row"
    else:
        state = f"{build.state}, generation {build.generation}"
        if build.status is not None:
            state += f", status {build.status} ({build.to_json()['status_name']})"
    records = sum(len(e.deliveries) for e in timeline.events)
    unordered = sum(1 for e in timeline.events if e.seq is None)
    counts = f"{len(timeline.events)} event(s), {records} delivery record(s)"
    if unordered:
        counts += f", {unordered} event(s) not ordered yet (no seq)"
    lines = [f"build {timeline.build_id}: {state}", f"aggregate {timeline.aggregate_id}: {counts}"]
    if not timeline.events:
        lines.append("the log holds no event of this build any more (pruned)")
    return lines


def _delivery_cells(record: DeliveryRecord) -> tuple[str, str, str]:
    outcome = record.outcome if record.kind == "live" else f"{record.outcome} ({record.kind})"
    note = record.error or ""
    if record.http_status is not None:
        note = f"HTTP {record.http_status} {note}".strip()
    return outcome, f"{record.duration_ms:.1f}", _short(note)


def _timeline_table(timeline: BuildTimeline) -> Table:
    table = _table("SEQ", "TIME (UTC)", "EVENT / CONSUMER", "GEN", "OUTCOME", "MS", "HTTP / ERROR")
    for event in timeline.events:
        table.add_row(
            "-" if event.seq is None else str(event.seq),
            _when(event.recorded_at),
            escape(event.topic),
            "" if event.generation is None else str(event.generation),
            "",
            "",
            "",
        )
        for record in event.deliveries:
            outcome, ms, note = _delivery_cells(record)
            table.add_row(
                "",
                _when(record.started_at),
                f"  ↳ {escape(record.consumer)} #{record.attempt}",
                "",
                outcome,
                ms,
                note,
            )
    return table


def _describe_messages(timeline: BuildTimeline) -> list[str]:
    lines = [f"messages: {len(timeline.messages) or 'none'}"]
    for message in timeline.messages:
        why = f": {message.reason}" if message.reason else ""
        lines.append(
            f"  {message.message_id}  {message.type}  generation {message.generation}  "
            f"{message.state}{why}  (received {_when(message.received_at)})"
        )
    return lines


# -- pending ----------------------------------------------------------------------------


@audit_group.command("pending", short_help="What a consumer has not finished yet.")
@click.argument("consumer")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=0, max=10_000),
    default=20,
    metavar="N",
    help="List the first N pending events.",
)
@CONFIG_OPTION
@_JSON_OPTION
@pass_state
def audit_pending(
    state: State, consumer: str, limit: int, config_path: str | None, as_json: bool
) -> None:
    """What CONSUMER has not finished: its parked events, and the events of its
    topics after its offset (how many, pending since when, build_finished ones).

    The topics are the consumer's in the configuration file; a consumer that
    ran once and is not configured any more counts every topic. A configured
    consumer that never ran has offset 0. At most 100,000 seqs after the
    offset are examined: beyond that the counts are lower bounds.

    --json prints one object: consumer, topics (null: every topic), has_run,
    offset, head, lag; parked, each with seq, topic, recorded_at, key,
    attempts, error, parked_at, held_by, redeliver_requested; pending with
    count, since (the oldest pending event's recorded_at), build_finished (how
    many of them), build_finished_since, scanned_to (the last seq examined),
    complete (whether that is the head) and events (the first N: seq, topic,
    recorded_at, delivery, build_id). An unknown consumer is exit status 2.
    """
    config = _config(config_path)
    configured = config.consumer(consumer)
    with _reading(state) as conn:
        result = pending(
            conn, consumer, configured.topic_filter if configured is not None else None, limit
        )
    if as_json:
        _echo_json(result.to_json())
        return
    _show_pending(result, limit)


def _show_pending(result: Pending, limit: int) -> None:
    topics = "every topic (not configured)" if result.topics is None else ", ".join(result.topics)
    ran = "" if result.has_run else "; it has never run"
    click.echo(
        f"consumer {result.consumer}: offset {result.offset}, head {result.head}, "
        f"lag {result.lag}{ran}; topics: {topics}"
    )
    click.echo(f"parked: {len(result.parked) or 'none'}")
    if result.parked:
        table = _table("SEQ", "TOPIC", "BUILD", "ATTEMPTS", "PARKED AT (UTC)", "HELD BY", "ERROR")
        for row in result.parked:
            error = row.error or ""
            if row.redeliver_requested:
                error = f"(redelivery requested) {error}"
            table.add_row(
                str(row.seq),
                escape(row.topic or "?"),
                escape(row.key or ""),
                str(row.attempts),
                _when(row.parked_at),
                "" if row.held_by is None else str(row.held_by),
                _short(error),
            )
        _print(table)
    bound = "" if result.complete else "at least "
    line = f"pending: {bound}{result.count} event(s) of its topics after the offset"
    if result.since is not None:
        line += f", the oldest recorded {_when(result.since)} UTC ({_ago(result.since)} ago)"
    click.echo(line)
    if not result.complete:
        click.echo(
            f"  (seqs {result.offset + 1} to {result.scanned_to} examined; the head is "
            f"{result.head})"
        )
    finished = f"build_finished pending: {bound}{result.build_finished}"
    if result.build_finished_since is not None:
        finished += (
            f", the oldest recorded {_when(result.build_finished_since)} UTC "
            f"({_ago(result.build_finished_since)} ago)"
        )
    click.echo(finished)
    if result.events:
        table = _table("SEQ", "RECORDED (UTC)", "TOPIC", "BUILD", "DELIVERY")
        for event in result.events:
            table.add_row(
                str(event.seq),
                _when(event.recorded_at),
                escape(event.topic),
                "" if event.build_id is None else str(event.build_id),
                event.delivery,
            )
        _print(table)
        if result.count > limit:
            click.echo(f"  … and {result.count - limit} more")


# -- consumer ---------------------------------------------------------------------------


@audit_group.command("consumer", short_help="A consumer's delivery history and failure rate.")
@click.argument("consumer")
@_SINCE_OPTION
@CONFIG_OPTION
@_JSON_OPTION
@pass_state
def audit_consumer(
    state: State, consumer: str, since: str | None, config_path: str | None, as_json: bool
) -> None:
    """CONSUMER's delivery history: records per outcome and kind, failure rate,
    the slowest deliveries, the latest errors, its resets and replays.

    Attempts are handler calls (delivered, failed and parked records with an
    attempt number of 1 or more); the failure rate is failed and parked calls
    per call. Events held behind a parked one of the same build are counted
    as held, not as attempts.

    --json prints one object: consumer, since (null: all), offset (null: never
    ran), head, lag, parked (events parked now), records, attempts,
    failed_attempts, failure_rate (null without attempts), outcomes (records
    per outcome), kinds (records per kind), held; slowest and errors (10
    records each, longest / newest first: id, consumer, seq, topic, attempt,
    outcome, kind, started_at, duration_ms, error, http_status, detail);
    operations (resets and replays, newest first: id, action, consumer,
    actor, db_user, at, detail). An unknown consumer is exit status 2.
    """
    start = _since(since)
    config = _config(config_path)
    with _reading(state) as conn:
        report = consumer_report(
            conn, consumer, start, configured=config.consumer(consumer) is not None
        )
    if as_json:
        _echo_json(report.to_json())
        return
    _show_report(report)


def _show_report(report: ConsumerReport) -> None:
    if report.offset is None:
        where = f"never ran (head {report.head})"
    else:
        where = (
            f"offset {report.offset}, head {report.head}, lag {max(0, report.head - report.offset)}"
        )
    window = f"since {_when(report.since)} UTC" if report.since is not None else "all records"
    click.echo(f"consumer {report.consumer}: {where}, {report.parked} parked now; {window}")
    outcomes = ", ".join(f"{name} {report.outcomes.get(name, 0)}" for name in OUTCOMES)
    kinds = ", ".join(f"{name} {count}" for name, count in report.kinds.items()) or "none"
    click.echo(f"records: {report.records} ({outcomes}); kinds: {kinds}")
    rate = "-" if report.failure_rate is None else f"{report.failure_rate:.1%}"
    click.echo(
        f"attempts: {report.attempts}, failed or parked: {report.failed_attempts} ({rate}); "
        f"held behind a parked event: {report.held}"
    )
    for title, rows in (("slowest", report.slowest), ("latest errors", report.errors)):
        click.echo(f"{title}: {len(rows) or 'none'}")
        if rows:
            table = _table("SEQ", "TOPIC", "STARTED (UTC)", "#", "OUTCOME", "MS", "HTTP / ERROR")
            for record, topic in rows:
                outcome, ms, note = _delivery_cells(record)
                table.add_row(
                    str(record.seq),
                    escape(topic or "?"),
                    _when(record.started_at),
                    str(record.attempt),
                    outcome,
                    ms,
                    note,
                )
            _print(table)
    click.echo(f"resets and replays: {len(report.operations) or 'none'}")
    if report.operations:
        table = _table("ID", "AT (UTC)", "ACTION", "ACTOR", "DETAIL")
        for op in report.operations:
            table.add_row(
                str(op.id),
                _when(op.at),
                op.action,
                escape(op.actor),
                _short(json.dumps(op.detail, sort_keys=True)),
            )
        _print(table)


# -- topics -----------------------------------------------------------------------------


@audit_group.command("topics", short_help="Events and delivery outcomes per topic.")
@_SINCE_OPTION
@_JSON_OPTION
@pass_state
def audit_topics(state: State, since: str | None, as_json: bool) -> None:
    """Per topic: how many events were recorded (since --since), and the
    outcomes of every consumer's delivery records of those events.

    --json prints one object: since (null: all), events (the total) and
    topics, each with topic, events and deliveries (records per outcome:
    delivered, failed, parked, expired, discarded).
    """
    start = _since(since)
    with _reading(state) as conn:
        counts = topic_counts(conn, start)
    if as_json:
        _echo_json(counts.to_json())
        return
    _show_topics(counts)


def _show_topics(counts: TopicCounts) -> None:
    window = f"since {_when(counts.since)} UTC" if counts.since is not None else "in the log"
    total = sum(t.events for t in counts.topics)
    click.echo(f"{total} event(s) {window}, {len(counts.topics)} topic(s)")
    if not counts.topics:
        return
    table = _table("TOPIC", "EVENTS", *(name.upper() for name in OUTCOMES))
    for topic in counts.topics:
        table.add_row(
            escape(topic.topic),
            str(topic.events),
            *(str(topic.deliveries.get(name, 0)) for name in OUTCOMES),
        )
    _print(table)


# -- operations ------------------------------------------------------------------------


@audit_group.command("operations", short_help="Resets, replays and prunes: who, when, what.")
@click.option(
    "--action",
    type=click.Choice(("reset", "replay", "prune")),
    default=None,
    help="Only this kind [default: all].",
)
@click.option("--consumer", default=None, metavar="NAME", help="Only those of this consumer.")
@_SINCE_OPTION
@click.option("--limit", type=click.IntRange(min=1), default=100, metavar="N", help="The N newest.")
@_JSON_OPTION
@pass_state
def audit_operations(
    state: State,
    action: Action | None,
    consumer: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The operators' actions on record, newest first: resets, replays, prunes.

    --json prints one object: operations, each with id, action, consumer,
    actor (user@host), db_user, at and detail (a reset's from/to/how/forced,
    a replay's range and counts, a prune's range and counts).
    """
    if consumer is not None:
        validate_name(consumer)
    start = _since(since)
    with _reading(state) as conn:
        found = operations.history(conn, consumer=consumer, action=action, since=start, limit=limit)
    if as_json:
        _echo_json({"operations": [op.to_json() for op in found]})
        return
    if not found:
        click.echo("no operations on record")
        return
    table = _table("ID", "AT (UTC)", "ACTION", "CONSUMER", "WHO", "WHAT")
    for op in found:
        table.add_row(
            str(op.id),
            _when(op.at),
            op.action,
            escape(op.consumer or "-"),
            escape(op.actor + (f" ({op.db_user})" if op.db_user else "")),
            _short(json.dumps(op.detail, sort_keys=True), 160),
        )
    _print(table)
