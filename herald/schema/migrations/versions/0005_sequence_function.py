"""The sequencer's cycle as one function: one round trip instead of eleven.

``herald_sequence_v1()`` does on the server what the sequencer did with a
statement at a time: look whether anything committed since the stored
snapshot (a read, no lock, no write), and if so lock the state, order the
new events, store the snapshot, NOTIFY. The sequencer calls it once per
cycle; it returns how many events it ordered and the newest seq. SQLite has
no sequencer and gets nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# THE ORDERING ARGUMENT. A bigserial `position` is drawn when a row is inserted
# but becomes visible when its transaction commits, so position 101 can appear
# after 102 (Hydra #496): a reader of `position > offset` would skip 101
# forever. The log's order is therefore not the position but the moment of
# visibility: an event gets a seq in the first cycle whose snapshot `cur` sees
# its transaction as committed. `tx >= xmax(prev) OR tx IN xip(prev)` is exactly
# "not yet visible in prev" (anything below xmin(prev) and not in xip(prev) had
# finished, and was ordered then), and pg_visible_in_snapshot(tx, cur) is
# "visible now". Every event's transaction is visible in exactly one
# (prev, cur] interval, so it is ordered exactly once; rolled-back transactions
# are never visible, so their rows are never ordered. A transaction held open
# for minutes stays in xip of every snapshot meanwhile: the events committed
# around it are ordered and readable at once, and its own events get seqs after
# theirs when it commits. The cycle stores `cur` in the same transaction as the
# rows it orders, so a sequencer killed at any point either ordered a range or
# did not, and its successor continues from the last committed snapshot.
# Within a cycle, events are ordered by (tx, position): one writer's
# transactions get increasing xids, so its events keep their commit order.
#
# Cycles serialize on the state row (FOR UPDATE): `cur` is taken after the lock,
# so a cycle that waited for another one reads its stored snapshot as `prev` and
# starts where it stopped. Each statement of a PL/pgSQL function takes its own
# snapshot (READ COMMITTED), as separate statements in one transaction do; the
# ordering statement sees at least what `cur` sees.
#
# The cycle commits without waiting for its WAL to reach the disk
# (synchronous_commit off, for its own transaction): a writer's commit then
# never queues behind the sequencer's flush, and a cycle ends a flush sooner.
# Nothing durable can depend on a cycle that a crash takes back: whoever acts
# on a seq commits after reading it (a consumer's offset and records, with
# synchronous_commit on), and flushing that commit flushes the WAL before it,
# the cycle's included. A crash in between only means the lost cycle's events
# are ordered again after the restart, and delivered again: at least once.
#
# The two branches of "not visible in prev" are separate index scans on `tx`
# (as one OR, or with xip(prev) as a subquery, the planner reads the whole
# log). The queries on herald_events run through EXECUTE ... USING: planned
# each time with this call's values, as a statement sent with its parameters
# is (a plan cached for any snapshot could scan the whole log). Not with a
# `SET plan_cache_mode` on the function: a function's SET clause undoes, at
# its exit, the SET LOCAL of synchronous_commit above.
_SEQUENCE = r"""
CREATE FUNCTION herald_sequence_v1(OUT ordered bigint, OUT newest bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    stored text;
    prev pg_snapshot;
    cur pg_snapshot;
    found_one boolean;
BEGIN
    ordered := 0;
    -- The look: has anything committed since the stored snapshot? A read: an idle
    -- database is never written to by its sequencer.
    SELECT s.snapshot, s.last_seq INTO stored, newest FROM herald_sequencer AS s WHERE s.id = 1;
    prev := coalesce(stored, '1:1:')::pg_snapshot;
    cur := pg_current_snapshot();
    EXECUTE $q$
        SELECT EXISTS (
            SELECT 1 FROM herald_events AS e
            WHERE e.tx >= pg_snapshot_xmax($1) AND e.tx < pg_snapshot_xmax($2)
              AND pg_visible_in_snapshot(e.tx, $2)
            UNION ALL
            SELECT 1 FROM herald_events AS e
            WHERE e.tx = ANY ($3) AND pg_visible_in_snapshot(e.tx, $2)
        )
    $q$ INTO found_one USING prev, cur, ARRAY(SELECT pg_snapshot_xip(prev));
    IF NOT found_one THEN
        RETURN;
    END IF;

    -- The cycle: lock the state, then take the snapshot (see the argument above).
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT s.snapshot, s.last_seq INTO stored, newest
    FROM herald_sequencer AS s WHERE s.id = 1 FOR UPDATE;
    prev := coalesce(stored, '1:1:')::pg_snapshot;
    cur := pg_current_snapshot();
    EXECUTE $q$
        INSERT INTO herald_log (seq, position)
        SELECT $1 + row_number() OVER (ORDER BY n.tx, n.position), n.position
        FROM (
            SELECT e.tx, e.position FROM herald_events AS e
            WHERE e.tx >= pg_snapshot_xmax($2) AND e.tx < pg_snapshot_xmax($3)
              AND pg_visible_in_snapshot(e.tx, $3)
            UNION ALL
            SELECT e.tx, e.position FROM herald_events AS e
            WHERE e.tx = ANY ($4) AND pg_visible_in_snapshot(e.tx, $3)
        ) AS n
    $q$ USING newest, prev, cur, ARRAY(SELECT pg_snapshot_xip(prev));
    GET DIAGNOSTICS ordered = ROW_COUNT;
    IF ordered > 0 THEN
        newest := newest + ordered;
        UPDATE herald_sequencer
        SET snapshot = cur::text, last_seq = newest, updated_at = now()
        WHERE id = 1;
        -- Wake readers once per cycle. The payload (the newest seq) is a hint, never trusted.
        PERFORM pg_notify('herald_log', newest::text);
    END IF;
END;
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SEQUENCE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION herald_sequence_v1()")
