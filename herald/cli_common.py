"""What every ``herald`` subcommand shares: the database state, stopping on signals."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click
import sqlalchemy as sa

from herald.config import check_connection
from herald.config import create_engine as _create_engine
from herald.errors import NotMigrated, UsageError
from herald.outbox.reader import MAX_SEQ, head, last_seq_until
from herald.schema import migrate
from herald.schema.dberrors import translated
from herald.times import parse_time

__all__ = [
    "SINCE_OPTION",
    "UNTIL_OPTION",
    "State",
    "pass_state",
    "stop_on_signals",
    "until_seq",
]

#: ``--since TIME``: where reading starts, for the commands that read a range of the log.
SINCE_OPTION = click.option(
    "--since",
    default=None,
    metavar="TIME",
    help="Start at the first event recorded at or after TIME (ISO 8601, UTC unless zoned; "
    "or an age ago: 30m, 12h, 7d).",
)

#: ``--until SEQ|TIME``: where it stops (resolved by :func:`until_seq`).
UNTIL_OPTION = click.option(
    "--until",
    default=None,
    metavar="SEQ|TIME",
    help="The last seq, or the last event recorded at or before TIME [default: the head].",
)


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
                current = migrate.current_revision(conn)
                if current is None:
                    raise NotMigrated()
                if current != migrate.head_revision():
                    raise NotMigrated(
                        f"the database's schema is at revision {current}, this herald needs "
                        f"{migrate.head_revision()}; run `herald db upgrade` first"
                    )
        return self._engine

    def close(self) -> None:
        """Dispose of the engine, if one was made (the command is over)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


pass_state = click.make_pass_decorator(State)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM or SIGINT while the block runs (a clean stop, exit 0)."""

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger("herald").info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def until_seq(conn: sa.Connection, until: str) -> int:
    """The last seq an ``--until SEQ|TIME`` option allows: a seq as given (at most the
    head), or the last event recorded at or before the time."""
    if until.isdigit():
        value = int(until)
        if not 1 <= value <= MAX_SEQ:
            raise UsageError(f"--until: a seq is between 1 and {MAX_SEQ}, not {until}")
        return min(value, head(conn))
    return last_seq_until(conn, parse_time(until, "--until"))
