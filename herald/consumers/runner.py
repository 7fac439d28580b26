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
one transaction commits the records of the longest finished prefix of a page
and the offset at its end (every ``commit_interval``, and when the page is
done). Commits run in order on a thread of their own while the next page is
delivered, so the database writes while the handler is called; a page is
half a batch, and a page is delivered only once every page before the
previous one is committed. A kill therefore repeats at most ``batch_size``
events (the uncommitted pages), which the next owner delivers again: the
at-least-once duplicates.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from tenacity import RetryCallState, Retrying, wait_exponential, wait_random

from herald.consumers import store
from herald.consumers.model import Consumer, Delivered, DeliveryFailed, Outcome, build_key
from herald.consumers.store import ParkedRow, Record
from herald.errors import LostClaim, TransientDatabaseError
from herald.outbox import LogEntry, Page, read_page
from herald.schema.dberrors import translated

__all__ = ["Metrics", "NullMetrics", "Runner", "deliver_batch"]

log = logging.getLogger("herald.consumers")

_SEQ = attrgetter("seq")
_monotonic = time.monotonic
_now = datetime.now

#: How many threads of timed-out handler calls a consumer may leave running;
#: past that it waits for one to return instead of starting more.
MAX_ABANDONED = 8

#: Commits a runner lets queue up before it reads again (the window bounds
#: what is delivered; this bounds the memory of records waiting for the disk).
MAX_PENDING = 4


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


class _Item:
    """One event being delivered to the consumer, with its attempts so far."""

    # A plain class with slots: a batch makes one per event.
    __slots__ = (
        "attempts", "earlier", "entry", "final", "key", "not_before", "parked", "records", "rule",
        "seq",
    )  # fmt: skip

    def __init__(
        self,
        entry: LogEntry,
        key: str | None,
        rule: Literal["at_least_once", "ephemeral"],
        attempts: int = 0,
        earlier: int = 0,
    ) -> None:
        self.entry = entry
        self.seq: int = entry.seq
        self.key = key
        self.rule = rule
        self.attempts = attempts
        #: attempts made before this delivery began (a redelivery gets a fresh budget)
        self.earlier = earlier
        self.not_before = 0.0
        self.records: list[Record] = []
        self.parked: ParkedRow | None = None
        self.final: Outcome | None = None


def _items(consumer: Consumer, entries: Sequence[LogEntry]) -> list[_Item]:
    """An item per entry, with its build key and the consumer's rule for it."""
    fixed = consumer.delivery
    items: list[_Item] = []
    append = items.append
    for entry in entries:
        if fixed == "auto":
            rule: Literal["at_least_once", "ephemeral"] = (
                "ephemeral" if entry.delivery == "ephemeral" else "at_least_once"
            )
        else:
            rule = fixed
        append(_Item(entry, build_key(entry), rule))
    return items


class _Call:
    """One handler call: handed out by :meth:`_Batch.next`, its result handed back to it."""

    __slots__ = (
        "detail", "error", "item", "number", "retry", "seconds", "started", "started_at",
        "status", "worker",
    )  # fmt: skip

    def __init__(
        self, number: int, item: _Item, started: float, started_at: datetime, worker: Any
    ) -> None:
        self.number = number
        self.item = item
        self.started = started
        self.started_at = started_at
        self.worker = worker
        self.error: str | None = None
        self.retry = True
        self.status: int | None = None
        self.detail: dict[str, Any] | None = None
        self.seconds = 0.0

    def call(self, handler: Callable[[LogEntry], Delivered | None]) -> None:
        """Call ``handler``; note how it went (a handler's failure is recorded, never fatal)."""
        try:
            result = handler(self.item.entry)
            if isinstance(result, Delivered):
                self.status = result.http_status
                self.detail = _storable_detail(result.detail)
        except DeliveryFailed as exc:
            self.error, self.retry = _storable_text(str(exc) or type(exc).__name__), exc.retry
            self.status = exc.http_status
            self.detail = _storable_detail(exc.detail)
        except Exception as exc:  # noqa: BLE001 - recorded, and the consumer goes on
            self.error = _storable_text(f"{type(exc).__name__}: {exc}")
        self.seconds = _monotonic() - self.started


def _storable_text(text: str) -> str:
    """A handler's error message as a record can hold it: PostgreSQL's text has no NUL."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _storable_detail(detail: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A handler's detail as a record can hold it: JSON, whatever the handler gave.

    A value JSON has no type for is stored as its ``str`` (a datetime, a
    UUID), a NUL character as U+FFFD (jsonb refuses it); a detail that cannot
    be JSON at all (NaN, a cycle, keys that are not strings) is stored as its
    ``repr`` with the reason. A record is written whatever the handler
    returned: a detail that failed the commit would stop the consumer.
    """
    if detail is None:
        return None
    try:
        text = json.dumps(dict(detail), default=str, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return {"unstorable": f"{type(exc).__name__}: {exc}", "repr": _no_nul(repr(detail)[:4000])}
    value: dict[str, Any] = json.loads(text)
    return _no_nul(value) if "\\u0000" in text else value


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        return _storable_text(value)
    if isinstance(value, dict):
        return {_storable_text(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


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
        self.items = sorted(items, key=_SEQ)
        self.blocked = blocked
        self.kind = kind
        self.metrics = metrics
        # One lock, two conditions: workers wait on `cond` for an event to deliver, the
        # runner waits on `watch` for the batch's end or a deadline. A settled event
        # wakes a worker at most, never the runner: waking the runner for every event
        # cost a thread switch per event, most of a no-op consumer's time.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.watch = threading.Condition(self.lock)
        #: when the runner looks again by itself (monotonic); an earlier deadline wakes it
        self.watch_until = 0.0
        #: heaps of (seq, item) and (when, seq, item): seqs are unique in a batch
        self.ready: list[tuple[int, _Item]] = []
        self.delayed: list[tuple[float, int, _Item]] = []
        #: the keys (builds) with an event out: its followers, in seq order (None: none)
        self.waiting: dict[str, deque[_Item] | None] = {}
        #: the calls in flight, by number
        self.calls = 0
        self.in_flight: dict[int, _Call] = {}
        self.timeout = consumer.timeout
        #: items handed to a worker and not yet settled
        self.busy = 0
        self.stopping = False
        # None unless someone listens: a call per attempt otherwise.
        self._attempt = None if isinstance(metrics, NullMetrics) else metrics.attempt
        waiting, ready = self.waiting, self.ready
        remaining = 0
        for item in self.items:
            if item.final is not None:
                # Finished by an earlier run (recorded beyond its offset at a clean stop).
                continue
            remaining += 1
            key = item.key
            if key is not None:
                if key in waiting:
                    queue = waiting[key]
                    if queue is None:
                        waiting[key] = deque((item,))
                    else:
                        queue.append(item)
                    continue
                waiting[key] = None
            # In seq order: the list is a heap as it is.
            ready.append((item.seq, item))
        self.remaining = remaining
        self._retrying = Retrying()
        self.backoff = wait_exponential(multiplier=consumer.retry_initial, max=consumer.retry_max)

    # -- workers ---------------------------------------------------------------------

    def next(self, worker: Any, done: _Call | None = None) -> _Call | None:
        """Settle ``done`` (the worker's last call) and hand out the next event to call.

        One lock hold per event: settling one call and starting the next are the
        same step. Lowest seq first; an event held behind its build's parked one,
        or an ephemeral one past the staleness limit, is settled here without a
        call. None when the batch is over, or when the runner abandoned ``done``
        (it passed its deadline: the runner settled it, and ``worker`` is replaced).
        """
        with self.lock:
            if done is not None and not self._finish(done):
                return None
            consumer = self.consumer
            while True:
                if self.stopping or not self.remaining:
                    return None
                if self.delayed:
                    self._wake_delayed()
                if not self.ready:
                    timeout = None
                    if self.delayed:
                        timeout = max(0.0, self.delayed[0][0] - _monotonic())
                    self.cond.wait(timeout)
                    continue
                item = heapq.heappop(self.ready)[1]
                if self.blocked and item.key is not None:
                    head = self.blocked.get(item.key)
                    if head is not None and head < item.seq:
                        self._held(item, head)
                        continue
                started_at = _now(UTC)
                if item.rule == "ephemeral" and self.kind != "replay":
                    age = (started_at - item.entry.recorded_at).total_seconds()
                    if age > consumer.staleness:
                        self._record(
                            item, "expired", started_at, 0.0,
                            f"not delivered: {age:.0f} s old, the staleness limit is "
                            f"{consumer.staleness:g} s",
                        )  # fmt: skip
                        self._done(item, "expired")
                        continue
                self.calls += 1
                call = _Call(self.calls, item, _monotonic(), started_at, worker)
                self.in_flight[call.number] = call
                self.busy += 1
                if call.started + self.timeout < self.watch_until:
                    self.watch.notify()
                return call

    def _finish(self, done: _Call) -> bool:
        """Settle a call that returned; False if the runner abandoned it meanwhile."""
        if self.in_flight.pop(done.number, None) is None:
            return False
        self.busy -= 1
        if self.stopping and not self.busy:
            self.watch.notify_all()  # a stopping runner waits for the last call
        self._settle(
            done.item, done.started_at, done.seconds, done.error, done.retry, done.status,
            done.detail,
        )  # fmt: skip
        return True

    def _wake_delayed(self) -> None:
        current = _monotonic()
        while self.delayed and self.delayed[0][0] <= current:
            _, _, item = heapq.heappop(self.delayed)
            heapq.heappush(self.ready, (item.seq, item))

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
                item.seq,
                item.attempts if attempt is None else attempt,
                outcome,
                started_at,
                seconds * 1000.0,
                error[:4000] if error else None,
                status,
                detail,
                self.kind,
            )
        )
        if self._attempt is not None:
            self._attempt(self.consumer.name, outcome, seconds)

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
            heapq.heappush(self.delayed, (item.not_before, item.seq, item))
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
                heapq.heappush(self.ready, (follower.seq, follower))
                self.cond.notify()
            else:
                self.waiting.pop(item.key, None)
        if not self.remaining:
            self.cond.notify_all()
            self.watch.notify_all()

    # -- the runner's side -------------------------------------------------------------

    def overdue(self) -> list[_Call]:
        """Abandon the calls past their deadline; each counts as a failed attempt."""
        current = _monotonic()
        late = [call for call in self.in_flight.values() if call.started + self.timeout <= current]
        for call in late:
            if call.worker is not None:
                # The worker thread stays in the handler; it is replaced now.
                call.worker.abandoned = True
            self.busy -= 1
            del self.in_flight[call.number]
            self._settle(
                call.item, call.started_at, current - call.started,
                f"timed out after {self.consumer.timeout:g} s", True, None, None,
            )  # fmt: skip
        return late

    def next_deadline(self) -> float | None:
        started = min((call.started for call in self.in_flight.values()), default=None)
        return None if started is None else started + self.timeout


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
            handler = runner.consumer.handler
            call = batch.next(self)
            while call is not None:
                call.call(handler)
                call = batch.next(self, call)
            if self.abandoned:
                return


class _Commits:
    """A runner's commits, made in order on a thread of their own.

    A page's records and offset are written while the next page is delivered:
    the database works while the handler is called, instead of the handler
    waiting for the database. Jobs run in the order they were handed in; the
    first failure drops the rest (their events are delivered again after the
    runner reloads its offset) and is raised to the runner by :meth:`wait`.
    """

    def __init__(self, name: str, on_error: Callable[[], None]) -> None:
        self._name = name
        #: called (on this thread) when a job fails: the runner stops its page at once
        self._on_error = on_error
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._running = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs handed in before it (dropped after a failure)."""
        with self._cond:
            if self._error is not None:
                return
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=f"herald-{self._name}-commits", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait(self, until: Callable[[], bool] | None = None, pending: int = 0) -> None:
        """Wait until at most ``pending`` jobs are left (or ``until()`` holds, checked
        after each job); raise the first failure, once."""
        with self._cond:
            while (
                self._error is None
                and len(self._jobs) + self._running > pending
                and not (until is not None and until())
            ):
                self._cond.wait()
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def settle(self) -> None:
        """Wait for every job; forget a failure (the caller reads the database anew)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - the offset is read again right after
            log.debug("consumer %s: a commit failed before a reload: %s", self._name, exc)

    def close(self) -> None:
        """Finish the jobs handed in, and end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running = True
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - raised to the runner by wait()
                with self._cond:
                    self._error = exc
                    self._jobs.clear()
                self._on_error()
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()


def reading(engine: sa.Engine) -> AbstractContextManager[sa.Connection]:
    """A connection for a consumer's reads: without a transaction of its own.

    Each read is one statement with its own snapshot, as it would be in a
    READ COMMITTED transaction; without one, a look costs no BEGIN and no
    ROLLBACK (two round trips a page, each waiting for a server that is
    busy writing the previous page's records).
    """
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


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
        #: the last seq committed as finished (written by the commits' thread)
        self.offset = 0
        #: where the next page starts: the offset, plus what is handed to the commits
        self.position = 0
        #: events one read takes: half a batch, so that two pages in flight (one
        #: delivered, one being committed) are at most a batch
        self.page_size = max(1, consumer.batch_size // 2)
        #: the start of the page delivered last: the next page waits for its commit
        self._previous_start = 0
        #: a commit found the consumer reset (the offset is the operator's now)
        self._stale = False
        self._commits = _Commits(consumer.name, self._abort)
        #: commits handed in and not yet taken by the commits thread: (offset, items,
        #: parked); one job takes all of them
        self._to_commit: list[tuple[int, Sequence[_Item], Sequence[ParkedRow]]] = []
        self._to_commit_lock = threading.Lock()
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
        #: where the next page starts, the consumer's row and that page, read while the
        #: page before it was delivered (a step taken then would have read the same)
        self._prefetched: tuple[int, store.ConsumerRow | None, Page] | None = None
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
                batch.watch.notify_all()
        with self._batch_changed:
            self._batch_changed.notify_all()

    def _abort(self) -> None:
        """A commit failed: no more events of the page in flight are started (a build's
        next event must not go out before its earlier one is delivered again)."""
        batch = self._batch
        if batch is not None:
            with batch.cond:
                batch.stopping = True
                batch.cond.notify_all()
                batch.watch.notify_all()

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
            try:
                self._loop()
                self._drain()
            finally:
                self._commits.close()
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

    def _drain(self) -> None:
        """Stopped: what was delivered is committed before the claim is given up."""
        try:
            with translated():
                self._commits.wait()
        except TransientDatabaseError as exc:
            # The session is gone (the daemon stops its consumers to reconnect): the
            # uncommitted events are delivered again by whoever claims the consumer.
            log.warning("consumer %s: the last commit failed: %s", self.consumer.name, exc)

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
        self._prefetched = None
        self._commits.settle()
        with self._to_commit_lock:
            # Handed in after a commit failed (the commits thread drops the rest):
            # delivered again from the offset read below.
            self._to_commit = []
        with self.engine.connect() as conn:
            row = store.consumer_row(conn, self.consumer.name)
            if row is None or row.owner != self.token:
                raise LostClaim(self.consumer.name)
            self.offset = self.position = self._previous_start = row.offset
            self._stale = False
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
        """Deliver one page; True if the log had nothing more (wait for a wake-up)."""
        consumer = self.consumer
        self._commits.wait(pending=MAX_PENDING)  # raises what a commit met
        look = self._prefetched
        self._prefetched = None
        if look is None or look[0] != self.position:
            with reading(self.engine) as conn:
                look = (self.position, *self._look(conn, self.position))
        _, row, page = look
        if row is None or row.owner != self.token:
            raise LostClaim(consumer.name)
        if row.epoch != self.epoch:
            log.warning(
                "consumer %s was reset: offset %d -> %d", consumer.name, self.offset, row.offset
            )
            self._load()
            return False
        requests = None
        if row.control != self.control:
            # An operator's request: the parked events as the database has them, once
            # the commits in flight (which may park more) have landed.
            self._commits.wait()
            with self.engine.connect() as conn:
                self.blocked = store.parked_heads(conn, consumer.name)
                requests = store.redeliver_requests(conn, consumer.name)
                self.control = row.control
                page = read_page(conn, self.position, self.page_size, consumer.topic_filter)
                conn.rollback()
        if requests:
            self._redeliver(requests)
        if page.entries:
            self._deliver_page(page.entries, page.next_after)
        elif page.next_after > self.position:
            # Only other consumers' topics since the offset: move past them.
            self._submit(page.next_after, [], [])
        return page.at_head

    def _look(self, conn: sa.Connection, position: int) -> tuple[store.ConsumerRow | None, Page]:
        """The consumer's row (claim, epoch, requests) and the page after ``position``."""
        row, top = store.look(conn, self.consumer.name)
        page = read_page(conn, position, self.page_size, self.consumer.topic_filter, top=top)
        return row, page

    def _items(self, entries: Sequence[LogEntry]) -> list[_Item]:
        items = _items(self.consumer, entries)
        if not (self.parked_ahead or self.ahead):
            return items
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

    def _run(
        self,
        batch: _Batch,
        on_progress: Callable[[_Batch], None] | None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """Hand ``batch`` to the workers; watch deadlines; commit progress as it comes.

        ``on_start`` runs in this thread once the workers have the batch (the
        next page is read meanwhile); ``on_progress`` every ``commit_interval``.
        """
        with self._batch_changed:
            self._batch = batch
            self._batch_changed.notify_all()
        last_commit = time.monotonic()
        try:
            if on_start is not None:
                on_start()
            with batch.cond:
                while batch.remaining and not (batch.stopping and not batch.busy):
                    if self.stop_requested.is_set() and not batch.stopping:
                        batch.stopping = True
                        batch.cond.notify_all()
                    current = time.monotonic()
                    until = current + self.commit_interval
                    deadline = batch.next_deadline()
                    if deadline is not None:
                        until = min(until, deadline)
                    batch.watch_until = until
                    batch.watch.wait(max(0.001, until - current))
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
                    batch.watch.wait(max(0.001, min(wait, 0.5)))
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
        start, previous = self.position, self._previous_start
        # The window: this page is delivered once everything before the previous
        # page is committed, so at most two pages (a batch) are uncommitted.
        self._commits.wait(until=lambda: self.offset >= previous or self._stale)
        if self._stale:
            return  # reset meanwhile: the next step reads the operator's offset
        self._previous_start = start
        items = self._items(entries)
        batch = _Batch(self.consumer, items, self.blocked, "live", self.metrics)
        committed = 0  # how many items (a prefix) are handed to the commits

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
            self._submit(offset, prefix, [i.parked for i in prefix if i.parked is not None])
            committed = done

        prefetch = None
        if len(entries) == self.page_size:
            # A full page: more is waiting. Read it while this one is delivered (the
            # database works while the handler is called); the next step takes it if
            # this page ends where it begins.
            def prefetch() -> None:
                self._prefetch(next_after)

        self._run(batch, progress, prefetch)
        progress(batch)
        if committed == len(batch.items) and self.position < next_after:
            self._submit(next_after, [], [])
        rest = [item for item in batch.items[committed:] if item.records]
        if rest:
            # A stop came before the page was done: the offset stays before the first
            # unfinished event, but what happened after it is kept (every attempt's
            # record, and the parked events), so the next run does not deliver the
            # finished ones again.
            self._submit(self.position, rest, [i.parked for i in rest if i.parked is not None])

    def _prefetch(self, after: int) -> None:
        """Look at the consumer's row and the page after ``after``, for the next step."""
        self._prefetched = None
        try:
            with reading(self.engine) as conn, translated():
                row, page = self._look(conn, after)
        except TransientDatabaseError as exc:
            # Only a head start: the next step reads it again (and meets the error, if
            # it lasts, where errors are handled).
            log.debug("consumer %s: reading ahead failed: %s", self.consumer.name, exc)
            return
        self._prefetched = (after, row, page)

    def _submit(self, offset: int, items: Sequence[_Item], parked: Sequence[ParkedRow]) -> None:
        """Hand a commit to the commits' thread; reading goes on from ``offset``.

        Commits that queue up while one is being made go together in the next
        transaction (one fence to the newest offset, every record): when the
        database falls behind, it gets fewer, bigger commits instead of a
        growing queue of small ones.
        """
        self.position = offset
        with self._to_commit_lock:
            self._to_commit.append((offset, items, parked))
            if len(self._to_commit) > 1:
                return  # the commit already handed in takes this one too
        self._commits.submit(self._commit_queued)

    def _commit_queued(self) -> None:
        with self._to_commit_lock:
            queued, self._to_commit = self._to_commit, []
        if queued:
            self._commit(
                queued[-1][0],
                [item for _, items, _ in queued for item in items],
                [row for _, _, parked in queued for row in parked],
            )

    def _commit(self, offset: int, items: Sequence[_Item], parked: Sequence[ParkedRow]) -> None:
        # On the commits' thread, in order: self.offset is the last one committed.
        records = [record for item in items for record in item.records]
        with translated(), self.engine.connect() as conn:
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
        else:
            # An operator reset the consumer: the pages in flight are recorded all the
            # same, and the next step reads the new offset.
            self._stale = True

    def _redeliver(self, requests: Sequence[tuple[ParkedRow, LogEntry]]) -> None:
        """Deliver the parked events an operator asked for, in seq order per build
        (the live commits have landed: the caller waited for them)."""
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
