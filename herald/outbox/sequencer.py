"""The sequencer: committed events → the dense log order (PostgreSQL).

Writers take no lock and send no NOTIFY; they only insert rows whose ``tx``
column is their transaction id. One process at a time (elected with a
session advisory lock; any process can take over) turns what has committed
into ``herald_log`` rows, by snapshot difference (PgQ's method):

1. lock the stored snapshot ``prev`` (``FOR UPDATE``), take ``now``;
2. give the next seqs to the events whose ``tx`` is visible in ``now`` and
   was not in ``prev``, ordered by ``(tx, position)``;
3. store ``now`` and the newest seq, NOTIFY once, commit.

An idle cycle costs one read (``pg_current_snapshot()``, compared with the
last one seen) and writes nothing. On SQLite there is nothing to do: the
writer orders its own events (see :mod:`herald.outbox.append`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from herald.outbox.reconnect import run_reconnecting
from herald.schema import SEQUENCER_LOCK_KEY
from herald.schema.dberrors import sqlstate, translate, translated
from herald.schema.queries import query

__all__ = ["CycleStats", "Sequencer", "run_sequencer"]

log = logging.getLogger("herald.sequencer")

#: A snapshot before every transaction: "everything is newer than this".
_ORIGIN = "1:1:"

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
            now = conn.execute(query("current_snapshot")).scalar_one()
            if now == self._seen:
                # No transaction anywhere has finished since the last look.
                conn.rollback()
                return 0
            prev, _ = conn.execute(query("sequencer_state")).one()
            pending = conn.execute(query("sequencer_pending"), _bounds(prev, now)).scalar_one()
            conn.rollback()
            if not pending:
                self._seen = now
                return 0
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                # The daemon's own connection looks without a transaction (one
                # statement per idle check, no BEGIN/ROLLBACK); ordering needs one.
                conn.execution_options(isolation_level=conn.default_isolation_level)
                try:
                    count = self._order(conn)
                finally:
                    conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                count = self._order(conn)
        except sa_exc.SQLAlchemyError as exc:
            if sqlstate(exc) != _INSUFFICIENT_PRIVILEGE:
                raise translate(exc) from exc
            with translated():
                conn.rollback()
            self._may_order = False
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
            log.debug("this role may not order the log (%s); reading what is ordered", reason)
            return 0
        self.stats.cycles += 1
        self.stats.sequenced += count
        self.stats.last_cycle_seconds = time.perf_counter() - started
        return count

    def _order(self, conn: sa.Connection) -> int:
        with conn.begin():
            prev, last_seq = conn.execute(query("sequencer_state_for_update")).one()
            # `now` is taken after the row lock: a cycle that waited for another
            # one sees its stored snapshot as `prev` and starts where it stopped.
            now = conn.execute(query("current_snapshot")).scalar_one()
            # THE ORDERING ARGUMENT. A bigserial `position` is drawn when a row
            # is inserted but becomes visible when its transaction commits, so
            # position 101 can appear after 102 (Hydra #496): a reader of
            # `position > offset` would skip 101 forever. The log's order is
            # therefore not the position but the moment of visibility: an
            # event gets a seq in the first cycle whose snapshot `now` sees its
            # transaction as committed. `tx >= xmax(prev) OR tx IN xip(prev)`
            # is exactly "not yet visible in prev" (anything below xmin(prev)
            # and not in xip(prev) had finished, and was ordered then), and
            # pg_visible_in_snapshot(tx, now) is "visible now". Every event's
            # transaction is visible in exactly one (prev, now] interval, so
            # it is ordered exactly once; rolled-back transactions are never
            # visible, so their rows are never ordered. A transaction held
            # open for minutes stays in xip of every snapshot meanwhile: the
            # events committed around it are ordered and readable at once, and
            # its own events get seqs after theirs when it commits. The cycle
            # stores `now` in the same transaction as the rows it orders, so a
            # sequencer killed at any point either ordered a range or did not,
            # and its successor continues from the last committed snapshot.
            # Within a cycle, events are ordered by (tx, position): one
            # writer's transactions get increasing xids, so its events keep
            # their commit order.
            count = conn.execute(
                query("sequence_new_events"), {**_bounds(prev, now), "last_seq": last_seq}
            ).rowcount
            if count:
                conn.execute(query("sequencer_advance"), {"now": now, "last_seq": last_seq + count})
                conn.execute(query("sequencer_notify"), {"last_seq": last_seq + count})
                self.stats.last_seq = last_seq + count
        return count


def _bounds(prev: str | None, now: str) -> dict[str, str]:
    """The parameters that say "visible in now, not in prev"."""
    prev = prev or _ORIGIN
    # pg_snapshot's text form is "xmin:xmax:xip,xip,..."; the in-progress list
    # goes in as an array literal so that the planner can estimate it.
    xip = prev.split(":")[2]
    return {"prev": prev, "now": now, "xip": "{" + xip + "}"}


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
) -> None:
    """Run the sequencer until ``stop`` is set (PostgreSQL; returns at once on SQLite).

    Waits as a standby while another process holds the lock, polling every
    ``standby_interval`` seconds. Active, it polls with an adaptive interval:
    1 ms right after a cycle that found work, doubling to ``poll_interval``
    while idle. A broken connection or a restarted server is retried with
    exponential backoff (tenacity); the lock is re-elected on reconnect.
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
