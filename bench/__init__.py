"""herald's benchmarks: scripts run by hand or by ``make bench``, never by the test suite.

Each script measures one thing against a scratch PostgreSQL database it creates
and drops itself, prints a table, and rewrites its own section of
``BENCHMARKS.md`` at the repository root:

* :mod:`bench.append_throughput` — B1, append transactions/s (1 and 8
  writers; plain psycopg, herald on psycopg, SQLAlchemy without herald and
  herald on SQLAlchemy) and insert → reader latency (issue #2).
"""
