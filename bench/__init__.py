"""herald's benchmarks (``make bench``; not part of the test suite).

Each benchmark runs herald and its comparison in the same run and writes its
own marked section of BENCHMARKS.md (issue #6 names them B1-B9):

* ``bench.append_throughput`` — B1: append transactions/s against bare
  psycopg, SQLAlchemy and the eventsourcing library's PostgreSQL recorder; B9:
  the same on SQLite against the stdlib sqlite3 module; and commit → reader
  latency (issues #2, #6);
* ``bench.unit_of_work`` — finishing a build through the unit of work against
  the raw append (issue #3);
* ``bench.consumers`` — B3: the consumer daemon's throughput against a raw
  read; B5: commit → handler latency; B9: both on SQLite (issues #4, #6);
* ``bench.idle`` — B8: an idle ``herald run``'s statements/s and WAL bytes,
  against the same window without it;
* ``bench.long_transaction`` — B6: other events' latency while one write
  transaction stays open 30 s, against the xid-horizon approach;
* ``bench.replay`` — B4: replaying 1,000,000 events through a no-op handler,
  with a raw read of the same rows for scale;
* ``bench.bulk`` — B2: one evaluation adding 50,000 builds in one
  transaction, against a raw COPY of the same rows;
* ``bench.scale`` — B7: append and read rates with 10,000,000 events in the
  log, against the same at 100,000;
* ``bench.plot`` — the B5/B6 latency percentiles over time (docs/latency.png),
  from the samples the latency benchmarks keep.
"""
