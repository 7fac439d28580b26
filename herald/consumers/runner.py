"""Running one consumer: read a batch after the offset, deliver it, commit records and offset.

One :class:`Runner` thread per consumer a daemon has claimed, plus
``concurrency`` worker threads that call the handler. The delivery rules:

* **at_least_once**: a failed attempt is retried with exponential backoff
  (tenacity's ``wait_exponential``, from ``retry_initial`` up to
  ``retry_max``) until ``max_attempts``; then the event is *parked* for this
  consumer with its last error, and the consumer goes on. An answer that says
  retrying cannot help (``DeliveryFailed(retry=False)``, a webhook's 4xx)
  parks at once.
* **ephemeral**: one attempt; a failure is recorded, not retried. An event
  whose ``recorded_at`` is older than ``staleness`` when the consumer reaches
  it is recorded as expired and not delivered.
* **order**: events with the same key (:func:`~herald.consumers.model.build_key`:
  one build) are delivered one at a time, in seq order, whatever the
  concurrency; events of different builds go in parallel. While one build's
  event waits for a retry, other builds' events flow. Once a build has an
  event parked for a consumer, that consumer's later events of the same build
  are parked too ("held", no handler call) until the first is redelivered or
  discarded: delivering them would apply a build's events out of order (a
  GitHub status set to "success" by ``build_finished``, then back to
  "pending" by a redelivered ``build_started``).
* **timeouts**: every handler call has a deadline. A call past it counts as a
  failed attempt ("timed out"), its worker thread is abandoned (Python cannot
  kill a thread; its late result is ignored) and a fresh worker takes its
  place, so a hung handler delays only its own build's events.

Records and offset: each attempt becomes a :class:`~herald.consumers.store.Record`;
the runner commits, in one transaction, the records of the longest finished
prefix of the batch and the offset at its end (every ``commit_interval`` and
when the batch is done). A kill loses at most the uncommitted part of one
batch, which the next owner delivers again: the at-least-once duplicates.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from tenacity import RetryCallState, Retrying, wait_exponential, wait_random

from herald.consumers import store
from herald.consumers.model import Consumer, Delivered, DeliveryFailed, Outcome, build_key
from herald.consumers.store import ParkedRow, Record
from herald.errors import LostClaim, TransientDatabaseError
from herald.outbox import LogEntry, read_page
from herald.schema.dberrors import translated

__all__ = ["Metrics", "NullMetrics", "Runner", "deliver_batch"]

log = logging.getLogger("herald.consumers")

#: How many threads of timed-out handler calls a consumer may leave running;
#: past that it waits for one to return instead of starting more.
MAX_ABANDONED = 8


class Metrics(Protocol):
    """Where a runner reports what it does (Prometheus, or nothing)."""

    def attempt(self, consumer: str, outcome: Outcome, seconds: float) -> None:
        """One delivery attempt ended with ``outcome`` after ``seconds``."""

    def committed(self, consumer: str, offset: int) -> None:
        """The consumer's offset is now ``offset``."""


class NullMetrics:
    """Reports nothing."""

    def attempt(self, consumer: str, outcome: Outcome, seconds: float) -> None:
        pass

    def committed(self, consumer: str, offset: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Item:
    """One event being delivered to the consumer, with its attempts so far."""

    entry: LogEntry
    key: str | None
    rule: Literal["at_least_once", "ephemeral"]
    attempts: int = 0
    #: attempts made before this delivery began (a redelivery gets a fresh budget)
    earlier: int = 0
    not_before: float = 0.0
    records: list[Record] = field(default_factory=list)
    parked: ParkedRow | None = None
    final: Outcome | None = None

    @property
    def seq(self) -> int:
        return self.entry.seq


@dataclass(eq=False, slots=True)
class _Call:
    item: _Item
    started: float
    deadline: float
    started_at: Any
    worker: Any = None
    abandoned: bool = False


class _Batch:
    """The scheduler of one batch: which event may be delivered next, by whom."""

    def __init__(
        self,
        consumer: Consumer,
        items: Sequence[_Item],
        blocked: dict[str, int],
        kind: str,
        metrics: Metrics,
    ) -> None:
        self.consumer = consumer
        self.items = sorted(items, key=lambda i: i.seq)
        self.blocked = blocked
        self.kind = kind
        self.metrics = metrics
        self.cond = threading.Condition()
        self.ready: list[tuple[int, int, _Item]] = []
        self.delayed: list[tuple[float, int, _Item]] = []
        self.waiting: dict[str, deque[_Item]] = {}
        self.in_flight: set[_Call] = set()
        # Items finished by an earlier run (recorded beyond its offset at a clean stop).
        self.remaining = sum(1 for item in self.items if item.final is None)
        #: items handed to a worker and not yet settled
        self.busy = 0
        self.stopping = False
        for item in self.items:
            if item.final is not None:
                continue
            if item.key is not None and item.key in self.waiting:
                self.waiting[item.key].append(item)
                continue
            if item.key is not None:
                self.waiting[item.key] = deque()
            heapq.heappush(self.ready, (item.seq, id(item), item))
        self._retrying = Retrying()
        self.backoff = wait_exponential(multiplier=consumer.retry_initial, max=consumer.retry_max)

    # -- workers ---------------------------------------------------------------------

    def take(self) -> _Item | None:
        """The next event to deliver (lowest seq first); None when the batch is over."""
        with self.cond:
            while True:
                if self.stopping or self.remaining == 0:
                    return None
                self._wake_delayed()
                if self.ready:
                    self.busy += 1
                    return heapq.heappop(self.ready)[2]
                timeout = None
                if self.delayed:
                    timeout = max(0.0, self.delayed[0][0] - time.monotonic())
                self.cond.wait(timeout)

    def _wake_delayed(self) -> None:
        current = time.monotonic()
        while self.delayed and self.delayed[0][0] <= current:
            _, _, item = heapq.heappop(self.delayed)
            heapq.heappush(self.ready, (item.seq, id(item), item))

    def deliver(
        self,
        item: _Item,
        handler: Callable[[LogEntry], Delivered | None],
        worker: Any = None,
    ) -> bool:
        """Make one attempt at ``item``; False if this worker was abandoned meanwhile."""
        consumer = self.consumer
        head = self.blocked.get(item.key) if item.key is not None else None
        if head is not None and head < item.seq:
            with self.cond:
                self.busy -= 1
                self._held(item, head)
            return True
        started_at = store.now()
        if item.rule == "ephemeral" and self.kind != "replay":
            age = (started_at - item.entry.recorded_at).total_seconds()
            if age > consumer.staleness:
                with self.cond:
                    self.busy -= 1
                    self._record(
                        item, "expired", started_at, 0.0,
                        f"not delivered: {age:.0f} s old, the staleness limit is "
                        f"{consumer.staleness:g} s",
                    )  # fmt: skip
                    self._done(item, "expired")
                return True
        started = time.monotonic()
        call = _Call(item, started, started + consumer.timeout, started_at, worker)
        with self.cond:
            self.in_flight.add(call)
        error: str | None = None
        retry = True
        status: int | None = None
        detail: dict[str, Any] | None = None
        try:
            result = handler(item.entry)
            if isinstance(result, Delivered):
                status = result.http_status
                detail = dict(result.detail) if result.detail is not None else None
        except DeliveryFailed as exc:
            error, retry, status = str(exc) or type(exc).__name__, exc.retry, exc.http_status
            detail = dict(exc.detail) if exc.detail is not None else None
        except Exception as exc:  # noqa: BLE001 - a handler's failure is recorded, never fatal
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
        with self.cond:
            if call.abandoned:
                return False
            self.busy -= 1
            self.in_flight.discard(call)
            self._settle(item, started_at, seconds, error, retry, status, detail)
        return True

    # -- settling (with the condition held) --------------------------------------------

    def _record(
        self,
        item: _Item,
        outcome: Outcome,
        started_at: Any,
        seconds: float,
        error: str | None,
        status: int | None = None,
        detail: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> None:
        item.records.append(
            Record(
                seq=item.seq,
                attempt=item.attempts if attempt is None else attempt,
                outcome=outcome,
                started_at=started_at,
                duration_ms=round(seconds * 1000.0, 3),
                error=error[:4000] if error else None,
                http_status=status,
                detail=detail,
                kind=self.kind,
            )
        )
        self.metrics.attempt(self.consumer.name, outcome, seconds)

    def _settle(
        self,
        item: _Item,
        started_at: Any,
        seconds: float,
        error: str | None,
        retry: bool,
        status: int | None,
        detail: dict[str, Any] | None,
    ) -> None:
        item.attempts += 1
        if error is None:
            self._record(item, "delivered", started_at, seconds, None, status, detail)
            self._done(item, "delivered")
        elif item.rule == "ephemeral":
            self._record(item, "failed", started_at, seconds, error, status, detail)
            self._done(item, "failed")
        elif (
            retry
            and item.attempts - item.earlier < self.consumer.max_attempts
            and not self.stopping
        ):
            self._record(item, "failed", started_at, seconds, error, status, detail)
            state = RetryCallState(self._retrying, None, (), {})
            state.attempt_number = item.attempts
            item.not_before = time.monotonic() + self.backoff(state)
            heapq.heappush(self.delayed, (item.not_before, id(item), item))
            self.cond.notify_all()
        elif retry and self.stopping:
            # Stopping: the event stays unfinished (not parked); the next run retries it.
            self._record(item, "failed", started_at, seconds, error, status, detail)
        elif self.kind == "replay":
            # A replay parks nothing: its failures are recorded, the live run is untouched.
            self._record(item, "failed", started_at, seconds, error, status, detail)
            self._done(item, "failed")
        else:
            self._record(item, "parked", started_at, seconds, error, status, detail)
            item.parked = ParkedRow(item.seq, item.key, None, item.attempts, error)
            if item.key is not None:
                self.blocked.setdefault(item.key, item.seq)
            self._done(item, "parked")

    def _held(self, item: _Item, head: int) -> None:
        error = f"held: seq {head} of the same build ({item.key}) is parked for this consumer"
        self._record(item, "parked", store.now(), 0.0, error, attempt=item.attempts)
        item.parked = ParkedRow(item.seq, item.key, head, item.attempts, error)
        self._done(item, "parked")

    def _done(self, item: _Item, outcome: Outcome) -> None:
        item.final = outcome
        self.remaining -= 1
        if item.key is not None:
            queue = self.waiting.get(item.key)
            if queue:
                follower = queue.popleft()
                heapq.heappush(self.ready, (follower.seq, id(follower), follower))
            else:
                self.waiting.pop(item.key, None)
        self.cond.notify_all()

    # -- the runner's side -------------------------------------------------------------

    def overdue(self) -> list[_Call]:
        """Abandon the calls past their deadline; each counts as a failed attempt."""
        current = time.monotonic()
        late = [call for call in self.in_flight if call.deadline <= current]
        for call in late:
            call.abandoned = True
            if call.worker is not None:
                # The worker thread stays in the handler; it is replaced now.
                call.worker.abandoned = True
            self.busy -= 1
            self.in_flight.discard(call)
            self._settle(
                call.item, call.started_at, current - call.started,
                f"timed out after {self.consumer.timeout:g} s", True, None, None,
            )  # fmt: skip
        return late

    def next_deadline(self) -> float | None:
        return min((call.deadline for call in self.in_flight), default=None)


class _Worker(threading.Thread):
    """Calls the handler for whatever the current batch hands out."""

    def __init__(self, runner: Runner, number: int) -> None:
        super().__init__(name=f"herald-{runner.consumer.name}-{number}", daemon=True)
        self.runner = runner
        self.abandoned = False

    def run(self) -> None:
        runner = self.runner
        while True:
            batch = runner.wait_for_batch(self)
            if batch is None:
                return
            while (item := batch.take()) is not None:
                if not batch.deliver(item, runner.consumer.handler, self):
                    self.abandoned = True
                    return


class Runner(threading.Thread):
    """Runs one consumer for a daemon that holds its claim, until stopped or the claim is lost."""

    def __init__(
        self,
        consumer: Consumer,
        engine: sa.Engine,
        token: str,
        *,
        wake: threading.Event,
        poll_interval: float = 1.0,
        commit_interval: float = 0.5,
        metrics: Metrics | None = None,
        on_exit: Callable[[Runner, BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(name=f"herald-consumer-{consumer.name}", daemon=True)
        self.consumer = consumer
        self.engine = engine
        self.token = token
        self.wake = wake
        self.poll_interval = poll_interval
        self.commit_interval = commit_interval
        self.metrics: Metrics = metrics or NullMetrics()
        self.on_exit = on_exit
        self.stop_requested = threading.Event()
        self.offset = 0
        #: the consumer's epoch when its offset was read (a reset bumps it)
        self.epoch = 0
        self.control = -1
        self.blocked: dict[str, int] = {}
        #: seqs beyond the offset that are parked already (after a reset moved it back)
        self.parked_ahead: set[int] = set()
        #: events beyond the offset recorded by an earlier run: seq → (attempts, outcomes)
        self.ahead: dict[int, tuple[int, set[str]]] = {}
        self._batch: _Batch | None = None
        self._batch_changed = threading.Condition()
        self._workers: list[_Worker] = []
        self._abandoned: list[_Worker] = []
        self.error: BaseException | None = None

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the calls in flight, commit, and end (returns at once; join to wait)."""
        self.stop_requested.set()
        self.wake.set()
        batch = self._batch
        if batch is not None:
            # Only a nudge: the runner thread itself tells the batch to stop (taking
            # the batch's lock here while holding another would invert their order).
            with batch.cond:
                batch.cond.notify_all()
        with self._batch_changed:
            self._batch_changed.notify_all()

    def wait_for_batch(self, worker: _Worker) -> _Batch | None:
        with self._batch_changed:
            while True:
                if self.stop_requested.is_set() and self._batch is None:
                    return None
                if worker.abandoned or worker not in self._workers:
                    return None
                if self._batch is not None and self._batch.remaining and not self._batch.stopping:
                    return self._batch
                self._batch_changed.wait()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        error: BaseException | None = None
        try:
            self._start_workers()
            self._loop()
        except LostClaim as exc:
            log.warning("%s", exc)
            error = exc
        except BaseException as exc:
            log.exception("consumer %s stopped on an error", self.consumer.name)
            error = exc
        finally:
            self.error = error
            with self._batch_changed:
                self._batch = None
                self.stop_requested.set()
                self._batch_changed.notify_all()
            if self.on_exit is not None:
                self.on_exit(self, error)

    def _start_workers(self) -> None:
        with self._batch_changed:
            while len(self._workers) < self.consumer.concurrency:
                worker = _Worker(self, len(self._workers) + len(self._abandoned))
                self._workers.append(worker)
                worker.start()

    def _loop(self) -> None:
        # Reconnecting: tenacity's exponential backoff with jitter, 50 ms up to 5 s.
        backoff_for = wait_exponential(multiplier=0.05, max=5.0) + wait_random(0, 0.05)
        state = RetryCallState(Retrying(), None, (), {})
        failures = 0
        loaded = False
        while not self.stop_requested.is_set():
            try:
                # translated(): a connection that dies while it is opened, rolled
                # back or returned to the pool is as transient as one that dies in
                # a query.
                with translated():
                    if not loaded:
                        self._load()
                        loaded = True
                    at_head = self._step()
                failures = 0
            except TransientDatabaseError as exc:
                failures += 1
                state.attempt_number = failures
                backoff = backoff_for(state)
                log.warning("consumer %s: %s; retrying in %.2f s", self.consumer.name, exc, backoff)
                self.stop_requested.wait(backoff)
                loaded = False  # the commit may or may not have landed: read the offset again
                continue
            if at_head and not self.stop_requested.is_set():
                self.wake.wait(self.poll_interval)
                self.wake.clear()

    def _load(self) -> None:
        with self.engine.connect() as conn:
            row = store.consumer_row(conn, self.consumer.name)
            if row is None or row.owner != self.token:
                raise LostClaim(self.consumer.name)
            self.offset = row.offset
            self.epoch = row.epoch
            # Not the row's control: requests made while no daemon ran the consumer
            # are read at the first step.
            self.control = -1
            self.blocked = store.parked_heads(conn, self.consumer.name)
            self.parked_ahead = store.parked_seqs_after(conn, self.consumer.name, self.offset)
            self.ahead = store.finished_ahead(
                conn, self.consumer.name, self.offset, row.records_floor
            )
            conn.rollback()
        self.metrics.committed(self.consumer.name, self.offset)

    def _step(self) -> bool:
        """Deliver one batch; True if the log had nothing more (wait for a wake-up)."""
        consumer = self.consumer
        with self.engine.connect() as conn:
            row = store.consumer_row(conn, consumer.name)
            if row is None or row.owner != self.token:
                raise LostClaim(consumer.name)
            if row.epoch != self.epoch:
                conn.rollback()
                log.warning(
                    "consumer %s was reset: offset %d -> %d", consumer.name, self.offset, row.offset
                )
                self._load()
                return False
            requests = None
            if row.control != self.control:
                self.blocked = store.parked_heads(conn, consumer.name)
                requests = store.redeliver_requests(conn, consumer.name)
                self.control = row.control
            page = read_page(conn, self.offset, consumer.batch_size, consumer.topic_filter)
            conn.rollback()
        if requests:
            self._redeliver(requests)
        if page.entries:
            self._deliver_page(page.entries, page.next_after)
        elif page.next_after > self.offset:
            # Only other consumers' topics since the offset: move past them.
            self._commit(page.next_after, [], [])
        return page.at_head

    def _items(self, entries: Sequence[LogEntry]) -> list[_Item]:
        rule = self.consumer.rule
        items = [_Item(entry, build_key(entry), rule(entry)) for entry in entries]
        for item in items:
            if item.seq in self.parked_ahead:
                # Parked before a reset moved the offset back: it stays parked (an
                # operator redelivers or discards it), and is not delivered again.
                self.parked_ahead.discard(item.seq)
                item.final = "parked"
                continue
            done = self.ahead.pop(item.seq, None)
            if done is None:
                continue
            # An earlier run stopped cleanly with this event recorded beyond its
            # offset: finished ones are not delivered again, and attempts go on
            # counting where they were.
            attempts, outcomes = done
            item.attempts = attempts
            final = outcomes & {"delivered", "parked", "expired"}
            if final:
                item.final = sorted(final)[0]  # type: ignore[assignment]
            elif "failed" in outcomes and item.rule == "ephemeral":
                item.final = "failed"
        return items

    def _run(self, batch: _Batch, on_progress: Callable[[_Batch], None] | None) -> None:
        """Hand ``batch`` to the workers; watch deadlines; commit progress as it comes."""
        with self._batch_changed:
            self._batch = batch
            self._batch_changed.notify_all()
        last_commit = time.monotonic()
        try:
            with batch.cond:
                while batch.remaining and not (batch.stopping and not batch.busy):
                    if self.stop_requested.is_set() and not batch.stopping:
                        batch.stopping = True
                        batch.cond.notify_all()
                    waits = [self.commit_interval]
                    deadline = batch.next_deadline()
                    if deadline is not None:
                        waits.append(deadline - time.monotonic())
                    batch.cond.wait(max(0.001, min(waits)))
                    if batch.overdue():
                        self._replace_abandoned()
                    if on_progress and time.monotonic() - last_commit >= self.commit_interval:
                        batch.cond.release()
                        try:
                            on_progress(batch)
                        finally:
                            batch.cond.acquire()
                        last_commit = time.monotonic()
        finally:
            with batch.cond:
                # However this ends (done, stopped, a failed commit), no worker
                # starts another event of this batch, and the calls in flight end
                # (or pass their deadline) before the batch is read again: a build's
                # event is never in two calls at once.
                batch.stopping = True
                batch.cond.notify_all()
                while batch.busy:
                    deadline = batch.next_deadline()
                    wait = 0.05 if deadline is None else deadline - time.monotonic()
                    batch.cond.wait(max(0.001, min(wait, 0.5)))
                    if batch.overdue():
                        self._replace_abandoned()
            with self._batch_changed:
                self._batch = None

    def _replace_abandoned(self) -> None:
        with self._batch_changed:
            for worker in list(self._workers):
                if not worker.is_alive() or worker.abandoned:
                    self._workers.remove(worker)
                    self._abandoned.append(worker)
            self._abandoned = [w for w in self._abandoned if w.is_alive()]
            while (
                len(self._workers) < self.consumer.concurrency
                and len(self._abandoned) < MAX_ABANDONED
            ):
                worker = _Worker(self, len(self._workers) + len(self._abandoned) + 1)
                self._workers.append(worker)
                worker.start()
            if len(self._abandoned) >= MAX_ABANDONED:
                log.error(
                    "consumer %s: %d handler calls are still running past their timeout; "
                    "it delivers with fewer workers until they return",
                    self.consumer.name,
                    len(self._abandoned),
                )

    def _deliver_page(self, entries: Sequence[LogEntry], next_after: int) -> None:
        items = self._items(entries)
        batch = _Batch(self.consumer, items, self.blocked, "live", self.metrics)
        committed = 0  # how many items (a prefix) are committed

        def progress(batch: _Batch) -> None:
            nonlocal committed
            with batch.cond:
                done = committed
                while done < len(batch.items) and batch.items[done].final is not None:
                    done += 1
            if done == committed:
                return
            prefix = batch.items[committed:done]
            offset = next_after if done == len(batch.items) else prefix[-1].seq
            self._commit(offset, prefix, [i.parked for i in prefix if i.parked is not None])
            committed = done

        self._run(batch, progress)
        progress(batch)
        if committed == len(batch.items) and self.offset < next_after:
            self._commit(next_after, [], [])
        rest = [item for item in batch.items[committed:] if item.records]
        if rest:
            # A stop came before the batch was done: the offset stays before the first
            # unfinished event, but what happened after it is kept (every attempt's
            # record, and the parked events), so the next run does not deliver the
            # finished ones again.
            self._commit(self.offset, rest, [i.parked for i in rest if i.parked is not None])

    def _commit(self, offset: int, items: Sequence[_Item], parked: Sequence[ParkedRow]) -> None:
        records = [record for item in items for record in item.records]
        with self.engine.connect() as conn:
            moved = store.commit_batch(
                conn,
                self.consumer.name,
                self.token,
                self.epoch,
                self.offset,
                offset,
                records,
                parked,
            )
        if moved:
            self.offset = offset
            self.metrics.committed(self.consumer.name, offset)
        # Otherwise an operator reset the consumer: the batch in flight is recorded
        # all the same, and the next step reads the new offset.

    def _redeliver(self, requests: Sequence[tuple[ParkedRow, LogEntry]]) -> None:
        """Deliver the parked events an operator asked for, in seq order per build."""
        keys = {row.key for row, _ in requests if row.key is not None}
        for key in keys:
            self.blocked.pop(key, None)
        items = []
        for row, entry in requests:
            item = _Item(
                entry,
                row.key,
                self.consumer.rule(entry),
                attempts=row.attempts,
                earlier=row.attempts,
            )
            items.append(item)
        batch = _Batch(self.consumer, items, self.blocked, "redelivery", self.metrics)
        self._run(batch, None)
        records = [record for item in batch.items for record in item.records]
        finished = [i.seq for i in batch.items if i.final is not None and i.parked is None]
        again = [
            ParkedRow(i.seq, i.key, i.parked.held_by, i.attempts, i.parked.error)
            for i in batch.items
            if i.parked is not None
        ]
        # Unfinished ones (a stop came): left parked, with the request still set.
        with self.engine.connect() as conn:
            store.commit_redelivery(conn, self.consumer.name, self.token, records, finished, again)
            # What is still parked (also events not asked for) keeps holding its build.
            self.blocked = store.parked_heads(conn, self.consumer.name)
            conn.rollback()
        log.info(
            "consumer %s: redelivered %d parked events, %d parked again",
            self.consumer.name,
            len(finished),
            len(again),
        )


def deliver_batch(consumer: Consumer, entries: Sequence[LogEntry]) -> dict[int, list[Record]]:
    """Deliver ``entries`` to ``consumer`` by its rules, without a database (tests, tools).

    Returns every attempt's record by seq.
    """
    runner = Runner(consumer, sa.create_engine("sqlite://"), "local", wake=threading.Event())
    runner._start_workers()
    try:
        batch = _Batch(consumer, runner._items(entries), {}, "live", NullMetrics())
        runner._run(batch, None)
        return {item.seq: item.records for item in batch.items}
    finally:
        runner.stop()
        for worker in runner._workers:
            worker.join(1.0)
