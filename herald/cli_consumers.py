"""The consumer side of the ``herald`` command: ``run``, ``consumers``, ``parked``.

Registered on the top-level group by :mod:`herald.cli`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herald.cli_common import State, pass_state, stop_on_signals
from herald.consumers import Daemon, load_config, tune_interpreter
from herald.consumers.config import CONFIG_SETTING, Config
from herald.consumers.model import validate_name
from herald.consumers.store import (
    consumer_row,
    consumer_rows,
    discard_parked,
    last_errors,
    parked_counts,
    parked_rows,
    request_redelivery,
)
from herald.errors import UnknownConsumer, UsageError
from herald.outbox import Sequencer, head
from herald.schema import CONSUMER_LOCK_CLASS
from herald.schema.dberrors import translated
from herald.schema.queries import query

__all__ = ["CONFIG_OPTION", "consumers_group", "consumers_running", "parked_group", "run_command"]

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    # Read by load_config itself, so that an error names the setting the operator used.
    envvar=None,
    default=None,
    metavar="FILE",
    help=f"The consumers' configuration file [default: ${CONFIG_SETTING}, else "
    "./herald.toml if it exists].",
    show_default=False,
)


# -- run -----------------------------------------------------------------------------


@click.command("run")
@CONFIG_OPTION
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on this port (http://ADDR:PORT/metrics).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    metavar="ADDR",
    help="The address the metrics server listens on.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.001, max=10),
    default=0.05,
    metavar="SECONDS",
    help="Longest pause between the sequencer's idle checks.",
)
@pass_state
def run_command(
    state: State,
    config_path: str | None,
    metrics_port: int | None,
    metrics_addr: str,
    poll_interval: float,
) -> None:
    """Run herald's daemon: the sequencer and every configured consumer.

    Consumers come from the configuration file (HERALD_CONFIG, or ./herald.toml).
    Several `herald run` may share a database: one sequences (the others take
    over within a second if it dies), and each consumer is run by one process
    at a time. SIGTERM or SIGINT: the deliveries in flight finish, offsets are
    committed, exit status 0.
    """
    log = logging.getLogger("herald.run")
    config = load_config(config_path)
    try:
        engine = state.engine()
        metrics = None
        if metrics_port is not None:
            from herald.consumers.metrics import PrometheusMetrics  # noqa: PLC0415 - optional

            metrics = PrometheusMetrics(engine, [c.name for c in config.consumers])
        daemon = Daemon(
            engine,
            config.consumers,
            poll_interval=config.poll_interval,
            sequencer_poll=poll_interval,
            metrics=metrics,
        )
        if metrics is not None:
            metrics.sequencer = daemon.sequencer
            assert metrics_port is not None
            metrics.serve(metrics_port, metrics_addr)
            log.info("metrics on http://%s:%d/metrics", metrics_addr, metrics_port)
        where = f" from {config.path}" if config.path else " (no configuration file)"
        names = ", ".join(c.name for c in config.consumers) or "none"
        sequencing = (
            "electing the sequencer"
            if engine.dialect.name == "postgresql"
            else "SQLite orders events as they are written, no sequencer needed"
        )
        log.info("started (pid %d); %s; consumers%s: %s", os.getpid(), sequencing, where, names)
        stop = threading.Event()
        tune_interpreter()
        with stop_on_signals(stop):
            daemon.run(stop)
        if metrics is not None:
            metrics.close()
    finally:
        config.close()
    log.info("stopped")


# -- consumers -----------------------------------------------------------------------


def _load_listing_config(config_path: str | None) -> Config:
    # Handlers are not built for a listing: a webhook's secret variable need not
    # be set in the operator's shell to see the consumers.
    return load_config(config_path, build_handlers=False)


def consumers_running(conn: sa.Connection) -> dict[str, str]:
    """Consumers that a live daemon runs right now, with what runs them."""
    rows = consumer_rows(conn)
    if conn.dialect.name == "postgresql":
        held: dict[str, int] = dict(
            conn.execute(query("consumer_lock_holders"), {"lock_class": CONSUMER_LOCK_CLASS}).all()
        )
        return {r.name: r.owner or f"pid {held[r.name]}" for r in rows if r.name in held}
    now = datetime.now(UTC)
    return {r.name: r.owner for r in rows if r.owner and r.lease_until and r.lease_until > now}


def consumer_listing(conn: sa.Connection, config: Config) -> list[dict[str, Any]]:
    """Every consumer, configured or with a row: offset, lag, parked, running, last error."""
    # Order what has committed first (as every read does), so that the lag counts
    # events written while no daemon ran.
    Sequencer().cycle(conn)
    with translated():
        top = head(conn)
        rows = {r.name: r for r in consumer_rows(conn)}
        parked = parked_counts(conn)
        running = consumers_running(conn)
        names = [c.name for c in config.consumers] + sorted(
            n for n in rows if config.consumer(n) is None
        )
        errors = last_errors(conn, names)
    listing = []
    for name in names:
        configured = config.consumer(name)
        row = rows.get(name)
        offset = row.offset if row is not None else 0
        error = errors.get(name)
        listing.append(
            {
                "name": name,
                "type": configured.type if configured else None,
                "topics": list(configured.topics) if configured else None,
                "delivery": configured.delivery if configured else None,
                "configured": configured is not None,
                "offset": offset,
                "head": top,
                "lag": max(0, top - offset),
                "parked": parked.get(name, 0),
                "running": name in running,
                "run_by": running.get(name),
                "last_error": error[1] if error else None,
                "last_error_seq": error[0] if error else None,
                "last_error_at": error[2].isoformat() if error else None,
            }
        )
    return listing


@click.group("consumers", invoke_without_command=True)
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per consumer.")
@click.pass_context
def consumers_group(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """List the consumers (`herald consumers`, or `herald consumers list`); reset one.

    Consumers come from the configuration file and from the database (one that
    ran once but is no longer configured is listed as such).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(consumers_list, config_path=config_path, as_json=as_json)


@consumers_group.command("list")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per consumer.")
@pass_state
def consumers_list(state: State, config_path: str | None, as_json: bool) -> None:
    """List the consumers: offset, lag, parked events, who runs them, last error."""
    config = _load_listing_config(config_path)
    engine = state.engine()
    with engine.connect() as conn:
        listing = consumer_listing(conn, config)
    if as_json:
        for item in listing:
            click.echo(json.dumps(item, sort_keys=True))
        return
    if not listing:
        click.echo("no consumers: none is configured (herald.toml) and none has run")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("CONSUMER", "TYPE", "OFFSET", "LAG", "PARKED", "RUNNING", "LAST ERROR"):
        table.add_column(column, overflow="fold")
    for item in listing:
        error = item["last_error"]
        table.add_row(
            escape(item["name"]),
            escape(item["type"] or "(not configured)"),
            str(item["offset"]),
            str(item["lag"]),
            str(item["parked"]),
            escape(item["run_by"] or "no"),
            escape(f"seq {item['last_error_seq']}: {error}"[:120]) if error else "",
        )
    Console(soft_wrap=True).print(table)


# -- parked ----------------------------------------------------------------------------


@click.group("parked")
def parked_group() -> None:
    """Events a consumer gave up on after its retries: list, redeliver, discard."""


def _known(conn: sa.Connection, name: str, config: Config | None = None) -> None:
    validate_name(name)
    if consumer_row(conn, name) is None and (config is None or config.consumer(name) is None):
        raise UnknownConsumer(name, [r.name for r in consumer_rows(conn)])


def _seq(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"a seq is 1 or more, not {value}")
    return value


@parked_group.command("list")
@click.argument("consumer", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per parked event.")
@pass_state
def parked_list(state: State, consumer: str | None, as_json: bool) -> None:
    """List parked events (of CONSUMER, or of every consumer)."""
    engine = state.engine()
    with engine.connect() as conn:
        if consumer is not None:
            _known(conn, consumer)
        rows = parked_rows(conn, consumer)
    if as_json:
        for row in rows:
            click.echo(
                json.dumps(
                    {
                        "consumer": row.consumer,
                        "seq": row.seq,
                        "topic": row.topic,
                        "key": row.key,
                        "held_by": row.held_by,
                        "attempts": row.attempts,
                        "error": row.error,
                        "parked_at": row.parked_at.isoformat(),
                        "redeliver_requested": row.redeliver,
                    },
                    sort_keys=True,
                )
            )
        return
    if not rows:
        click.echo(f"nothing parked{f' for {consumer}' if consumer else ''}")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("CONSUMER", "SEQ", "TOPIC", "BUILD", "ATTEMPTS", "PARKED AT", "ERROR"):
        table.add_column(column, overflow="fold")
    for row in rows:
        error = row.error or ""
        if row.redeliver:
            error = f"(redelivery requested) {error}"
        table.add_row(
            escape(row.consumer),
            str(row.seq),
            escape(row.topic or "?"),
            escape(row.key or ""),
            str(row.attempts),
            row.parked_at.strftime("%Y-%m-%d %H:%M:%S"),
            escape(error[:160]),
        )
    Console(soft_wrap=True).print(table)


@parked_group.command("redeliver")
@click.argument("consumer")
@click.argument("seq", type=int, required=False, callback=_seq)
@click.option("--all", "everything", is_flag=True, help="Every parked event of CONSUMER.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Wait up to SECONDS for the daemon to redeliver them, and report the outcome.",
)
@pass_state
def parked_redeliver(
    state: State, consumer: str, seq: int | None, everything: bool, wait: float
) -> None:
    """Ask the daemon running CONSUMER to deliver parked events again (SEQ, or --all).

    The events stay parked until the daemon has delivered them (in seq order per
    build); one that fails again is parked again with its new error.
    """
    if (seq is None) == (not everything):
        raise UsageError("name one parked SEQ or --all, not both and not neither")
    engine = state.engine()
    with engine.begin() as conn:
        _known(conn, consumer)
        chosen = request_redelivery(conn, consumer, None if everything else seq)
        running = consumer in consumers_running(conn)
        if conn.dialect.name == "postgresql":
            conn.execute(query("consumers_wake"))  # delivered at commit
    if not chosen:
        click.echo(f"nothing parked for {consumer}")
        return
    click.echo(f"redelivery of {len(chosen)} parked event(s) of {consumer} requested")
    if not running:
        click.echo(f"{consumer} is not running now: the next `herald run` redelivers them")
    if wait <= 0:
        return
    deadline = time.monotonic() + wait
    while True:
        with engine.connect() as conn:
            rows = {r.seq: r for r in parked_rows(conn, consumer) if r.seq in chosen}
        if not any(r.redeliver for r in rows.values()):
            break
        if time.monotonic() > deadline:
            pending = sum(1 for r in rows.values() if r.redeliver)
            raise UsageError(f"{pending} of {len(chosen)} not redelivered within {wait:g} s")
        time.sleep(0.1)
    click.echo(f"delivered: {len(chosen) - len(rows)}, parked again: {len(rows)}")
    if rows:
        raise SystemExit(1)


@parked_group.command("discard")
@click.argument("consumer")
@click.argument("seq", type=int, callback=_seq)
@click.option("--reason", required=True, help="Why (recorded with the discard).")
@pass_state
def parked_discard(state: State, consumer: str, seq: int, reason: str) -> None:
    """Give a parked event up for CONSUMER: no longer parked, recorded as discarded."""
    if not reason.strip():
        raise UsageError("--reason must say why")
    engine = state.engine()
    with engine.begin() as conn:
        _known(conn, consumer)
        discard_parked(conn, consumer, seq, reason.strip())
    click.echo(f"discarded seq {seq} for {consumer}: {reason.strip()}")
