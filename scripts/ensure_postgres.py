"""Make sure the PostgreSQL server for the tests answers; start it if it does not.

Reads HERALD_TEST_DATABASE_URL (default: postgresql://postgres@127.0.0.1:5432/postgres).
If nothing answers and the URL points at this machine, starts the installed
cluster (pg_ctlcluster); if that is impossible, prints one line saying what to
install and exits 1. PostgreSQL tests are never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psycopg
from sqlalchemy.engine import make_url

DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def answers(conninfo: str) -> str | None:
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def start_local_cluster() -> str | None:
    """Start the machine's PostgreSQL cluster(s); None on success, else why not."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return "no PostgreSQL is installed (Debian/Ubuntu: apt-get install postgresql)"
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    clusters = [line.split()[:2] for line in listing.stdout.splitlines() if line.strip()]
    if not clusters:
        return "PostgreSQL is installed but has no cluster (pg_createcluster 15 main --start)"
    for version, name in clusters:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"],
            capture_output=True,
            check=False,
        )
    return None


def main() -> int:
    raw = os.environ.get("HERALD_TEST_DATABASE_URL", DEFAULT)
    url = make_url(raw).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    problem = answers(conninfo)
    if problem is None:
        return 0
    local = url.host in (None, "", "localhost", "127.0.0.1", "::1")
    if not local:
        print(
            f"make test: PostgreSQL at {url.render_as_string()} does not answer ({problem}); "
            "start it or set HERALD_TEST_DATABASE_URL",
            file=sys.stderr,
        )
        return 1
    print(
        f"make test: PostgreSQL does not answer ({problem}); starting the local cluster",
        file=sys.stderr,
    )
    why_not = start_local_cluster()
    if why_not is None:
        for _ in range(30):
            problem = answers(conninfo)
            if problem is None:
                return 0
            time.sleep(1)
        why_not = f"the local cluster did not come up ({problem})"
    print(
        f"make test: needs a PostgreSQL server at {url.render_as_string()}: {why_not}; "
        "or point HERALD_TEST_DATABASE_URL at one",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
