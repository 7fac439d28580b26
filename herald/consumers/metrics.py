"""Prometheus metrics for the daemon (``herald run --metrics-port PORT``).

:class:`PrometheusMetrics` is the daemon's :class:`~herald.consumers.runner.Metrics`
(the runners report every delivery attempt and every committed offset to it)
and serves them, with a few figures read from the database at scrape time,
on ``http://ADDR:PORT/metrics``. Each instance has its own
``CollectorRegistry``, so several daemons (or tests) in one process never
share or clash over a metric.

The metric names and labels are a contract (dashboards and alerts use them):

``herald_deliveries_total{consumer, outcome}`` (counter)
    Delivery attempts this process made, by outcome: ``delivered``,
    ``failed`` (this attempt failed; an at_least_once event is retried),
    ``parked`` (an at_least_once event ran out of attempts, a handler said a
    retry cannot help, or an earlier event of the same build is parked) and
    ``expired`` (an ephemeral event older than the consumer's staleness limit,
    not delivered). One per row the daemon writes to ``herald_deliveries``,
    counted when the attempt ends, a moment before its batch commits (a batch
    whose commit fails, say after a lost claim, is counted and delivered
    again). Every configured consumer's four series exist from the start, at 0.
``herald_handler_duration_seconds{consumer}`` (histogram)
    How long each attempt took, buckets from 1 ms to 60 s. Every attempt
    counted above except the expired ones (no handler is called for them);
    an event parked because an earlier event of its build is parked calls no
    handler either and is observed as 0 s (the runner reports it as a parked
    attempt of 0 s, like the delivery record it writes).
``herald_consumer_offset{consumer}`` (gauge)
    The consumer's offset (the last seq it has finished), as this process
    last loaded or committed it; absent for a consumer this process has not
    run.
``herald_consumer_lag{consumer}`` (gauge, read at scrape time)
    ``herald_log_head_seq`` minus the consumer's offset in ``herald_consumers``
    (0 for an offset at the head), for every configured consumer, whichever
    daemon runs it. A consumer that has never run has offset 0: its lag is
    the whole log.
``herald_log_head_seq`` (gauge, read at scrape time)
    The newest seq in the log.
``herald_sequencer_pending_events`` (gauge, read at scrape time)
    Events written but not yet ordered: the rows of ``herald_events`` past
    the newest position in ``herald_log`` (two index lookups and a count of
    the rows found). Approximate in two ways: a writer's open transaction's
    rows are not visible, so not counted; and an event of a long transaction
    that commits after later positions were ordered is not counted either.
    PostgreSQL only (on SQLite the writer orders its own events): always 0.
``herald_up`` (gauge)
    1 if the scrape could read the database, else 0. When it is 0, the
    figures read at scrape time (lag, head, pending) are left out of that
    scrape rather than reported stale; the in-process ones are exported as
    usual, so a scrape always answers.

From the sequencer this process runs (set :attr:`PrometheusMetrics.sequencer`
to the daemon's, :attr:`herald.consumers.Daemon.sequencer`; absent if unset).
Its counters are this process's: a standby daemon (another holds the
sequencer's lock) reports 0.

``herald_sequencer_cycles_total`` (counter)
    Sequencer cycles that found committed events to order (idle looks, which
    cost one read, are not counted).
``herald_sequencer_events_total`` (counter)
    Events the sequencer gave a seq.
``herald_sequencer_cycle_duration_seconds`` (gauge)
    How long the last counted cycle took.

The scrape-time figures cost one connection from the daemon's pool and three
cheap queries, run with a 2 s statement timeout on PostgreSQL; a server
that does not answer costs a scrape up to the engine's connect timeout (5 s)
and gives ``herald_up 0``. On SQLite, herald's engine begins every
transaction with ``BEGIN IMMEDIATE``, so a scrape waits for a writer's open
transaction to end (up to the 30 s busy timeout).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final
from wsgiref.simple_server import WSGIServer

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from herald.consumers.model import Outcome
from herald.consumers.store import consumer_rows
from herald.errors import UsageError
from herald.outbox import Sequencer
from herald.outbox.reader import head
from herald.schema import events, log_order

__all__ = ["DURATION_BUCKETS", "PrometheusMetrics"]

log = logging.getLogger("herald.metrics")

#: Handler durations from a local file append (~1 ms) to the longest timeout
#: worth configuring (60 s), about three buckets a decade.
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: The outcomes a runner reports (``discarded`` is an operator's, never a runner's).
RUNNER_OUTCOMES: Final = ("delivered", "failed", "parked", "expired")

#: A scrape must answer well inside Prometheus's default 10 s scrape timeout.
_STATEMENT_TIMEOUT_MS: Final = 2000


class PrometheusMetrics:
    """The daemon's metrics, in their own registry, served over HTTP on request.

    ``engine`` is read at scrape time (the consumers' lag, the log's head);
    ``consumer_names`` are the consumers whose lag is exported (normally the
    daemon's configured consumers); ``sequencer``, if given (or set later
    through the attribute), is the daemon's, whose counters are exported.
    """

    def __init__(
        self,
        engine: sa.Engine,
        consumer_names: Iterable[str],
        sequencer: Sequencer | None = None,
    ) -> None:
        self.engine = engine
        self.consumer_names = list(dict.fromkeys(consumer_names))
        #: the sequencer whose counters are exported (the daemon creates it, so
        #: `herald run` sets this after building the daemon)
        self.sequencer = sequencer
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "herald_deliveries",
            "Delivery attempts, by consumer and outcome (delivered, failed, parked, expired).",
            ["consumer", "outcome"],
            registry=self.registry,
        )
        self.handler_duration = Histogram(
            "herald_handler_duration_seconds",
            "Duration of delivery attempts (expired events excluded: no handler is called).",
            ["consumer"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.offset = Gauge(
            "herald_consumer_offset",
            "The consumer's offset (last finished seq) as this process last committed it.",
            ["consumer"],
            registry=self.registry,
        )
        for name in self.consumer_names:
            # Series that exist at 0 from the start: rate() and absent() work at once.
            for outcome in RUNNER_OUTCOMES:
                self.deliveries.labels(name, outcome)
            self.handler_duration.labels(name)
        self.registry.register(_DatabaseCollector(self))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the runner's Metrics protocol ---------------------------------------------------

    def attempt(self, consumer: str, outcome: Outcome, seconds: float) -> None:
        """One delivery attempt ended with ``outcome`` after ``seconds``."""
        self.deliveries.labels(consumer, outcome).inc()
        if outcome != "expired":
            self.handler_duration.labels(consumer).observe(max(0.0, seconds))

    def committed(self, consumer: str, offset: int) -> None:
        """The consumer's offset is now ``offset``."""
        self.offset.labels(consumer).set(offset)

    # -- the HTTP server -------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread (port 0: any free port).

        A port that is taken, or an address that cannot be bound, is a
        :class:`~herald.errors.UsageError` naming ``--metrics-port``.
        """
        with self._lock:
            if self._server is not None:
                raise UsageError(f"--metrics-port {port}: the metrics server is already running")
            try:
                # prometheus-client >= 0.17 returns the server and its thread, so
                # that close() can stop it (pyproject asks for >= 0.20).
                server, thread = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UsageError(f"--metrics-port {port}: address already in use") from None
                reason = exc.strerror or str(exc)
                raise UsageError(
                    f"--metrics-port {port}: cannot listen on {addr}: {reason}"
                ) from None
            self._server, self._thread = server, thread

    @property
    def port(self) -> int | None:
        """The port the server listens on (the one chosen for port 0), or None."""
        server = self._server
        return int(server.server_port) if server is not None else None

    def close(self) -> None:
        """Stop the HTTP server, if :meth:`serve` started one; safe to repeat."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()  # ends serve_forever(); returns once it has
            server.server_close()
        if thread is not None:
            thread.join(5.0)

    shutdown = close

    def __enter__(self) -> PrometheusMetrics:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- read at scrape time ---------------------------------------------------------------

    def read_database(self) -> tuple[int, dict[str, int], int]:
        """The log's head, the configured consumers' offsets, the pending events (one read)."""
        with self.engine.connect() as conn:
            postgresql = conn.dialect.name == "postgresql"
            if postgresql:
                # SET LOCAL: only this read's transaction, which is rolled back below.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {_STATEMENT_TIMEOUT_MS}")
            top = head(conn)
            offsets = {row.name: row.offset for row in consumer_rows(conn)}
            pending = 0
            if postgresql:
                ordered = sa.select(sa.func.coalesce(sa.func.max(log_order.c.position), 0))
                pending = int(
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(events)
                        .where(events.c.position > ordered.scalar_subquery())
                    ).scalar_one()
                )
            conn.rollback()
        return top, offsets, pending


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


@dataclass(slots=True)
class _Families:
    """One scrape's metric families (new ones every scrape: they carry the samples)."""

    lag: GaugeMetricFamily = field(
        default_factory=lambda: _gauge(
            "herald_consumer_lag",
            "Seqs in the log after the consumer's offset (head - offset), read at scrape time.",
            ["consumer"],
        )
    )
    head: GaugeMetricFamily = field(
        default_factory=lambda: _gauge("herald_log_head_seq", "The newest seq in the log.")
    )
    pending: GaugeMetricFamily = field(
        default_factory=lambda: _gauge(
            "herald_sequencer_pending_events",
            "Events written but not yet ordered (approximate: open transactions' rows are "
            "not visible); 0 on SQLite.",
        )
    )
    up: GaugeMetricFamily = field(
        default_factory=lambda: _gauge(
            "herald_up", "1 if the scrape could read herald's database, else 0."
        )
    )
    cycles: CounterMetricFamily = field(
        default_factory=lambda: CounterMetricFamily(
            "herald_sequencer_cycles",
            "Sequencer cycles of this process that found events to order.",
        )
    )
    sequenced: CounterMetricFamily = field(
        default_factory=lambda: CounterMetricFamily(
            "herald_sequencer_events", "Events this process's sequencer gave a seq."
        )
    )
    duration: GaugeMetricFamily = field(
        default_factory=lambda: _gauge(
            "herald_sequencer_cycle_duration_seconds",
            "Duration of this process's last sequencer cycle that ordered events.",
        )
    )

    def all(self) -> list[Metric]:
        return [
            self.lag, self.head, self.pending, self.up, self.cycles, self.sequenced, self.duration
        ]  # fmt: skip


class _DatabaseCollector:
    """The figures read when Prometheus scrapes: lag, head, pending events, the sequencer."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics
        self._was_up = True

    def describe(self) -> list[Metric]:
        # Given so that registering the collector checks names without querying the database.
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        metrics = self.metrics
        try:
            head_seq, offsets, pending = metrics.read_database()
        except Exception as exc:  # noqa: BLE001 - a scrape answers whatever the database does
            if self._was_up:
                log.warning("metrics: cannot read the database: %s", _one_line(exc))
            self._was_up = False
            families.up.add_metric([], 0)
        else:
            if not self._was_up:
                log.info("metrics: the database answers again")
            self._was_up = True
            families.up.add_metric([], 1)
            for name in metrics.consumer_names:
                families.lag.add_metric([name], max(0, head_seq - offsets.get(name, 0)))
            families.head.add_metric([], head_seq)
            families.pending.add_metric([], pending)
            yield families.lag
            yield families.head
            yield families.pending
        yield families.up
        sequencer = metrics.sequencer
        if sequencer is not None:
            stats = sequencer.stats
            families.cycles.add_metric([], stats.cycles)
            families.sequenced.add_metric([], stats.sequenced)
            families.duration.add_metric([], stats.last_cycle_seconds)
            yield families.cycles
            yield families.sequenced
            yield families.duration


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
