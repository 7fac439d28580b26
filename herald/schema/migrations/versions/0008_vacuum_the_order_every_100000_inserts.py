"""Autovacuum of the order (``herald_log``) every 100,000 inserts too.

``herald_log`` gives each event its seq, one row per event, and only grows,
like the two tables migration 0007 gave a fixed insert threshold. With
PostgreSQL's default it is vacuumed after ``1000 + 0.2 × its rows`` inserts:
a log of 10,000,000 events goes 2,000,000 appends without one, and every
reader of the newest seqs is the first to look at their rows: each row's
commit is looked up in the commit log and its hint bits set (a write to a
page read), which a VACUUM would have done once for everyone.
B7 in BENCHMARKS.md read the newest window of the big log at 0.71 of the
small one, whose order autovacuum had just vacuumed; read a second time,
the two were level. With the same threshold as the events
(100,000, no scale factor) the newest seqs are vacuumed every 100,000
appends, whatever the log's size. An operator's own ``ALTER TABLE ... SET``
stands; SQLite has no autovacuum and gets nothing.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: The order of the log: seq → position, one row per event, only appended.
TABLE = "herald_log"
#: Inserts between two vacuums, whatever the table's size (as in 0007).
INSERT_THRESHOLD = 100_000


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"ALTER TABLE {TABLE} SET (autovacuum_vacuum_insert_threshold = {INSERT_THRESHOLD},"
        " autovacuum_vacuum_insert_scale_factor = 0)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"ALTER TABLE {TABLE} RESET (autovacuum_vacuum_insert_threshold,"
        " autovacuum_vacuum_insert_scale_factor)"
    )
