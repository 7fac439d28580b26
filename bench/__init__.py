"""herald's benchmarks (``make bench``; not part of the test suite).

Each benchmark runs herald and its comparison in the same run and writes its
own marked section of BENCHMARKS.md:

* ``bench.append_throughput`` — append transactions/s against bare psycopg and
  SQLAlchemy, and commit → reader latency (issue #2);
* ``bench.unit_of_work`` — finishing a build through the unit of work against
  the raw append, and one evaluation adding 50,000 builds (issue #3).
"""
