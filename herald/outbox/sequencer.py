"""The sequencer: committed events → the dense log order (PostgreSQL).

Writers take no lock and send no NOTIFY; they only insert rows whose ``tx``
column is their transaction id. One process at a time (elected with a
session advisory lock; any process can take over) turns what has committed
into ``herald_log`` rows, by snapshot difference (PgQ's method):

1. lock the stored snapshot ``prev`` (``FOR UPDATE``), take ``now``;
2. give the next seqs to the events whose ``tx`` is visible in ``now`` and
   was not in ``prev``, ordered by ``(tx, position)``;
3. store ``now`` and the newest seq, NOTIFY once, commit.

The steps run on the server, in the function ``herald_sequence_v1()``
(migration 0005, which spells out why this order is exact): a cycle is one
round trip. An idle cycle costs one read (``pg_current_snapshot()``,
compared with the last one seen) and writes nothing. On SQLite there is
nothing to do: the writer orders its own events (see
:mod:`herald.outbox.append`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from herald.outbox.reconnect import run_reconnecting
from herald.schema import SEQUENCER_LOCK_KEY
from herald.schema.dberrors import sqlstate, translate, translated
from herald.schema.queries import QUERIES, query

__all__ = ["CycleStats", "Sequencer", "run_sequencer"]

log = logging.getLogger("herald.sequencer")

#: SQLSTATE insufficient_privilege: the role may read the log but not order it.
_INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(slots=True)
class CycleStats:
    """What the sequencer has done since it started (for logs and metrics)."""

    cycles: int = 0
    sequenced: int = 0
    last_seq: int = 0
    last_cycle_seconds: float = 0.0


class Sequencer:
    """Runs sequencer cycles on a connection it is given."""

    def __init__(self) -> None:
        self._seen: str | None = None
        #: False once the database refused this role a cycle (permission denied)
        self._may_order = True
        self.stats = CycleStats()

    @property
    def may_order(self) -> bool:
        """False once the database refused this role a cycle (it only reads)."""
        return self._may_order

    def cycle(self, conn: sa.Connection) -> int:
        """Order what has committed since the last cycle; returns how many events.

        ``conn`` must have no transaction open; the cycle commits its own.
        Any process may run a cycle at any time, daemon or reader: cycles
        serialize on the state row (``FOR UPDATE``), and the advisory lock
        only elects which daemon runs them continuously. When it returns,
        every event committed before it was called has a seq.

        A role that may not order (the auditor's: SQLSTATE 42501, permission
        denied) is not an error: the first refusal is logged at debug level,
        and from then on this sequencer returns 0 at once, so its reader reads
        what is ordered already. Every other database error is raised as
        herald's.
        """
        if conn.dialect.name != "postgresql" or not self._may_order:
            return 0
        started = time.perf_counter()
        try:
            # exec_driver_sql: the daemon polls this up to a thousand times a second, and
            # the statement needs nothing of SQLAlchemy's (no parameters, no compiling).
            now = conn.exec_driver_sql(QUERIES["current_snapshot"]).scalar_one()
            if now == self._seen:
                # No transaction anywhere has finished since the last look.
                conn.rollback()
                return 0
            # One call does the rest on the server (herald_sequence_v1, migration
            # 0005, where the ordering argument is written out): look whether anything
            # committed since the stored snapshot, and if so lock the state, order the
            # new events, store the snapshot and NOTIFY, in the call's transaction (on
            # the daemon's connection, which looks without a transaction, the
            # statement's own).
            count, newest = conn.exec_driver_sql(QUERIES["sequence"]).one()
            conn.commit()
        except sa_exc.SQLAlchemyError as exc:
            if sqlstate(exc) != _INSUFFICIENT_PRIVILEGE:
                raise translate(exc) from exc
            with translated():
                conn.rollback()
            self._may_order = False
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
            log.debug("this role may not order the log (%s); reading what is ordered", reason)
            return 0
        if not count:
            # Nothing new up to `now`: the next look is a single read until another
            # transaction finishes.
            self._seen = now
            return 0
        self.stats.cycles += 1
        self.stats.sequenced += count
        self.stats.last_seq = newest
        self.stats.last_cycle_seconds = time.perf_counter() - started
        return int(count)


def _try_lock(conn: sa.Connection) -> bool:
    locked = bool(
        conn.execute(query("sequencer_try_lock"), {"key": SEQUENCER_LOCK_KEY}).scalar_one()
    )
    conn.commit()
    return locked


def run_sequencer(
    engine: sa.Engine,
    stop: threading.Event,
    *,
    poll_interval: float = 0.05,
    standby_interval: float = 1.0,
    on_active: threading.Event | None = None,
    sequencer: Sequencer | None = None,
    on_ordered: Callable[[], None] | None = None,
) -> None:
    """Run the sequencer until ``stop`` is set (PostgreSQL; returns at once on SQLite).

    Waits as a standby while another process holds the lock, polling every
    ``standby_interval`` seconds. Active, it polls with an adaptive interval:
    1 ms right after a cycle that found work, doubling to ``poll_interval``
    while idle. A broken connection or a restarted server is retried with
    exponential backoff (tenacity); the lock is re-elected on reconnect.
    ``on_ordered`` is called after every cycle that ordered events: readers in
    the same process wake without waiting for the NOTIFY to come back.
    """
    if engine.dialect.name != "postgresql":
        return
    seq = sequencer or Sequencer()

    def session() -> None:
        with engine.connect() as conn:
            try:
                with translated():
                    while not stop.is_set() and not _try_lock(conn):
                        stop.wait(standby_interval)
                if stop.is_set():
                    return
                log.info("sequencer active (pid %s)", _backend_pid(conn))
                # Idle checks are single reads: run them outside a transaction, so an
                # idle daemon costs one statement per poll (cycle() opens one to order).
                conn.execution_options(isolation_level="AUTOCOMMIT")
                if on_active is not None:
                    on_active.set()
                interval = 0.001
                while not stop.is_set():
                    if seq.cycle(conn):
                        if on_ordered is not None:
                            on_ordered()
                        interval = 0.001
                        continue
                    if not seq.may_order:
                        log.error(
                            "sequencer: this database role may not order the log (permission "
                            "denied); run herald with the daemon role (`herald db roles`)"
                        )
                        return
                    stop.wait(interval)
                    interval = min(interval * 2, poll_interval)
            finally:
                if on_active is not None:
                    on_active.clear()
                # Closing the server connection releases the session lock even
                # if the pool would otherwise have kept the connection.
                conn.invalidate()

    def translated_session() -> None:
        with translated():
            session()

    run_reconnecting(translated_session, stop, what="sequencer", log=log, initial=0.05, maximum=2.0)


def _backend_pid(conn: sa.Connection) -> int:
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    conn.commit()
    return int(pid)
