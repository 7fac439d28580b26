"""The daemon's Prometheus metrics, scraped over real HTTP from a daemon running in-process.

Every figure is checked against the database: the delivery counters and the
handler histogram against the rows of ``herald_deliveries``, the lag and the
head against ``herald_consumers`` and ``herald_log``. Also: a scrape still
answers (``herald_up 0``) when the database does not, and a taken port is a
one-line usage error.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from herald.config import create_engine
from herald.consumers import Consumer, Daemon, wait_for
from herald.consumers.metrics import PrometheusMetrics
from herald.errors import UsageError
from herald.outbox import LogEntry, Sequencer, append

#: (sample name, sorted label pairs) → value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

EVENTS = 20
NAMES = ("quiet", "broken")


def scrape(metrics: PrometheusMetrics) -> Samples:
    """GET /metrics from the server ``metrics`` runs; every sample by name and labels."""
    assert metrics.port is not None
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def quiet(entry: LogEntry) -> None:
    """Delivers everything at once."""


def broken(entry: LogEntry) -> None:
    raise RuntimeError(f"cannot deliver seq {entry.seq}")


def consumers() -> list[Consumer]:
    return [
        Consumer("quiet", ["acme.*"], quiet, batch_size=7),
        Consumer("broken", ["acme.*"], broken, max_attempts=2, retry_initial=0.01, retry_max=0.02),
    ]


def append_ticks(engine: sa.Engine, count: int, start: int = 0) -> None:
    """``count`` at_least_once events, one transaction."""
    with engine.begin() as conn:
        for number in range(start, start + count):
            append(conn, "acme.tick", {"n": number}, delivery="at_least_once")


def records(engine: sa.Engine) -> dict[tuple[str, str], int]:
    """The delivery records, counted by (consumer, outcome)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT consumer, outcome, count(*) FROM herald_deliveries "
                "GROUP BY consumer, outcome"
            )
        ).all()
    return {(consumer, outcome): int(count) for consumer, outcome, count in rows}


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.postgresql
def test_scrape_agrees_with_the_database(pg_engine: sa.Engine) -> None:
    metrics = PrometheusMetrics(pg_engine, NAMES)
    metrics.serve(0)
    try:
        # Before any daemon: the events are written, none is ordered yet.
        append_ticks(pg_engine, EVENTS)
        before = scrape(metrics)
        assert value(before, "herald_up") == 1
        assert value(before, "herald_sequencer_pending_events") == EVENTS
        assert value(before, "herald_log_head_seq") == 0
        for name in NAMES:
            assert value(before, "herald_consumer_lag", consumer=name) == 0
            for outcome in ("delivered", "failed", "parked", "expired"):
                assert value(before, "herald_deliveries_total", consumer=name, outcome=outcome) == 0
        assert "herald_sequencer_cycles_total" not in names(before)  # no sequencer given yet

        daemon = Daemon(pg_engine, consumers(), metrics=metrics)
        metrics.sequencer = daemon.sequencer
        with daemon:
            for name in NAMES:
                wait_for(pg_engine, name, EVENTS, timeout=30)
            during = scrape(metrics)
        found = records(pg_engine)

        assert value(during, "herald_up") == 1
        assert value(during, "herald_log_head_seq") == EVENTS
        assert value(during, "herald_sequencer_pending_events") == 0
        assert value(during, "herald_sequencer_cycles_total") >= 1
        # Nothing else ran a cycle: the daemon's sequencer ordered every event.
        assert value(during, "herald_sequencer_events_total") == EVENTS
        assert value(during, "herald_sequencer_cycle_duration_seconds") > 0
        assert found[("quiet", "delivered")] == EVENTS
        assert found[("broken", "failed")] == EVENTS  # the first attempt of each
        assert found[("broken", "parked")] == EVENTS  # the second, the last allowed
        for name in NAMES:
            assert value(during, "herald_consumer_lag", consumer=name) == 0
            assert value(during, "herald_consumer_offset", consumer=name) == EVENTS
            attempts = 0
            for outcome in ("delivered", "failed", "parked", "expired"):
                counted = value(during, "herald_deliveries_total", consumer=name, outcome=outcome)
                assert counted == found.get((name, outcome), 0), (name, outcome)
                attempts += found.get((name, outcome), 0)
            count = value(during, "herald_handler_duration_seconds_count", consumer=name)
            assert count == attempts
            inf = value(during, "herald_handler_duration_seconds_bucket", consumer=name, le="+Inf")
            assert inf == attempts

        # The daemon is stopped; more events come and are ordered: the lag is read
        # from the database at scrape time, whoever runs the consumers.
        append_ticks(pg_engine, 5, start=EVENTS)
        with pg_engine.connect() as conn:
            while Sequencer().cycle(conn):
                pass
        after = scrape(metrics)
        assert value(after, "herald_log_head_seq") == EVENTS + 5
        for name in NAMES:
            assert value(after, "herald_consumer_lag", consumer=name) == 5
            assert value(after, "herald_consumer_offset", consumer=name) == EVENTS
    finally:
        metrics.close()


@pytest.mark.sqlite
def test_sqlite_has_no_pending_events(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    metrics = PrometheusMetrics(engine, ["quiet"])
    try:
        metrics.serve(0)
        append_ticks(engine, 3)
        with Daemon(engine, [Consumer("quiet", ["acme.*"], quiet)], metrics=metrics):
            wait_for(engine, "quiet", 3, timeout=30)
        samples = scrape(metrics)
        assert value(samples, "herald_up") == 1
        assert value(samples, "herald_log_head_seq") == 3
        assert value(samples, "herald_sequencer_pending_events") == 0
        assert value(samples, "herald_consumer_lag", consumer="quiet") == 0
        assert value(samples, "herald_deliveries_total", consumer="quiet", outcome="delivered") == 3
    finally:
        metrics.close()
        engine.dispose()


def test_scrape_answers_when_the_database_does_not(free_port: int) -> None:
    engine = create_engine(f"postgresql://postgres@127.0.0.1:{free_port}/herald")
    metrics = PrometheusMetrics(engine, ["quiet"], Sequencer())
    try:
        metrics.serve(0)
        metrics.attempt("quiet", "delivered", 0.003)
        metrics.committed("quiet", 41)
        samples = scrape(metrics)
        assert value(samples, "herald_up") == 0
        # What this process knows is exported; what the database would say is left out.
        assert value(samples, "herald_deliveries_total", consumer="quiet", outcome="delivered") == 1
        assert value(samples, "herald_handler_duration_seconds_count", consumer="quiet") == 1
        assert value(samples, "herald_consumer_offset", consumer="quiet") == 41
        assert value(samples, "herald_sequencer_cycles_total") == 0
        assert not names(samples) & {
            "herald_consumer_lag",
            "herald_log_head_seq",
            "herald_sequencer_pending_events",
        }
    finally:
        metrics.close()
        engine.dispose()


def test_a_taken_port_is_a_usage_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'unused.db'}")
    metrics = PrometheusMetrics(engine, ["quiet"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(UsageError) as caught:
            metrics.serve(port)
    assert str(caught.value) == f"--metrics-port {port}: address already in use"
    assert metrics.port is None
    metrics.close()  # nothing to stop: a no-op
    engine.dispose()


def test_close_stops_the_server() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/herald")  # never connected
    metrics = PrometheusMetrics(engine, [])
    metrics.serve(0)
    port = metrics.port
    assert port is not None
    metrics.close()
    metrics.close()
    with pytest.raises(OSError):  # connection refused: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    engine.dispose()
