"""``herald prune``: retention, the one path that deletes from the append-only log."""

from __future__ import annotations

import json

import click

from herald.cli_common import State, pass_state
from herald.cli_consumers import CONFIG_OPTION
from herald.consumers import load_config
from herald.outbox import Sequencer
from herald.outbox.retention import prune
from herald.times import parse_age

__all__ = ["prune_command"]


@click.command("prune")
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Only events recorded more than AGE ago (90s, 30m, 12h, 7d, 2w).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_state
def prune_command(
    state: State, older_than: str, dry_run: bool, config_path: str | None, as_json: bool
) -> None:
    """Delete old events that every consumer has finished, with their delivery records.

    Deletes the log's oldest events, up to the first one that is younger than
    AGE, that some consumer has not finished (its offset; a consumer of the
    configuration file that has never run holds everything back), or that a
    consumer has parked. An event of a build or evaluation goes only with its
    whole history. One transaction; recorded (range, counts, who, when).
    JSON keys: older_than_seconds, cutoff, dry_run, first_seq, last_seq,
    events, deliveries, kept, limited_by, operation_id.
    """
    age = parse_age(older_than, "--older-than")
    config = load_config(config_path, build_handlers=False)
    engine = state.engine()
    with engine.connect() as conn:
        Sequencer().cycle(conn)
        result = prune(conn, age, dry_run=dry_run, configured=[c.name for c in config.consumers])
    if as_json:
        click.echo(json.dumps(result.to_json(), sort_keys=True))
        return
    cutoff = result.cutoff.strftime("%Y-%m-%d %H:%M:%S UTC")
    if result.first_seq is None:
        click.echo(f"nothing to prune: no event before {cutoff} that every consumer finished")
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(
            f"{verb} {result.events} events (seq {result.first_seq}-{result.last_seq}, "
            f"recorded before {cutoff}) and {result.deliveries} delivery records"
        )
        if result.kept:
            click.echo(f"kept {result.kept} events of builds or evaluations with younger events")
    click.echo(f"held back by: {'; '.join(result.limited_by)}")
    if result.operation_id is not None:
        click.echo(f"recorded as operation {result.operation_id}")
