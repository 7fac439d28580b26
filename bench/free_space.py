"""B7's scatter: where appends go on a big log, by the free space map, for two mixes of rows.

Run with ``make bench`` or ``.venv/bin/python -m bench.free_space``.

A scratch database (``herald_bench_free_space_big``, dropped first and at the
end unless ``--keep``) is migrated and filled with ``--events`` events exactly
as :mod:`bench.scale` fills its big log (the same statement, ``--chunk`` a
transaction, and after each what autovacuum would have done). Then:

* **the free space map** (``pg_freespacemap``, installed in the scratch
  database): for each topic's smallest row, how many of the log's pages have
  room recorded for it (a row needs its size and a 4-byte line pointer; the map
  counts in steps of 32 bytes, and an insert asks for the next step up);
* **appends**: ``--writers`` threads, each with its own connection, append
  ``--appends`` rows in all, one a transaction, with the fill's statement, three
  times: a build's lifecycle as the fill writes it (``build_queued``,
  ``build_started``, three step pairs, ``build_finished``), ``build_finished``
  alone (what B7's and B1's writers append), and the lifecycle again. For each:
  the heap pages of ``herald_events`` the rows went to (``ctid``), and how many
  of the rows went to pages that existed before the appends.

It writes its section of ``BENCHMARKS.md`` (between the ``bench.free_space``
markers).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import psycopg
from sqlalchemy.engine import make_url

from bench.append_throughput import (
    Machine,
    describe_machine,
    drop_scratch,
    git_revision,
    md_table,
    text_table,
)
from bench.common import add_server_options, markers, run_script, write_section
from bench.scale import (
    FILL_CHUNK,
    FIRST_BUILD,
    HEAP_PAGES,
    RARE_TOPIC,
    add_fill_options,
    prepare,
)

BEGIN_MARK, END_MARK = markers("bench.free_space")
#: The map's step: a page's room is recorded rounded down to it, an insert's need rounded up.
FSM_STEP: Final = 32
#: A row's line pointer, besides the row itself.
LINE_POINTER: Final = 4
#: The appends' ``rare``: no rare topic among them (it is every n-th event, n this large).
NO_RARE: Final = 1_000_000_007

ROOM: Final = """
SELECT count(*) FILTER (WHERE avail >= %(need)s), count(*) FROM pg_freespace('herald_events')
"""
ROW_SIZES: Final = """
SELECT topic, min(pg_column_size(e.*)), max(pg_column_size(e.*))
FROM (SELECT * FROM herald_events ORDER BY position LIMIT 9000) AS e
GROUP BY topic ORDER BY 2, 1
"""
WHERE_THEY_WENT: Final = """
SELECT count(*), count(DISTINCT p.page),
       count(*) FILTER (WHERE p.page < %(before)s),
       count(DISTINCT p.page) FILTER (WHERE p.page < %(before)s)
FROM (SELECT (ctid::text::point)[0]::bigint AS page
      FROM herald_events WHERE position > %(after)s) AS p
"""


def needed(size: int) -> int:
    """The room, as the free space map records it, that a row of ``size`` bytes asks for."""
    return -(-(size + LINE_POINTER) // FSM_STEP) * FSM_STEP


@dataclass(frozen=True, slots=True)
class RoomRow:
    topic: str
    smallest: int
    largest: int
    #: pages with room recorded for the topic's smallest row, of all pages
    pages: int
    of: int


@dataclass(frozen=True, slots=True)
class Appends:
    label: str
    rows: int
    seconds: float
    pages: int
    on_old: int
    old_pages: int


def room(dsn: str) -> list[RoomRow]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_freespacemap")
        except psycopg.Error as exc:
            raise SystemExit(
                f"pg_freespacemap is needed (PostgreSQL's contrib modules): {exc}".strip()
            ) from None
        found = []
        for topic, smallest, largest in conn.execute(ROW_SIZES).fetchall():
            row = conn.execute(ROOM, {"need": needed(int(smallest))}).fetchone()
            assert row is not None
            found.append(RoomRow(topic, int(smallest), int(largest), int(row[0]), int(row[1])))
    return found


def append(dsn: str, label: str, events: Sequence[int], writers: int, count: int) -> Appends:
    """Append fill events ``events`` (their numbers g), one a transaction, from ``writers``."""
    with psycopg.connect(dsn) as conn:
        after = conn.execute("SELECT coalesce(max(position), 0) FROM herald_events").fetchone()
        pages = conn.execute(HEAP_PAGES).fetchone()
    assert after is not None
    assert pages is not None
    errors: list[BaseException] = []

    def write(share: Sequence[int]) -> None:
        try:
            with psycopg.connect(dsn) as conn:
                for g in share:
                    params = {"lo": g, "hi": g, "count": count, "rare": NO_RARE}
                    conn.execute(
                        FILL_CHUNK,
                        {**params, "first_build": FIRST_BUILD, "rare_topic": RARE_TOPIC},
                    )
                    conn.commit()
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(events[i::writers],), name=f"writer-{i}")
        for i in range(writers)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{label}: a writer failed: {errors[0]}")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(WHERE_THEY_WENT, {"before": pages[0], "after": after[0]}).fetchone()
    assert row is not None
    rows, used, on_old, old_pages = (int(v) for v in row)
    if rows != len(events):
        raise SystemExit(f"{label}: {rows} rows appended, not {len(events)}")
    return Appends(label, rows, seconds, used, on_old, old_pages)


def newest_build(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT max((payload->>'build_id')::bigint) FROM herald_events"
        ).fetchone()
    assert row is not None
    return int(row[0] if row[0] is not None else FIRST_BUILD - 1)


def lifecycle(start: int, n: int) -> list[int]:
    """``n`` events of whole builds in the fill's order, from the build after ``start``."""
    first = start - start % 9 + 1
    return list(range(first, first + n))


def finished_only(start: int, n: int) -> list[int]:
    """``n`` ``build_finished`` events (every ninth of the fill: g ≡ 0 mod 9)."""
    first = start - start % 9 + 9
    return [first + 9 * i for i in range(n)]


ROOM_HEADER: Final = (
    "topic",
    "row bytes (min–max)",
    "room its smallest row asks for",
    "pages with that room recorded",
)
APPEND_HEADER: Final = (
    "appended",
    "rows",
    "seconds",
    "heap pages used",
    "rows on pages that existed before",
    "those pages",
)


def room_rows(rooms: Sequence[RoomRow]) -> list[list[str]]:
    return [
        [
            f"`{r.topic}`",
            f"{r.smallest}–{r.largest}",
            f"{needed(r.smallest)} B",
            f"{r.pages:,} of {r.of:,} ({r.pages / max(r.of, 1):.1%})",
        ]
        for r in rooms
    ]


def append_rows(runs: Sequence[Appends]) -> list[list[str]]:
    return [
        [
            a.label,
            f"{a.rows:,}",
            f"{a.seconds:.1f}",
            f"{a.pages:,}",
            f"{a.on_old:,} ({a.on_old / max(a.rows, 1):.1%})",
            f"{a.old_pages:,}",
        ]
        for a in runs
    ]


def markdown(
    args: argparse.Namespace,
    machine: Machine,
    fill: str,
    rooms: Sequence[RoomRow],
    runs: Sequence[Appends],
    elapsed: float,
) -> str:
    return f"""{BEGIN_MARK}

## B7's scatter: where appends go on a big log (issue #6)

Date: {datetime.now(UTC):%Y-%m-%d}. Script: `bench/free_space.py` (whole run {elapsed:.0f} s).
{git_revision()}.

**Machine.** {machine.cores} cores ({machine.cpu_model}), PostgreSQL {machine.server_version}
on the same machine.

**Reproduce.** `make bench`, or `.venv/bin/python -m bench.free_space --events {args.events}
--appends {args.appends} --writers {args.writers}` (`--chunk`, `--rare-every`, `--reuse`,
`--keep`, `--admin`, `--database`, `--help`).

**What is measured.** A log filled as B7 fills its big log ({fill}). Then the free space
map (`pg_freespacemap`): for each topic's smallest row, the pages with room recorded for
it (the row's size and a 4-byte line pointer, rounded up to the map's 32-byte steps).
Then {args.writers} threads append {args.appends:,} rows each time, one a transaction,
with the fill's statement: a build's lifecycle as the fill writes it, `build_finished`
alone (what B7's and B1's writers append), the lifecycle again; for each, the heap pages
of `herald_events` the rows went to (`ctid`) and the rows that went to pages the log had
before.

{md_table(ROOM_HEADER, room_rows(rooms))}

{md_table(APPEND_HEADER, append_rows(runs))}

{END_MARK}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.free_space",
        description="Where appends go on a big log (B7's scatter): the free space map, "
        "and a lifecycle mix against build_finished alone.",
    )
    parser.add_argument("--events", type=int, default=10_000_000, help="Events in the log.")
    parser.add_argument("--appends", type=int, default=18_000, help="Rows appended each time.")
    parser.add_argument("--writers", type=int, default=8, help="Appending threads.")
    add_fill_options(parser)
    add_server_options(parser, "herald_bench_free_space")
    args = parser.parse_args(argv)
    if args.events < 9 or min(args.chunk, args.appends, args.writers, args.rare_every) < 1:
        parser.error(
            "--events must be at least 9; --chunk, --appends, --writers and --rare-every at least 1"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()
    admin = make_url(args.admin)
    scale = prepare(args, "big", args.events)
    try:
        dsn = scale.dsn
        machine = describe_machine(admin, scale.database)
        fill = (
            f"{args.events:,} events in {scale.fill_seconds:.0f} s"
            if scale.fill_seconds
            else f"{scale.events:,} events, reused"
        )
        rooms = room(dsn)
        plain = [[c.replace("`", "") for c in row] for row in room_rows(rooms)]
        print(text_table(ROOM_HEADER, plain), flush=True)
        # Builds after every build the log holds (a reused log holds earlier appends):
        # the appends' aggregate versions must be new.
        start = 9 * (newest_build(dsn) - FIRST_BUILD + 1)
        runs = [
            append(dsn, "lifecycle", lifecycle(start, args.appends), args.writers, args.events),
            append(
                dsn,
                "build_finished alone",
                finished_only(start + 9 * args.appends, args.appends),
                args.writers,
                args.events,
            ),
            append(
                dsn,
                "lifecycle again",
                lifecycle(start + 18 * args.appends, args.appends),
                args.writers,
                args.events,
            ),
        ]
        print(text_table(APPEND_HEADER, append_rows(runs)), flush=True)
    finally:
        scale.close()
        if not args.keep:
            drop_scratch(admin, scale.database)
    section = markdown(args, machine, fill, rooms, runs, time.monotonic() - began)
    write_section(Path(args.markdown), "bench.free_space", section)
    print(f"wrote {args.markdown}", flush=True)


if __name__ == "__main__":
    run_script(main)
