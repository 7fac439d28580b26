-- herald's PostgreSQL queries, one named block each: "-- name --" then a
-- one-line comment. Loaded by herald.schema.queries; parameters are bound
-- (:name), never formatted in.

-- current_snapshot --
-- Which transactions are finished right now. Costs no write and no xid.
SELECT pg_current_snapshot()::text AS snapshot

-- sequence --
-- One sequencer cycle (herald_sequence_v1, migration 0005): how many events it ordered, and the newest seq.
SELECT ordered, newest FROM herald_sequence_v1()

-- sequencer_try_lock --
-- Elect the one active sequencer: a session lock, released when its connection ends.
SELECT pg_try_advisory_lock(:key) AS locked

-- sequencer_unlock --
-- Give up the sequencer's session lock (on a clean stop).
SELECT pg_advisory_unlock(:key) AS unlocked

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

-- consumer_row --
-- A consumer's row, as the daemon looks at it before every page (psycopg %s placeholders).
SELECT name, offset_seq, owner, lease_until, control, updated_at, epoch, records_floor
FROM herald_consumers WHERE name = %s

-- consumer_fence --
-- Move a consumer's offset if this claim and epoch still hold (psycopg %s placeholders): new offset, now, name, owner, epoch, old offset.
UPDATE herald_consumers SET offset_seq = %s, updated_at = %s
WHERE name = %s AND owner = %s AND epoch = %s AND offset_seq = %s

-- head --
-- The newest seq in the log (0 for an empty log).
SELECT coalesce(max(seq), 0) AS head FROM herald_log

-- read_page --
-- A page of every topic: the entries after %(after)s up to %(bound)s (psycopg %(name)s placeholders, read on the driver).
SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.dedupe_key, e.aggregate_id,
       e.aggregate_version, e.trace_id, e.occurred_at, e.recorded_at
FROM herald_log AS l
JOIN herald_events AS e ON e.position = l.position
WHERE l.seq > %(after)s AND l.seq <= %(bound)s
ORDER BY l.seq
LIMIT %(limit)s

-- read_page_topics --
-- A page of the exact topics %(exact)s after %(after)s up to %(bound)s, their events found in the window's span of positions (psycopg placeholders).
-- Every event of the window has a position between the smallest and the largest
-- position of the window's order rows, so the topic index (topic, position) is
-- read over that span only, however many events of the topic the log holds
-- elsewhere (without it, a rare topic's every event in the log is read and
-- joined with the window: a cost that grows with the log). The span is one
-- pass over the window's order rows; `position + 0` keeps the planner from
-- answering min/max through the position index, which would read the log from
-- its first position up to the window. The topic index alone answers which
-- positions are the topic's; payloads are read for the page's entries only.
WITH span AS MATERIALIZED (
    SELECT min(w.position + 0) AS lo, max(w.position + 0) AS hi
    FROM herald_log AS w
    WHERE w.seq > %(after)s AND w.seq <= %(bound)s
), page AS (
    SELECT p.seq, p.position
    FROM herald_log AS p
    WHERE p.seq > %(after)s AND p.seq <= %(bound)s
      AND p.position IN (
          SELECT t.position
          FROM herald_events AS t
          WHERE t.topic = ANY (CAST(%(exact)s AS text[]))
            AND t.position >= (SELECT span.lo FROM span)
            AND t.position <= (SELECT span.hi FROM span))
    ORDER BY p.seq
    LIMIT %(limit)s
)
SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.dedupe_key, e.aggregate_id,
       e.aggregate_version, e.trace_id, e.occurred_at, e.recorded_at
FROM page AS l
JOIN herald_events AS e ON e.position = l.position
ORDER BY l.seq

-- read_page_patterns --
-- A page of topics named exactly or by LIKE patterns after %(after)s up to %(bound)s (psycopg placeholders): the window read in seq order.
SELECT l.seq, e.position, e.topic, e.payload, e.delivery, e.dedupe_key, e.aggregate_id,
       e.aggregate_version, e.trace_id, e.occurred_at, e.recorded_at
FROM herald_log AS l
JOIN herald_events AS e ON e.position = l.position
WHERE l.seq > %(after)s AND l.seq <= %(bound)s
  AND (e.topic = ANY (CAST(%(exact)s AS text[]))
       OR e.topic LIKE ANY (CAST(%(patterns)s AS text[])))
ORDER BY l.seq
LIMIT %(limit)s
