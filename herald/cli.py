"""The ``herald`` command.

Every option has an environment fallback (``HERALD_...``, shown in
``--help``). Bad input is one line on stderr and exit status 2; a failure of
the database is one line and exit status 1; ``--debug`` (or
``HERALD_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from herald import __version__
from herald.cli_audit import audit_group
from herald.cli_common import (
    SINCE_OPTION,
    UNTIL_OPTION,
    State,
    pass_state,
    stop_on_signals,
    until_seq,
)
from herald.cli_consumers import consumers_group, parked_group, run_command
from herald.cli_prune import prune_command
from herald.cli_replay import replay_command, reset_command
from herald.cli_roles import roles_command
from herald.config import DATABASE_URL_SETTING, DEFAULT_DATABASE_URL
from herald.domain import CATALOGUE, DELIVERIES, MAX_PAYLOAD_BYTES, TOPIC_PATTERN, hydra_form
from herald.domain.build import MESSAGE_TYPES, STATUS_NAMES, STEP_STATUS_NAMES, status_text
from herald.errors import HeraldError, UnknownAggregate, UsageError, VersionConflict
from herald.outbox import (
    EventFilter,
    LogEntry,
    LogReader,
    Sequencer,
    TopicFilter,
    UnitOfWork,
    append,
    farm,
    sync_catalogue,
)
from herald.outbox.projector import check, rebuild
from herald.outbox.reader import MAX_SEQ, after_for
from herald.schema import build_messages, build_steps, builds, migrate
from herald.schema.dberrors import translated
from herald.times import parse_time

__all__ = ["SentMessage", "build_view", "cli", "main", "send_message"]

CONTEXT = {
    "auto_envvar_prefix": "HERALD",
    "show_default": True,
    "help_option_names": ["-h", "--help"],
}


#: ``herald log --format``: the human line, one JSON object, Hydra's tab-separated form.
LOG_FORMATS: Final = ("text", "json", "hydra")

#: The largest id a build or generation can have (PostgreSQL's BIGINT).
MAX_ID: Final = 2**63 - 1


@click.group(context_settings=CONTEXT)
@click.option(
    "--database-url",
    envvar=DATABASE_URL_SETTING,
    show_envvar=True,
    default=None,
    metavar="URL",
    help=f"SQLAlchemy URL of herald's database [default: {DEFAULT_DATABASE_URL}]",
    show_default=False,
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="HERALD_DEBUG",
    show_envvar=True,
    help="Show tracebacks and debug logs.",
)
@click.version_option(__version__, prog_name="herald")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """herald: the event log of a CI build farm.

    Events are appended in the same transaction as the change they describe;
    consumers read the log at their own offsets; operators replay and audit it.
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s herald %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # Alembic narrates every migration context at INFO; herald says what matters itself.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    ctx.obj = state = State(database_url)
    ctx.call_on_close(state.close)


# -- db ---------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Create and migrate herald's schema."""


@db.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Migrate the database to the newest schema (safe to run again)."""
    engine = state.engine(migrated=False)
    with engine.connect() as conn, translated():
        before = migrate.current_revision(conn)
        conn.rollback()
        migrate.upgrade(conn)
        with conn.begin():
            count = sync_catalogue(conn)
        after = migrate.current_revision(conn)
    change = "already at" if before == after else f"{before or 'empty'} ->"
    click.echo(f"database {change} revision {after}; {count} catalogue topics")
    if before not in (None, after) and engine.dialect.name == "postgresql":
        with engine.connect() as conn, translated():
            owner = conn.execute(
                sa.text("SELECT tableowner FROM pg_tables WHERE tablename = 'herald_events'")
            ).scalar_one_or_none()
        if owner is not None and owner.endswith("_owner"):
            prefix = owner.removesuffix("_owner")
            click.echo(
                f"herald's roles are in use: run `herald db roles --prefix {prefix}` to give "
                "them the new tables"
            )


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def db_current(state: State, as_json: bool) -> None:
    """Print the database's schema revision and the newest one herald knows."""
    engine = state.engine(migrated=False)
    with engine.connect() as conn, translated():
        current = migrate.current_revision(conn)
    head = migrate.head_revision()
    if as_json:
        click.echo(json.dumps({"current": current, "head": head, "up_to_date": current == head}))
    else:
        status = "up to date" if current == head else "run `herald db upgrade`"
        click.echo(f"{current or 'none'} (head {head}, {status})")


# -- append ------------------------------------------------------------------


def _parse_payload(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc}") from exc


@cli.command("append")
@click.argument("topic")
@click.option(
    "--payload",
    "-p",
    default="{}",
    metavar="JSON",
    help="The event's payload, a JSON object ('-' reads stdin).",
)
@click.option("--dedupe-key", default=None, help="Append at most once per key.")
@click.option("--trace-id", default=None, help="Correlates events of one evaluation.")
@click.option(
    "--delivery",
    type=click.Choice(DELIVERIES),
    default=None,
    help="Delivery rule of a custom topic (catalogue topics have theirs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def append_command(
    state: State,
    topic: str,
    payload: str,
    dedupe_key: str | None,
    trace_id: str | None,
    delivery: str | None,
    as_json: bool,
) -> None:
    """Append one event to the log and print its position.

    TOPIC is a catalogue topic (`herald topics`) or a custom one with a
    namespace (acme.deploy_started).
    """
    data = _parse_payload(payload)
    engine = state.engine()
    with engine.begin() as conn:
        position = append(
            conn, topic, data, dedupe_key=dedupe_key, trace_id=trace_id, delivery=delivery
        )
    click.echo(json.dumps({"position": position}) if as_json else str(position))


# -- log ---------------------------------------------------------------------


def _format(entry: LogEntry) -> str:
    payload = json.dumps(entry.payload, separators=(",", ":"), ensure_ascii=False)
    when = entry.recorded_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{entry.seq:>8}  {when}  {entry.topic:<22}  {payload}"


@cli.command("log")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1, max=MAX_SEQ),
    default=1,
    metavar="SEQ",
    help="First seq to print (inclusive).",
)
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Print at most N events [default: all].",
)
@click.option(
    "--topic",
    "-t",
    "topics",
    multiple=True,
    metavar="TOPIC",
    help="Only these topics; * is a wildcard (build_*). Repeatable.",
)
@SINCE_OPTION
@UNTIL_OPTION
@click.option(
    "--build",
    "build_id",
    type=click.IntRange(min=1, max=MAX_ID),
    default=None,
    metavar="ID",
    help="Only events about this build.",
)
@click.option(
    "--eval",
    "eval_id",
    type=click.IntRange(min=1, max=MAX_ID),
    default=None,
    metavar="ID",
    help="Only events about this evaluation.",
)
@click.option(
    "--jobset",
    "jobset_id",
    type=click.IntRange(min=1, max=MAX_ID),
    default=None,
    metavar="ID",
    help="Only events about this jobset (its evaluations and builds).",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they arrive.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    help="text: one line an event; json: one JSON object a line; hydra: `topic<TAB>` and "
    "Hydra's tab-separated payload (events without one are skipped).",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@pass_state
def log_command(
    state: State,
    from_seq: int,
    limit: int | None,
    topics: tuple[str, ...],
    since: str | None,
    until: str | None,
    build_id: int | None,
    eval_id: int | None,
    jobset_id: int | None,
    follow: bool,
    output_format: str,
    as_json: bool,
) -> None:
    """Print the log from any seq, oldest first.

    --from/--since say where to start, --until where to stop; --build,
    --eval and --jobset keep the events about one build, evaluation or
    jobset.

    Lines are `seq  recorded_at  topic  payload`; with --format json (or
    --json) one object a line with seq, position, topic, payload, delivery,
    dedupe_key, aggregate_id, aggregate_version, trace_id, occurred_at,
    recorded_at; with --format hydra `topic<TAB>values`, the values as Hydra's
    NOTIFY sends them (custom and herald.* topics have no such form and are
    skipped). --limit counts the lines printed.
    """
    render = _log_renderer(_log_format(output_format, as_json))
    if since is not None and _given("from_seq"):
        raise click.UsageError("--from and --since both say where to start; give one")
    if until is not None and follow:
        raise click.UsageError("--until stops the output and --follow never does; give one")
    start = parse_time(since, "--since") if since is not None else None
    narrow = EventFilter(build_id, eval_id, jobset_id)
    topic_filter = TopicFilter(topics)
    engine = state.engine()
    reader = LogReader(engine, topic_filter, narrow)
    with engine.connect() as conn:
        # Order what has committed, so that --since/--until see every event.
        Sequencer().cycle(conn)
        if narrow:
            narrow.check(conn)
        after = from_seq - 1 if start is None else after_for(conn, start)
        last = None if until is None else until_seq(conn, until)
        conn.rollback()
    stop = threading.Event()
    printed = 0
    with stop_on_signals(stop):
        for entry in _entries(reader, after, follow, stop, last):
            line = render(entry)
            if line is None:
                continue
            click.echo(line)
            printed += 1
            if limit is not None and printed >= limit:
                break


def _log_format(output_format: str, as_json: bool) -> str:
    """The format asked for: ``--json`` is ``--format json``; both on the command line
    with different formats is a usage error, ``--json`` wins over the environment."""
    if not as_json:
        return output_format
    ctx = click.get_current_context()
    given = ctx.get_parameter_source("output_format") == click.core.ParameterSource.COMMANDLINE
    if given and output_format != "json":
        raise click.UsageError(
            f"--json is --format json; it cannot be combined with --format {output_format}", ctx
        )
    return "json"


def _log_renderer(output_format: str) -> Callable[[LogEntry], str | None]:
    """The line for one entry in ``output_format`` (None: print nothing for it)."""
    if output_format == "json":
        return lambda entry: json.dumps(entry.to_json(), ensure_ascii=False)
    if output_format == "hydra":
        return _hydra_line
    return _format


def _hydra_line(entry: LogEntry) -> str | None:
    try:
        return f"{entry.topic}\t{hydra_form(entry.topic, entry.payload)}"
    except UsageError:
        return None  # a custom or herald.* topic: Hydra never had it


def _given(parameter: str) -> bool:
    """Whether the current command's ``parameter`` was given (command line or environment)."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    )


def _entries(
    reader: LogReader,
    after: int,
    follow: bool,
    stop: threading.Event,
    until_seq: int | None = None,
) -> Iterator[LogEntry]:
    if follow:
        yield from reader.follow(after, stop=stop)
    elif until_seq is None or until_seq > after:
        yield from reader.until_head(after, until_seq=until_seq)


# -- topics ------------------------------------------------------------------


@cli.command("topics")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def topics_command(as_json: bool) -> None:
    """List the event catalogue: topics, payload fields, delivery rules."""
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "topic": s.topic,
                        "fields": dict(s.fields),
                        "delivery": s.delivery,
                        "hydra_channel": s.hydra_channel,
                        "description": s.description,
                    }
                    for s in CATALOGUE.values()
                ],
                indent=2,
            )
        )
        return
    table = Table(title="herald's event catalogue", title_justify="left")
    table.add_column("topic", no_wrap=True)
    table.add_column("payload fields")
    table.add_column("delivery", no_wrap=True)
    table.add_column("Hydra channel")
    for spec in CATALOGUE.values():
        fields = ", ".join(f"{name}: {kind}" for name, kind in spec.fields)
        table.add_row(spec.topic, fields, spec.delivery, spec.hydra_channel or "-")
    console = Console()
    console.print(table)
    console.print(
        f"Topic names match {escape(TOPIC_PATTERN)}. Custom topics are dotted "
        "(acme.deploy_started) and take any JSON object. "
        f"Payloads are at most {MAX_PAYLOAD_BYTES} bytes of JSON."
    )


# -- message -----------------------------------------------------------------

#: How often ``herald message send`` tries when another writer changed the build
#: between its read and its write (each try reloads the build and applies again).
MESSAGE_SEND_ATTEMPTS: Final = 3
#: The longest a message id can be (the projection's column).
MAX_MESSAGE_ID_LENGTH: Final = 200

_log = logging.getLogger("herald.cli")


@dataclass(frozen=True, slots=True)
class SentMessage:
    """What ``herald message send`` did: the message's state and the build's."""

    build_id: int
    message_id: str
    type: str
    generation: int
    #: pending | applied | ignored | stale
    state: str
    reason: str | None
    #: the id had been received before: nothing changed
    already_received: bool
    #: this message finished the build (a pass or fail applied to a waiting build)
    build_finished: bool
    build_state: str
    build_status: int | None
    build_generation: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        build = {
            "state": data.pop("build_state"),
            "status": data.pop("build_status"),
            "generation": data.pop("build_generation"),
        }
        build["status_name"] = _status_name(build["status"])
        return {**data, "build": build}


def _status_name(status: int | None, names: Mapping[int, str] = STATUS_NAMES) -> str | None:
    return None if status is None else names.get(status, "unknown")


def _check_message_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if value is None:
        return uuid.uuid4().hex
    if not value or len(value) > MAX_MESSAGE_ID_LENGTH:
        raise click.BadParameter(f"must be 1 to {MAX_MESSAGE_ID_LENGTH} characters")
    if not value.isprintable():
        raise click.BadParameter("must not contain control characters")
    return value


def _send_once(
    engine: sa.Engine, build_id: int, message_id: str, message_type: str, generation: int | None
) -> SentMessage:
    """One try: load the build, record the message, save, all in one transaction."""
    with engine.begin() as conn:
        uow = UnitOfWork(conn)
        build = uow.build(build_id)
        known = build.messages.get(message_id)
        if known is not None and (
            known["type"] != message_type
            or (generation is not None and known["generation"] != generation)
        ):
            raise UsageError(
                f"message {message_id} was already received by build {build_id} as a "
                f"{known['type']} message for generation {known['generation']}; "
                "a message id names one message (send a new one with another --id)"
            )
        was_finished = build.state == "finished"
        # Through the farm: a fail that finishes the build takes its queued
        # dependents with it.
        state = farm.receive_message(uow, build_id, message_id, message_type, generation)
        uow.save()
    message = build.messages[message_id]
    return SentMessage(
        build_id=build_id,
        message_id=message_id,
        type=message["type"],
        generation=message["generation"],
        state=state,
        reason=message["reason"],
        already_received=known is not None,
        build_finished=known is None and not was_finished and build.state == "finished",
        build_state=build.state,
        build_status=build.status,
        build_generation=build.generation,
    )


def _log_conflict(retry_state: RetryCallState) -> None:
    _log.debug(
        "build changed by another writer meanwhile; retrying (attempt %d of %d)",
        retry_state.attempt_number + 1,
        MESSAGE_SEND_ATTEMPTS,
    )


def send_message(
    engine: sa.Engine,
    build_id: int,
    message_id: str,
    message_type: str,
    generation: int | None = None,
) -> SentMessage:
    """Record a Harbormaster message to build ``build_id`` through the unit of work.

    A :class:`~herald.errors.VersionConflict` (another writer saved the build
    between this one's read and its write; nothing was written) is retried,
    with a fresh read each time, up to :data:`MESSAGE_SEND_ATTEMPTS` times in
    all; the last one is raised. Receiving an id again changes nothing, so a
    retry never records a message twice.
    """
    retrying = Retrying(
        retry=retry_if_exception_type(VersionConflict),
        stop=stop_after_attempt(MESSAGE_SEND_ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.02, max=0.2),
        before_sleep=_log_conflict,
        reraise=True,
    )
    return retrying(_send_once, engine, build_id, message_id, message_type, generation)


def _describe_sent(sent: SentMessage) -> list[str]:
    head = (
        f"message {sent.message_id} to build {sent.build_id} "
        f"({sent.type}, generation {sent.generation}): {sent.state}"
    )
    if sent.reason:
        head += f": {sent.reason}"
    elif sent.state == "pending":
        head += " (kept until the build waits for a message)"
    if sent.already_received:
        head += " (already received; nothing changed)"
    lines = [head]
    if sent.build_finished:
        lines.append(f"build {sent.build_id} finished: {status_text(sent.build_status)}")
    return lines


@cli.group("message")
def message_group() -> None:
    """Harbormaster messages: pass, fail or work for a build waiting for one."""


@message_group.command("send")
@click.argument("build_id", metavar="BUILD", type=click.IntRange(min=1, max=MAX_ID))
@click.option(
    "--type",
    "message_type",
    type=click.Choice(MESSAGE_TYPES),
    required=True,
    help="pass or fail finishes a waiting build (status 0 or 1); work keeps it waiting.",
)
@click.option(
    "--generation",
    type=click.IntRange(min=1, max=MAX_ID),
    default=None,
    metavar="N",
    help="The generation of the build the message is for "
    "(a message to an earlier one is stale) [default: the current one]",
    show_default=False,
)
@click.option(
    "--id",
    "message_id",
    default=None,
    callback=_check_message_id,
    metavar="MESSAGE_ID",
    help="The message's id; sending the same id again changes nothing [default: a new random id]",
    show_default=False,
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def message_send(
    state: State,
    build_id: int,
    message_type: str,
    generation: int | None,
    message_id: str,
    as_json: bool,
) -> None:
    """Send a pass / fail / work message to BUILD and print what became of it.

    A message that arrives before the build waits is kept (pending) and
    applied when it does; otherwise it is applied, ignored (with the reason)
    or stale (sent to an earlier generation of a restarted build).
    """
    sent = send_message(state.engine(), build_id, message_id, message_type, generation)
    if as_json:
        click.echo(json.dumps(sent.to_json(), ensure_ascii=False))
    else:
        for line in _describe_sent(sent):
            click.echo(line)


# -- build -------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    """A projection value as JSON: times in ISO 8601, UTC."""
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    return value


def _utc(value: datetime) -> datetime:
    # SQLite gives naive UTC times back; PostgreSQL its session's zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return _utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def build_view(conn: sa.Connection, build_id: int) -> dict[str, Any]:
    """Build ``build_id`` as the projections show it: its ``herald_builds`` row, the
    ``steps`` of its current generation and all its ``messages``, as JSON data."""
    with translated():
        row = conn.execute(sa.select(builds).where(builds.c.build_id == build_id)).one_or_none()
        if row is None:
            raise UnknownAggregate("build", build_id)
        steps = conn.execute(
            sa.select(build_steps)
            .where(
                build_steps.c.build_id == build_id,
                build_steps.c.generation == row.generation,
            )
            .order_by(build_steps.c.step_nr)
        )
        messages = conn.execute(
            sa.select(build_messages)
            .where(build_messages.c.build_id == build_id)
            .order_by(build_messages.c.received_at, build_messages.c.message_id)
        )
        view = {key: _json_value(value) for key, value in row._mapping.items()}
        view["status_name"] = _status_name(row.status)
        view["steps"] = [
            {
                **{key: _json_value(value) for key, value in step._mapping.items()},
                "status_name": _status_name(step.status, STEP_STATUS_NAMES),
            }
            for step in steps
        ]
        view["messages"] = [
            {key: _json_value(value) for key, value in message._mapping.items()}
            for message in messages
        ]
    return view


#: How many dependencies ``herald build show`` lists before it counts the rest.
_SHOWN_DEPENDENCIES: Final = 20


def _describe_build(view: dict[str, Any]) -> list[str]:
    state = view["state"]
    headline = {"waiting": "waiting for a message"}.get(state, state)
    if view["status"] is not None:
        headline += f", status {view['status']} ({view['status_name']})"
    if view["substituted"]:
        headline += ", outputs substituted"
    deps: list[int] = view["dependencies"]
    shown = ", ".join(str(dep) for dep in deps[:_SHOWN_DEPENDENCIES])
    if len(deps) > _SHOWN_DEPENDENCIES:
        shown += f", … ({len(deps) - _SHOWN_DEPENDENCIES} more)"
    fields = [
        ("job", f"{view['job']} (jobset {view['jobset_id']})"),
        ("derivation", view["drv_path"]),
        ("system", view["system"]),
        ("priority", str(view["priority"])),
        ("generation", str(view["generation"])),
        ("dependencies", shown or "none"),
        ("queued", _when_text(view["queued_at"])),
        ("started", _when_text(view["started_at"])),
        ("finished", _when_text(view["finished_at"])),
        ("version", str(view["version"])),
    ]
    lines = [f"build {view['build_id']}: {headline}"]
    lines += [f"  {name:<13} {value}" for name, value in fields]
    steps = view["steps"]
    lines.append(f"steps of generation {view['generation']}: {len(steps) or 'none'}")
    for step in steps:
        if step["status"] is None:
            outcome = "running"
        else:
            outcome = f"status {step['status']} ({step['status_name']})"
        log = f"  log {step['log_path']}" if step["log_path"] else ""
        lines.append(f"  {step['step_nr']:>4}  {step['machine']}  {outcome}{log}")
    messages = view["messages"]
    lines.append(f"messages: {len(messages) or 'none'}")
    for message in messages:
        why = f": {message['reason']}" if message["reason"] else ""
        lines.append(
            f"  {message['message_id']}  {message['type']}  generation "
            f"{message['generation']}  {message['state']}{why}"
        )
    return lines


def _when_text(value: str | None) -> str:
    return "-" if value is None else _when(datetime.fromisoformat(value))


@cli.group("build")
def build_group() -> None:
    """The farm's builds, as the projections show them."""


@build_group.command("show")
@click.argument("build_id", metavar="BUILD", type=click.IntRange(min=1, max=MAX_ID))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_state
def build_show(state: State, build_id: int, as_json: bool) -> None:
    """Show BUILD's current state: its queue entry and outcome, the steps of its
    current generation and every message it received.

    Status codes are Hydra's (0 succeeded, 1 failed, 2 dependency failed, …).
    --json prints the herald_builds row with `status_name`, `steps` and
    `messages`; times are ISO 8601, UTC.
    """
    with state.engine().connect() as conn:
        view = build_view(conn, build_id)
    if as_json:
        click.echo(json.dumps(view, ensure_ascii=False))
    else:
        for line in _describe_build(view):
            click.echo(line)


# -- projections ---------------------------------------------------------------


@cli.group("projections")
def projections_group() -> None:
    """The farm's current state (builds, steps, messages, evaluations), derived from the log."""


@projections_group.command("rebuild")
@pass_state
def projections_rebuild(state: State) -> None:
    """Rebuild the projections from the log alone, in one transaction."""
    engine = state.engine()
    columns = (
        TextColumn("rebuilding projections"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("rebuild", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with engine.begin() as conn, translated():
            applied = rebuild(conn, progress=progress)
    click.echo(f"projections rebuilt from {applied} events")


@projections_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def projections_check(state: State, as_json: bool) -> None:
    """Compare the projections with what the log makes of them; exit 1 if they differ.

    Nothing is changed: the rebuild it compares with is rolled back.
    """
    engine = state.engine()
    with engine.begin() as conn, translated():
        differences = check(conn)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "table": d.table,
                        "key": list(d.key),
                        "kind": d.kind,
                        "columns": list(d.columns),
                    }
                    for d in differences
                ],
                default=str,
            )
        )
    elif differences:
        for difference in differences[:50]:
            click.echo(str(difference))
        if len(differences) > 50:
            click.echo(f"… and {len(differences) - 50} more")
    else:
        click.echo("projections match the log")
    if differences:
        if not as_json:
            click.echo(
                f"{len(differences)} difference(s); `herald projections rebuild` "
                "makes the projections what the log says",
                err=True,
            )
        sys.exit(1)


# -- demo --------------------------------------------------------------------


@cli.command("demo")
@click.option(
    "--builds",
    type=click.IntRange(min=1, max=100_000),
    default=120,
    help="How many builds the first evaluation adds.",
)
@click.option(
    "--writers",
    type=click.IntRange(min=1, max=64),
    default=4,
    help="Concurrent queue-runner workers (writer threads).",
)
@click.option("--seed", type=int, default=7, help="Random seed (same seed, same day).")
@pass_state
def demo_command(state: State, builds: int, writers: int, seed: int) -> None:
    """Simulate a day on a build farm through the domain, then summarise the log."""
    from herald.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    run_demo(state.engine(), builds=builds, writers=writers, seed=seed, echo=click.echo)


# -- the consumer side (run, consumers, parked) -------------------------------------

cli.add_command(run_command)
cli.add_command(consumers_group)
consumers_group.add_command(reset_command)
cli.add_command(replay_command)
cli.add_command(prune_command)
cli.add_command(parked_group)
cli.add_command(audit_group)
db.add_command(roles_command)


# -- entry point ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors become one line on stderr and an exit status."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("HERALD_DEBUG", "") not in ("", "0", "false")
    try:
        cli.main(args=args, prog_name="herald", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        command = getattr(ctx, "command_path", None) or "herald"
        # One line, whatever Click made of it ("Choose from:" lists choices a line each).
        message = " ".join(part.strip() for part in exc.format_message().splitlines())
        click.echo(f"{command}: error: {message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("herald: aborted", err=True)
        sys.exit(130)
    except HeraldError as exc:
        if debug:
            raise
        click.echo(f"herald: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `herald log | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(
            f"herald: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)
