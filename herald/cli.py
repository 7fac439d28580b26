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
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herald import __version__
from herald.config import DATABASE_URL_SETTING, DEFAULT_DATABASE_URL, check_connection
from herald.config import create_engine as _create_engine
from herald.domain import CATALOGUE, DELIVERIES, MAX_PAYLOAD_BYTES, TOPIC_PATTERN
from herald.errors import HeraldError, NotMigrated, UsageError
from herald.outbox import LogEntry, LogReader, TopicFilter, append, run_sequencer, sync_catalogue
from herald.outbox.reader import MAX_SEQ
from herald.schema import migrate
from herald.schema.dberrors import translated

__all__ = ["cli", "main"]

CONTEXT = {
    "auto_envvar_prefix": "HERALD",
    "show_default": True,
    "help_option_names": ["-h", "--help"],
}


class State:
    """What the top-level options set up for the subcommands."""

    def __init__(self, database_url: str | None) -> None:
        self.database_url = database_url
        self._engine: sa.Engine | None = None

    def engine(self, *, migrated: bool = True) -> sa.Engine:
        """The engine, connected once (a dead server is a clear error) and, by default,
        checked to be migrated."""
        if self._engine is None:
            self._engine = _create_engine(self.database_url)
            check_connection(self._engine)
        if migrated:
            with self._engine.connect() as conn, translated():
                if migrate.current_revision(conn) is None:
                    raise NotMigrated()
        return self._engine


pass_state = click.make_pass_decorator(State)


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
    ctx.obj = State(database_url)


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
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_state
def log_command(
    state: State,
    from_seq: int,
    limit: int | None,
    topics: tuple[str, ...],
    follow: bool,
    as_json: bool,
) -> None:
    """Print the log from any seq, oldest first.

    Lines are `seq  recorded_at  topic  payload`; with --json one object a
    line with seq, position, topic, payload, delivery, dedupe_key,
    aggregate_id, aggregate_version, trace_id, occurred_at, recorded_at.
    """
    reader = LogReader(state.engine(), TopicFilter(topics))
    stop = threading.Event()
    printed = 0
    with _stop_on_signals(stop):
        for entry in _entries(reader, from_seq - 1, follow, stop):
            click.echo(
                json.dumps(entry.to_json(), ensure_ascii=False) if as_json else _format(entry)
            )
            printed += 1
            if limit is not None and printed >= limit:
                break


def _entries(
    reader: LogReader, after: int, follow: bool, stop: threading.Event
) -> Iterator[LogEntry]:
    if follow:
        yield from reader.follow(after, stop=stop)
    else:
        yield from reader.until_head(after)


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


# -- run ---------------------------------------------------------------------


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        logging.getLogger("herald").info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@cli.command("run")
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.001, max=10),
    default=0.05,
    metavar="SECONDS",
    help="Longest pause between the sequencer's idle checks.",
)
@pass_state
def run_command(state: State, poll_interval: float) -> None:
    """Run herald's daemon: the sequencer (PostgreSQL), until SIGTERM or SIGINT.

    Several `herald run` may share a database: one sequences, the others stand
    by and take over within a second if it dies.
    """
    engine = state.engine()
    stop = threading.Event()
    log = logging.getLogger("herald.run")
    with _stop_on_signals(stop):
        if engine.dialect.name == "postgresql":
            log.info("started (pid %d); electing the sequencer", os.getpid())
            run_sequencer(engine, stop, poll_interval=poll_interval)
        else:
            log.info(
                "started (pid %d); SQLite orders events as they are written, no sequencer needed",
                os.getpid(),
            )
            stop.wait()
    log.info("stopped")


# -- demo --------------------------------------------------------------------


@cli.command("demo")
@click.option(
    "--builds",
    type=click.IntRange(min=1, max=100_000),
    default=120,
    help="How many builds the burst simulates.",
)
@click.option(
    "--writers", type=click.IntRange(min=1, max=64), default=4, help="Concurrent writer threads."
)
@click.option("--seed", type=int, default=7, help="Random seed (same seed, same burst).")
@pass_state
def demo_command(state: State, builds: int, writers: int, seed: int) -> None:
    """Append a realistic burst of farm events with concurrent writers, then show the log."""
    from herald.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    run_demo(state.engine(), builds=builds, writers=writers, seed=seed, echo=click.echo)


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
        click.echo(f"{command}: error: {exc.format_message()}", err=True)
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
