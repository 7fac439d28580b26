"""herald's benchmarks (``make bench``; not part of the test suite).

Each benchmark runs herald and its comparison in the same run and writes its
own marked section of BENCHMARKS.md:

* ``bench.append_throughput`` — append transactions/s against bare psycopg and
  SQLAlchemy, and commit → reader latency (issue #2);
* ``bench.unit_of_work`` — finishing a build through the unit of work against
  the raw append, and one evaluation adding 50,000 builds (issue #3);
* ``bench.consumers`` — the consumer daemon's throughput against a raw read,
  and commit → handler latency (issue #4);
* ``bench.idle`` — an idle ``herald run``'s statements/s and WAL bytes, against
  the same window without it (issue #6, B8);
* ``bench.long_transaction`` — other events' latency while one write
  transaction stays open 30 s, against the xid-horizon approach (issue #6, B6);
* ``bench.replay`` — replaying 1,000,000 events through a no-op handler, with
  a raw read of the same rows for scale (issue #6, B4).
"""
