"""The daemon (`herald run`): the sequencer and every consumer, in one process.

Connections: one small pool (the engine's) shared by the sequencer and all
consumers, plus one listening connection, however many consumers run. The
listening connection is the daemon's *session* on PostgreSQL: it LISTENs
for the sequencer's NOTIFY (a hint only: consumers always re-read the log,
and poll every ``poll_interval`` anyway, so a lost NOTIFY only delays), and
it holds one session advisory lock per consumer this process runs. Several
daemons on one database therefore share the consumers: each consumer is run
by whichever daemon locked it first, and the moment that process dies (or
its session is killed) the lock is free and another daemon claims the
consumer within ``claim_interval``. SQLite has neither NOTIFY nor advisory
locks: consumers poll, and a claim is a lease renewed every
``claim_interval`` (a killed daemon's consumers are taken over once its
lease, ``lease`` seconds, has run out).

A broken session (a restarted server, ``pg_terminate_backend``) stops this
process's consumers (they finish what is in flight; their commits are fenced
by the claim token, see :mod:`herald.consumers.store`), and the daemon
reconnects with exponential backoff (tenacity) and claims again. A stop
request (SIGTERM) lets every consumer finish the deliveries in flight and
commit, then releases the claims.

The daemon is synchronous, with threads: handlers are ordinary blocking
functions (HTTP requests, subprocesses, file writes), and a thread per
consumer keeps a slow one from delaying any other.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from herald.consumers import store
from herald.consumers.model import Consumer
from herald.consumers.runner import Metrics, NullMetrics, Runner
from herald.errors import LostClaim, TransientDatabaseError, UsageError
from herald.outbox import Sequencer, run_sequencer
from herald.outbox.reconnect import run_reconnecting
from herald.schema import CONSUMER_LOCK_CLASS
from herald.schema.dberrors import translated
from herald.schema.queries import QUERIES

__all__ = ["Daemon", "tune_garbage_collector", "tune_interpreter"]

log = logging.getLogger("herald.run")


def tune_garbage_collector() -> None:
    """Set CPython's cycle collector up for a long-running daemon (``herald run`` does).

    A consumer makes and drops a handful of objects per event, thousands a
    second, and keeps a page of them alive meanwhile. With the defaults (a
    young collection every 700 allocations, and the whole heap scanned each
    time it has grown by a quarter) collecting took a fifth of a no-op
    consumer's CPU. What is loaded by now (modules, the configuration, the
    handlers) lives as long as the process: ``gc.freeze`` takes it out of the
    collector's sight, and young collections run every 10,000 allocations.
    Nothing is left uncollected: reference counting frees almost everything
    at once, and the collector still finds the rare cycle, only less often.
    Process-wide, so the Python API leaves it to the program that embeds a
    :class:`Daemon`.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


#: CPython's thread switch interval in herald's own processes (the default is 5 ms).
SWITCH_INTERVAL = 0.001


def tune_interpreter() -> None:
    """Set CPython up for a long-running daemon: what ``herald run`` and ``herald replay`` do.

    The collector as :func:`tune_garbage_collector` sets it, and a thread
    switch interval of 1 ms instead of 5. A consumer's commits thread spends
    its time waiting for the database; when an answer comes while its reading
    thread decodes a page, CPython lets the commits thread wait up to the
    switch interval before it asks the reader to let go of the interpreter.
    At batch 5,000 the first statement of each commit (the fence) took
    about 8 ms (median) in the daemon against 0.4 ms on its own, 3.9 ms with
    the shorter interval, and the no-op consumer went from 85,000 to 91,000
    events/s; at the default batch of 500 it made no difference
    (BENCHMARKS.md, B3). Process-wide, so the Python API leaves it to the
    program that embeds a :class:`Daemon`.
    """
    tune_garbage_collector()
    sys.setswitchinterval(SWITCH_INTERVAL)


class _SessionLost(TransientDatabaseError):
    """The daemon's listening connection failed."""


class Daemon:
    """Runs the sequencer (PostgreSQL) and the given consumers until stopped."""

    def __init__(
        self,
        engine: sa.Engine,
        consumers: Sequence[Consumer] = (),
        *,
        poll_interval: float = 1.0,
        claim_interval: float = 1.0,
        lease: float = 15.0,
        sequencer: bool = True,
        sequencer_poll: float = 0.05,
        metrics: Metrics | None = None,
    ) -> None:
        names = [c.name for c in consumers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UsageError(f"consumer {duplicates[0]!r} is configured twice")
        self.engine = engine
        self.consumers = list(consumers)
        self.postgresql = engine.dialect.name == "postgresql"
        self.poll_interval = poll_interval if self.postgresql else min(poll_interval, 0.1)
        self.claim_interval = claim_interval
        self.lease = lease
        self.metrics: Metrics = metrics or NullMetrics()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.sequencer = Sequencer()
        self._with_sequencer = sequencer and self.postgresql
        self._sequencer_poll = sequencer_poll
        self._stop = threading.Event()
        self._runners: dict[str, Runner] = {}
        self._wakes: dict[str, threading.Event] = {}
        self._exits: queue.SimpleQueue[tuple[Runner, BaseException | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: set once the daemon has claimed what it could at its first look (for tests)
        self.ready = threading.Event()

    # -- in the background (the Python API) -----------------------------------------------

    def start(self) -> Daemon:
        """Run in a background thread (once; again is a no-op); :meth:`stop` ends it."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="herald-daemon", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop (the consumers finish what is in flight and commit) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def running(self) -> list[str]:
        """The consumers this process runs right now."""
        return sorted(self._runners)

    # -- the daemon ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then stop the consumers cleanly and return."""
        if stop is not self._stop:
            # One flag for both ways of stopping (a signal handler's event, or stop()).
            def relay() -> None:
                # Ends with the daemon too, whichever flag is set first.
                while not self._stop.is_set():
                    if stop.wait(0.1):
                        self._stop.set()

            threading.Thread(target=relay, daemon=True, name="herald-stop").start()
        sequencer_stop = threading.Event()
        sequencer_thread = None
        if self._with_sequencer:
            sequencer_thread = threading.Thread(
                target=run_sequencer,
                args=(self.engine, sequencer_stop),
                kwargs={
                    "poll_interval": self._sequencer_poll,
                    "sequencer": self.sequencer,
                    # This process's consumers wake at once, not when the NOTIFY is back.
                    "on_ordered": self._wake_all,
                },
                name="herald-sequencer",
                daemon=True,
            )
            sequencer_thread.start()
        try:

            def session() -> None:
                with translated():
                    self._session()

            run_reconnecting(
                session,
                self._stop,
                what="the daemon's database session",
                log=log,
                initial=0.1,
                maximum=5.0,
            )
        finally:
            self._stop.set()  # also when an error ends the daemon: the relay thread ends
            self._stop_runners()
            sequencer_stop.set()
            if sequencer_thread is not None:
                sequencer_thread.join(10.0)
            self.ready.set()

    def _session(self) -> None:
        session = _Session(self.engine) if self.postgresql else None
        try:
            next_claim = 0.0
            while not self._stop.is_set():
                self._reap(session)
                if time.monotonic() >= next_claim:
                    self._claim(session)
                    next_claim = time.monotonic() + self.claim_interval
                    self.ready.set()
                timeout = max(0.0, min(next_claim - time.monotonic(), self.poll_interval))
                if session is not None:
                    # Short waits: a NOTIFY ends one at once, and a stop request is
                    # seen within a quarter of a second.
                    if session.wait(min(timeout, 0.25)):
                        self._wake_all()
                else:
                    self._stop.wait(timeout)
        except _SessionLost:
            # The claims went with the session: stop our consumers before reconnecting.
            self._stop_runners(release=False)
            raise
        finally:
            if session is not None:
                self._stop_runners(session=session)
                session.close()

    def _wake_all(self) -> None:
        for wake in list(self._wakes.values()):
            wake.set()

    def _claim(self, session: _Session | None) -> None:
        for consumer in self.consumers:
            name = consumer.name
            if name in self._runners:
                if session is None and not self._renew(name):
                    log.warning("consumer %s: the lease passed to another process", name)
                    self._runners[name].stop()
                continue
            if session is not None:
                if not session.try_lock(name):
                    continue
                try:
                    with self.engine.begin() as conn:
                        store.set_owner(conn, name, self.token, self.lease)
                except BaseException:
                    session.unlock(name)
                    raise
            elif not self._renew(name):
                continue
            self._start_runner(consumer)

    def _renew(self, name: str) -> bool:
        with self.engine.begin() as conn:
            return store.claim_lease(conn, name, self.token, self.lease)

    def _start_runner(self, consumer: Consumer) -> None:
        wake = self._wakes.setdefault(consumer.name, threading.Event())
        runner = Runner(
            consumer,
            self.engine,
            self.token,
            wake=wake,
            poll_interval=self.poll_interval,
            metrics=self.metrics,
            on_exit=lambda r, e: self._exits.put((r, e)),
        )
        self._runners[consumer.name] = runner
        log.info("consumer %s: running (%s)", consumer.name, consumer.type)
        runner.start()

    def _reap(self, session: _Session | None = None) -> None:
        """Forget runners that ended by themselves (a lost claim, an error)."""
        while True:
            try:
                runner, error = self._exits.get_nowait()
            except queue.Empty:
                return
            name = runner.consumer.name
            if self._runners.get(name) is runner:
                del self._runners[name]
                if session is not None:
                    session.unlock(name)
                if error is not None and not isinstance(error, LostClaim):
                    log.error("consumer %s ended on an error; claiming it again", name)

    def _stop_runners(self, *, release: bool = True, session: _Session | None = None) -> None:
        runners = list(self._runners.values())
        for runner in runners:
            runner.stop()
        for runner in runners:
            runner.join(runner.consumer.timeout + 30.0)
            if runner.is_alive():
                log.error("consumer %s did not stop in time", runner.consumer.name)
        if release and runners:
            try:
                with self.engine.begin() as conn:
                    for runner in runners:
                        store.release(conn, runner.consumer.name, self.token)
            except Exception as exc:  # noqa: BLE001 - the claims lapse by themselves
                log.warning("could not release the consumers' claims: %s", exc)
        if session is not None:
            for runner in runners:
                session.unlock(runner.consumer.name)
        self._runners.clear()
        while not self._exits.empty():
            self._exits.get_nowait()


class _Session:
    """The daemon's listening connection: LISTEN, and the consumers' advisory locks."""

    def __init__(self, engine: sa.Engine) -> None:
        with translated():
            raw = engine.raw_connection()
        conn: Any = raw.driver_connection
        # Detached: the pool never gets it back, so neither LISTEN nor the locks
        # can leak into a pooled connection used for something else.
        raw.detach()
        try:
            conn.rollback()
            conn.autocommit = True
            conn.execute(QUERIES["listen"])
        except Exception as exc:
            conn.close()
            raise _SessionLost(f"cannot listen: {exc}") from exc
        self.conn = conn

    def _do(self, sql: str, params: tuple[Any, ...]) -> Any:
        try:
            return self.conn.execute(sql, params).fetchone()
        except Exception as exc:
            raise _SessionLost(str(exc).strip() or type(exc).__name__) from exc

    def try_lock(self, name: str) -> bool:
        row = self._do(QUERIES["consumer_try_lock"], (CONSUMER_LOCK_CLASS, name))
        return bool(row[0])

    def unlock(self, name: str) -> None:
        try:
            self.conn.execute(QUERIES["consumer_unlock"], (CONSUMER_LOCK_CLASS, name))
        except Exception:  # a dead session holds no lock anyway
            log.debug("unlocking %s failed", name, exc_info=True)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a NOTIFY (its payload is ignored); True if one came."""
        try:
            return any(True for _ in self.conn.notifies(timeout=timeout, stop_after=1))
        except Exception as exc:
            raise _SessionLost(str(exc).strip() or type(exc).__name__) from exc

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            log.debug("closing the session failed", exc_info=True)
