"""Autovacuum of the append-only tables every 100,000 inserts, whatever their size.

The log and the delivery records only grow, with rows of different sizes. A
page filled by inserts keeps a leftover smaller than the row that did not
fit, and VACUUM writes that leftover into the free space map; the next
inserts that are small enough are then put into those pages, one row a page
(a page with room for one more row gets one), before any goes to the table's
end. PostgreSQL's default vacuums an insert-only table after
``1000 + 0.2 × its rows`` inserts, so the pages it hands out at once are a
fifth of the table: with 10,000,000 events, some 50,000 pages of 8 kB
(400 MB), one new event on each. Every append then writes a page of its own
that is most likely out of ``shared_buffers`` (read from disk, and a
full-page image in the WAL after each checkpoint), and the newest events,
which readers and the sequencer want, lie one a page across the table
(B7 in BENCHMARKS.md found 18,000 new events on 18,000 pages).

With the scale factor 0 and a threshold of 100,000 the window is the pages
of the last 100,000 rows, whatever the table's size: a few thousand pages,
the newest, the ones the buffers hold anyway. Vacuuming that often is cheap
on these tables: only pages not yet all-visible are read (the newest), and
with no dead rows the indexes are not scanned. An operator can still set
the options otherwise (``ALTER TABLE ... SET``); a later ``herald db
migrate`` does not undo it. SQLite has no autovacuum and gets nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: The append-only tables: the log and the consumers' delivery records.
TABLES = ("herald_events", "herald_deliveries")
#: Inserts between two vacuums, whatever the table's size.
INSERT_THRESHOLD = 100_000


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(
            f"ALTER TABLE {table} SET (autovacuum_vacuum_insert_threshold = {INSERT_THRESHOLD},"
            " autovacuum_vacuum_insert_scale_factor = 0)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(
            f"ALTER TABLE {table} RESET (autovacuum_vacuum_insert_threshold,"
            " autovacuum_vacuum_insert_scale_factor)"
        )
