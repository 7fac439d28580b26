"""Reading the log: from any seq, in bounded pages, filtered by topic.

Offsets follow one convention everywhere: a consumer's offset, and the
``after`` argument here, is the **last seq already handled**; reading
"after 0" starts at the first event. (The CLI's ``herald log --from N`` is
inclusive: it prints seq N onwards, i.e. reads after N-1.)

A topic filter holds exact topics and ``*`` patterns (``build_*``,
``acme.*``). With a filter, one page scans at most ``scan_limit`` seqs, so a
rare topic in a huge log costs a bounded read per page (on PostgreSQL, exact
topics are found through the topic index over the window's positions only,
however many events of the topic the rest of the log holds); the page's
``next_after`` says where to go on even when it holds no entry.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, NamedTuple

import psycopg
import sqlalchemy as sa
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from herald.domain import topic_filter_pattern_ok, validate_topic
from herald.errors import InvalidTopic, UnknownAggregate, UsageError
from herald.outbox.sequencer import Sequencer
from herald.outbox.wakeup import Waker
from herald.schema import events, log_order
from herald.schema.dberrors import translated
from herald.schema.queries import QUERIES

__all__ = [
    "MAX_SEQ",
    "EventFilter",
    "LogEntry",
    "LogReader",
    "Page",
    "TopicFilter",
    "after_for",
    "entries_at",
    "first_seq",
    "first_seq_since",
    "head",
    "last_seq_until",
    "read_page",
]


#: the largest seq the log can hold (a signed 64-bit integer)
MAX_SEQ = 2**63 - 1


class LogEntry(NamedTuple):
    """One event at its place in the log.

    A named tuple rather than a dataclass: a consumer reads thousands a
    second, and a tuple is built in C, several times faster than a frozen
    dataclass's ``__init__``.
    """

    seq: int
    position: int
    topic: str
    payload: dict[str, Any]
    delivery: str
    dedupe_key: str | None
    aggregate_id: str | None
    aggregate_version: int | None
    trace_id: str | None
    occurred_at: datetime
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict (times in ISO 8601, UTC)."""
        return {
            "seq": self.seq,
            "position": self.position,
            "topic": self.topic,
            "payload": self.payload,
            "delivery": self.delivery,
            "dedupe_key": self.dedupe_key,
            "aggregate_id": self.aggregate_id,
            "aggregate_version": self.aggregate_version,
            "trace_id": self.trace_id,
            "occurred_at": self.occurred_at.isoformat(),
            "recorded_at": self.recorded_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the log: its entries, and the seq to read after next time."""

    entries: list[LogEntry]
    next_after: int
    #: whether the page reached the newest seq (nothing more to read right now)
    at_head: bool


class TopicFilter:
    """Exact topics and ``*`` patterns; empty means every topic."""

    def __init__(self, topics: Iterable[str] = ()) -> None:
        self.exact: list[str] = []
        self.patterns: list[str] = []
        for topic in topics:
            if "*" in topic:
                if not topic_filter_pattern_ok(topic):
                    raise InvalidTopic(topic, "a pattern is a topic with * wildcards (build_*)")
                self.patterns.append(topic)
            else:
                self.exact.append(validate_topic(topic))

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    @property
    def every(self) -> bool:
        """Whether the filter lets every topic through: empty, or with a ``*`` pattern."""
        return not self or any(set(pattern) == {"*"} for pattern in self.patterns)

    def clause(self) -> sa.ColumnElement[bool]:
        """The SQL condition on ``herald_events.topic``."""
        terms: list[sa.ColumnElement[bool]] = []
        if self.exact:
            terms.append(events.c.topic.in_(self.exact))
        terms.extend(events.c.topic.like(_like(p), escape="\\") for p in self.patterns)
        return sa.or_(*terms)


def _like(pattern: str) -> str:
    """A topic pattern (``build_*``) as a LIKE pattern with ``\\`` as the escape."""
    like = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return like.replace("*", "%")


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Events about one build, evaluation or jobset (``herald log --build/--eval/--jobset``).

    A build's events are those of its aggregate, and events of no aggregate
    whose payload names it (``build_id``); an evaluation's, those of its
    aggregate and those whose payload has its ``eval_id``; a jobset's, those
    of its builds' and evaluations' aggregates and those whose payload has its
    ``jobset_id``. Several given: an event must match each.
    """

    build_id: int | None = None
    eval_id: int | None = None
    jobset_id: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.build_id, self.eval_id, self.jobset_id))

    def clause(self, dialect: str) -> sa.ColumnElement[bool]:
        """The SQL condition on ``herald_events`` for ``dialect`` (payload fields compare
        as text on PostgreSQL, so that a custom event's odd field never fails the query)."""
        from herald.domain import Build  # noqa: PLC0415 - the domain is only needed here
        from herald.schema import builds, evaluations  # noqa: PLC0415

        def names(field: str, value: int) -> sa.ColumnElement[bool]:
            element = events.c.payload[field]
            if dialect == "postgresql":
                matches: sa.ColumnElement[bool] = element.as_string() == str(value)
            else:
                matches = element.as_integer() == value
            return matches

        terms: list[sa.ColumnElement[bool]] = []
        if self.build_id is not None:
            terms.append(
                sa.or_(
                    events.c.aggregate_id == str(Build.id_for(self.build_id)),
                    sa.and_(events.c.aggregate_id.is_(None), names("build_id", self.build_id)),
                )
            )
        if self.eval_id is not None:
            own = sa.select(evaluations.c.aggregate_id).where(evaluations.c.eval_id == self.eval_id)
            terms.append(sa.or_(events.c.aggregate_id.in_(own), names("eval_id", self.eval_id)))
        if self.jobset_id is not None:
            jobset_builds = sa.select(builds.c.aggregate_id).where(
                builds.c.jobset_id == self.jobset_id
            )
            jobset_evals = sa.select(evaluations.c.aggregate_id).where(
                evaluations.c.jobset_id == self.jobset_id
            )
            terms.append(
                sa.or_(
                    events.c.aggregate_id.in_(jobset_builds),
                    events.c.aggregate_id.in_(jobset_evals),
                    names("jobset_id", self.jobset_id),
                )
            )
        return sa.and_(*terms)

    def check(self, conn: sa.Connection) -> None:
        """Raise :class:`UnknownAggregate` for a build, evaluation or jobset the log
        never mentions (a typo gets an error, not an empty answer)."""
        dialect = conn.dialect.name
        for kind, value in (
            ("build", self.build_id),
            ("evaluation", self.eval_id),
            ("jobset", self.jobset_id),
        ):
            if value is None:
                continue
            alone = EventFilter(**{_FIELDS[kind]: value})
            with translated():
                found = conn.execute(
                    sa.select(events.c.position).where(alone.clause(dialect)).limit(1)
                ).first()
            if found is None:
                raise UnknownAggregate(kind, value)


_FIELDS: Final = {"build": "build_id", "evaluation": "eval_id", "jobset": "jobset_id"}


def head(conn: sa.Connection) -> int:
    """The newest seq in the log (0 for an empty log)."""
    with translated():
        return int(
            conn.execute(sa.select(sa.func.coalesce(sa.func.max(log_order.c.seq), 0))).scalar_one()
        )


def first_seq(conn: sa.Connection) -> int:
    """The oldest seq the log holds (0 for an empty log; after a prune, past the pruned)."""
    with translated():
        return int(
            conn.execute(sa.select(sa.func.coalesce(sa.func.min(log_order.c.seq), 0))).scalar_one()
        )


def first_seq_since(conn: sa.Connection, when: datetime) -> int | None:
    """The first seq recorded at or after ``when`` (None: nothing was, yet).

    Everything after it in the log came later, so "since T" reads from here
    on (an event of a transaction that began before T and committed after
    it is included: it reached the log after T).
    """
    stmt = (
        sa.select(log_order.c.seq)
        .join_from(log_order, events, log_order.c.position == events.c.position)
        .where(events.c.recorded_at >= when)
        .order_by(log_order.c.seq)
        .limit(1)
    )
    with translated():
        found = conn.execute(stmt).scalar_one_or_none()
    return None if found is None else int(found)


def after_for(conn: sa.Connection, when: datetime) -> int:
    """Where to read after so that the first event is the first recorded at or after
    ``when`` (its seq − 1; the head if none was recorded since): ``--since`` as an offset."""
    found = first_seq_since(conn, when)
    return head(conn) if found is None else found - 1


def last_seq_until(conn: sa.Connection, when: datetime) -> int:
    """The last seq recorded at or before ``when`` (0: none was)."""
    stmt = (
        sa.select(log_order.c.seq)
        .join_from(log_order, events, log_order.c.position == events.c.position)
        .where(events.c.recorded_at <= when)
        .order_by(log_order.c.seq.desc())
        .limit(1)
    )
    with translated():
        found = conn.execute(stmt).scalar_one_or_none()
    return 0 if found is None else int(found)


_COLUMNS = (
    log_order.c.seq,
    events.c.position,
    events.c.topic,
    events.c.payload,
    events.c.delivery,
    events.c.dedupe_key,
    events.c.aggregate_id,
    events.c.aggregate_version,
    events.c.trace_id,
    events.c.occurred_at,
    events.c.recorded_at,
)


def _entry(row: Any) -> LogEntry:
    # Positional (the order of _COLUMNS): a page is thousands of rows. SQLite gives
    # back naive datetimes; herald stores UTC.
    seq, position, topic, payload, delivery, dedupe, aggregate, version, trace, occurred, at = row
    return LogEntry(
        seq, position, topic, payload, delivery, dedupe, aggregate, version, trace,
        occurred if occurred.tzinfo is not None else occurred.replace(tzinfo=UTC),
        at if at.tzinfo is not None else at.replace(tzinfo=UTC),
    )  # fmt: skip


#: psycopg's row maker for the hot read: a row is a LogEntry as it comes (PostgreSQL's
#: timestamptz is aware already), built by tuple's own constructor.
_ENTRY_ROW: Final = partial(tuple.__new__, LogEntry)

_DECODER: Final = json.JSONDecoder()


class _PayloadLoader(Loader):
    """jsonb → Python for the hot read, without ``json.loads``'s per-call overhead.

    psycopg's own loader calls ``json.loads`` on bytes (an encoding sniff and a
    decoder lookup per value: 2.3 µs for a small payload, more than the rest of
    the row). PostgreSQL's jsonb output is one JSON value and nothing else, so
    ``raw_decode`` reads it directly (0.6 µs); anything else falls back to
    ``json.loads``, which raises as usual.
    """

    def load(self, data: Buffer) -> Any:
        text = str(data, "utf-8")
        try:
            value, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError:
            return json.loads(text)
        return value if end == len(text) else json.loads(text)


def _fetch_postgresql(
    conn: sa.Connection,
    after: int,
    top: int,
    limit: int,
    topics: TopicFilter | None,
    scan_limit: int,
) -> tuple[list[LogEntry], int]:
    """The page on the driver (PostgreSQL), and the seq it read up to.

    No SQLAlchemy rows: entries are built in C. The statements run in
    ``conn``'s transaction, or each in its own on an autocommit connection:
    either way they see every seq up to ``top``, read before them.
    """
    driver: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
    with driver.cursor(row_factory=lambda _cursor: _ENTRY_ROW) as cursor:
        cursor.adapters.register_loader("jsonb", _PayloadLoader)

        def fetch(name: str, after: int, bound: int, limit: int) -> list[LogEntry]:
            # Planned with this page's values, never prepared: psycopg prepares a
            # statement run five times, and PostgreSQL may then plan it once for any
            # window, not knowing how many seqs one holds.
            cursor.execute(
                QUERIES[name],
                {
                    "after": after,
                    "bound": bound,
                    "limit": limit,
                    "exact": topics.exact if topics else [],
                    "patterns": [_like(p) for p in topics.patterns] if topics else [],
                },
                prepare=False,
            )
            return cursor.fetchall()

        # A filter's page scans at most `scan_limit` seqs, one that lets every topic
        # through (`*`) too.
        window = min(top, after + scan_limit) if topics else top
        if topics is None or topics.every:
            # Seqs are dense, so the page is the `limit` seqs after `after`: bounded so,
            # the planner knows the page's size and reads it through the seq index
            # (bounded by the head, a consumer far behind got a plan for the whole
            # distance). A shorter page before the window's end means seqs missing (a
            # prune keeps the events of an aggregate with younger ones, and may be
            # deleting right now): then the page reads on to the window's end.
            bound = min(window, after + limit)
            entries = fetch("read_page", after, bound, limit)
            if len(entries) < limit and bound < window:
                bound = window
                entries = fetch("read_page", after, bound, limit)
            return entries, bound
        if topics.patterns:
            return fetch("read_page_patterns", after, window, limit), window
        # Exact topics, through the topic index over the window's span of positions,
        # in two steps. The first reads the first `limit` seqs; if those hold the
        # whole page, or the window ends there, that is the page. Otherwise their
        # share of the topics says how far the rest of the page lies: the second
        # step reads twice that far (the whole window if the first found none). A
        # common topic then costs about the seqs its page covers, not the window's
        # 10,000, and a rare one the window's span, whatever the log's size. The
        # page may hold fewer than `limit` entries and end before the window does:
        # `next_after` is where the second step stopped.
        first = min(window, after + limit)
        entries = fetch("read_page_topics", after, first, limit)
        if len(entries) == limit or first == window:
            return entries, first
        missing = limit - len(entries)
        reach = window
        if entries:
            reach = min(window, first + math.ceil(2 * missing * (first - after) / len(entries)))
        return entries + fetch("read_page_topics", first, reach, missing), reach


def entries_at(conn: sa.Connection, seqs: Iterable[int]) -> dict[int, LogEntry]:
    """The entries at these seqs (those that exist), by seq."""
    wanted = sorted(set(seqs))
    found: dict[int, LogEntry] = {}
    with translated():
        for start in range(0, len(wanted), 1000):
            stmt = (
                sa.select(*_COLUMNS)
                .join_from(log_order, events, log_order.c.position == events.c.position)
                .where(log_order.c.seq.in_(wanted[start : start + 1000]))
            )
            found.update((row.seq, _entry(row)) for row in conn.execute(stmt))
    return found


def read_page(
    conn: sa.Connection,
    after: int = 0,
    limit: int = 1000,
    topics: TopicFilter | None = None,
    *,
    scan_limit: int = 10_000,
    until_seq: int | None = None,
    narrow: EventFilter | None = None,
    top: int | None = None,
) -> Page:
    """Read up to ``limit`` entries with ``seq > after``, in seq order.

    Reads only what is ordered already (on PostgreSQL, what a sequencer
    cycle has given a seq); :class:`LogReader` runs a cycle first when no
    sequencer daemon is active. ``top``: the head (:func:`head`), if the
    caller has just read it on ``conn`` (the daemon reads it with the
    consumer's row, in one round trip); read here otherwise.
    """
    if after < 0:
        raise UsageError(f"cannot read after seq {after}: seqs start at 1")
    if after > MAX_SEQ:
        raise UsageError(f"cannot read after seq {after}: seqs end at {MAX_SEQ}")
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    with translated(conn):
        # The head is read first: every seq up to it is committed (cycles commit
        # in seq order), so a page bounded by it can never step over a seq
        # that commits while the page is being read.
        if top is None:
            top = head(conn)
        if until_seq is not None:
            top = min(top, until_seq)
        if conn.dialect.name == "postgresql" and not narrow:
            entries, bound = _fetch_postgresql(conn, after, top, limit, topics, scan_limit)
        else:
            bound = min(top, after + scan_limit) if topics or narrow else top
            stmt = (
                sa.select(*_COLUMNS)
                .join_from(log_order, events, log_order.c.position == events.c.position)
                .where(log_order.c.seq > after, log_order.c.seq <= bound)
                .order_by(log_order.c.seq)
                .limit(limit)
            )
            if topics:
                stmt = stmt.where(topics.clause())
            if narrow:
                stmt = stmt.where(narrow.clause(conn.dialect.name))
            entries = [_entry(row) for row in conn.execute(stmt)]
    if len(entries) == limit:
        return Page(entries, entries[-1].seq, at_head=entries[-1].seq >= top)
    return Page(entries, max(after, bound), at_head=bound >= top)


class LogReader:
    """Reads the log through an engine; never depends on a daemon being up.

    On PostgreSQL each read first orders whatever has committed and is not
    ordered yet (a sequencer cycle: one cheap read when there is nothing to
    do, and it waits for a cycle another process is running), so a read
    sees every event committed before it began, with or without
    ``herald run``.
    """

    def __init__(
        self,
        engine: sa.Engine,
        topics: TopicFilter | None = None,
        narrow: EventFilter | None = None,
    ) -> None:
        self.engine = engine
        self.topics = topics or TopicFilter()
        self.narrow = narrow
        self._sequencer = Sequencer()

    def read(self, after: int = 0, limit: int = 1000, *, until_seq: int | None = None) -> Page:
        with self.engine.connect() as conn:
            self._sequencer.cycle(conn)
            page = read_page(
                conn, after, limit, self.topics, until_seq=until_seq, narrow=self.narrow
            )
            conn.rollback()
            return page

    def until_head(
        self, after: int = 0, *, batch: int = 1000, until_seq: int | None = None
    ) -> Iterator[LogEntry]:
        """Yield every entry after ``after`` up to the head as it is now (or ``until_seq``),
        page by page."""
        while True:
            page = self.read(after, batch, until_seq=until_seq)
            yield from page.entries
            after = page.next_after
            if page.at_head:
                return

    def follow(
        self,
        after: int = 0,
        *,
        batch: int = 1000,
        poll_interval: float = 1.0,
        stop: threading.Event | None = None,
    ) -> Iterator[LogEntry]:
        """Yield entries after ``after`` as they arrive, until ``stop`` is set.

        Waits on the sequencer's NOTIFY (PostgreSQL) with ``poll_interval`` as
        the fallback: a lost notification only delays, never loses, an entry.
        """
        stop = stop or threading.Event()
        waker = Waker(self.engine)
        try:
            while not stop.is_set():
                page = self.read(after, batch)
                yield from page.entries
                after = page.next_after
                if page.at_head:
                    waker.wait(poll_interval)
        finally:
            waker.close()
