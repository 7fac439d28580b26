-- herald's PostgreSQL queries, one named block each: "-- name --" then a
-- one-line comment. Loaded by herald.schema.queries; parameters are bound
-- (:name), never formatted in.

-- current_snapshot --
-- Which transactions are finished right now. Costs no write and no xid.
SELECT pg_current_snapshot()::text AS snapshot

-- sequencer_state --
-- The stored snapshot up to which events are ordered, and the newest seq.
SELECT snapshot, last_seq FROM herald_sequencer WHERE id = 1

-- sequencer_state_for_update --
-- The same, locked: concurrent cycles (a daemon and a reader) run one after the other.
SELECT snapshot, last_seq FROM herald_sequencer WHERE id = 1 FOR UPDATE

-- sequencer_try_lock --
-- Elect the one active sequencer: a session lock, released when its connection ends.
SELECT pg_try_advisory_lock(:key) AS locked

-- sequencer_unlock --
-- Give up the sequencer's session lock (on a clean stop).
SELECT pg_advisory_unlock(:key) AS unlocked

-- sequencer_pending --
-- How many events committed after the stored snapshot? A read, so an idle cycle writes nothing.
SELECT count(*) AS pending FROM (
    SELECT 1 FROM herald_events e
    WHERE e.tx >= pg_snapshot_xmax(CAST(:prev AS pg_snapshot))
      AND e.tx < pg_snapshot_xmax(CAST(:now AS pg_snapshot))
      AND pg_visible_in_snapshot(e.tx, CAST(:now AS pg_snapshot))
    UNION ALL
    SELECT 1 FROM herald_events e
    WHERE e.tx = ANY (CAST(:xip AS xid8[]))
      AND pg_visible_in_snapshot(e.tx, CAST(:now AS pg_snapshot))
) AS n

-- sequence_new_events --
-- Give the next seqs to the events whose transaction became visible between :prev and :now.
-- "Not visible in prev" is "tx >= xmax(prev)" or "tx in xip(prev)" (:xip, the list taken
-- from :prev by the caller, so the planner sees its values). xip(prev) < xmax(prev), so the
-- two branches never overlap, and each is an index scan on tx: as one OR, or with the list
-- as a subquery, the planner falls back to a sequential scan of the whole log.
INSERT INTO herald_log (seq, position)
SELECT :last_seq + row_number() OVER (ORDER BY n.tx, n.position), n.position
FROM (
    SELECT e.tx, e.position FROM herald_events e
    WHERE e.tx >= pg_snapshot_xmax(CAST(:prev AS pg_snapshot))
      AND e.tx < pg_snapshot_xmax(CAST(:now AS pg_snapshot))
      AND pg_visible_in_snapshot(e.tx, CAST(:now AS pg_snapshot))
    UNION ALL
    SELECT e.tx, e.position FROM herald_events e
    WHERE e.tx = ANY (CAST(:xip AS xid8[]))
      AND pg_visible_in_snapshot(e.tx, CAST(:now AS pg_snapshot))
) AS n

-- sequencer_advance --
-- Store the snapshot just ordered and the newest seq, in the same transaction as the order rows.
UPDATE herald_sequencer
SET snapshot = :now, last_seq = :last_seq, updated_at = now()
WHERE id = 1

-- sequencer_notify --
-- Wake readers once per cycle. The payload (the newest seq) is a hint, never trusted.
SELECT pg_notify('herald_log', CAST(:last_seq AS text))

-- listen --
-- Readers and consumers wait on the sequencer's channel.
LISTEN herald_log

-- sequencer_holder --
-- The backend pid holding the sequencer lock, if any (for `herald status` and tests).
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = (CAST(:key AS bigint) >> 32)::oid
  AND l.objid = (CAST(:key AS bigint) & 4294967295)::oid
  AND l.objsubid = 1

-- consumer_try_lock --
-- Claim a consumer for this daemon: a session lock on its listening connection (psycopg %s placeholders).
SELECT pg_try_advisory_lock(%s::int4, hashtext(%s))

-- consumer_unlock --
-- Give a consumer's claim up (psycopg %s placeholders).
SELECT pg_advisory_unlock(%s::int4, hashtext(%s))

-- consumer_lock_holders --
-- Which consumers a live daemon holds right now, by the backend holding each claim.
SELECT c.name, l.pid
FROM herald_consumers AS c
JOIN pg_locks AS l
  ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
 AND l.classid::bigint = :lock_class AND l.objid::bigint = (hashtext(c.name)::bigint & 4294967295)
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())

-- consumers_wake --
-- Wake the daemons' consumers now (after an operator's request); like every NOTIFY, only a hint.
SELECT pg_notify('herald_log', 'consumers')

-- read_page --
-- A consumer's page: entries after %(after)s up to %(bound)s, every topic or those named (psycopg %(name)s placeholders, read on the driver).
SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.dedupe_key, e.aggregate_id,
       e.aggregate_version, e.trace_id, e.occurred_at, e.recorded_at
FROM herald_log AS l
JOIN herald_events AS e ON e.position = l.position
WHERE l.seq > %(after)s AND l.seq <= %(bound)s
  AND (%(every)s
       OR e.topic = ANY (CAST(%(exact)s AS text[]))
       OR e.topic LIKE ANY (CAST(%(patterns)s AS text[])))
ORDER BY l.seq
LIMIT %(limit)s
