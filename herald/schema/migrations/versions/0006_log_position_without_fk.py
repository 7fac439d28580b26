"""The order table's ``position`` without a foreign key to ``herald_events``.

The key cost the sequencer a row lock on every event it ordered: PostgreSQL
checks a referencing insert with ``SELECT ... FOR KEY SHARE`` on the
referenced row, and that lock is written into the event's heap tuple, so
ordering an event dirtied its heap page (a full-page image in the WAL after
each checkpoint: 8.5 kB of WAL per ordered event against 215 B without the
key, and ordering two to four times slower). What the key guarded holds
without it: the sequencer inserts only positions it has just read from
``herald_events``, and ``herald_events`` refuses DELETE except from ``herald
prune``, which deletes an event together with its order row (``tables.py``
says so at the column). SQLite loses the key too: one schema for both.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The key's name, by the naming convention of ``herald.schema.tables``.
_FK = "fk_herald_log_position_herald_events"


def upgrade() -> None:
    # SQLite cannot drop a constraint in place: the batch copies the table.
    with op.batch_alter_table("herald_log") as batch:
        batch.drop_constraint(_FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("herald_log") as batch:
        batch.create_foreign_key(_FK, "herald_events", ["position"], ["position"])
