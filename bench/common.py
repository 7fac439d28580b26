"""What the benchmark scripts share: their report section in BENCHMARKS.md, the
scratch-database options, the file system a scratch file is on, and the way a
failed connection to the server ends a script (one line, exit status 1)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psycopg
import sqlalchemy.exc as sa_exc

__all__ = [
    "DEFAULT_ADMIN",
    "PREAMBLE",
    "add_server_options",
    "filesystem_of",
    "markers",
    "run_script",
    "write_section",
]

#: A new report's first lines (BENCHMARKS.md, when it does not exist yet).
PREAMBLE: Final = """# herald benchmarks

Each benchmark has its own section below, written by its script between its
markers (rerunning a script rewrites its section and nothing else). Figures
are from one machine and one run each; compare them with care.
"""

#: The PostgreSQL server the benchmarks use, as a superuser (``HERALD_BENCH_DATABASE_URL``).
DEFAULT_ADMIN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_script(main: Callable[[], None]) -> None:
    """Run a script's ``main``; a connection to the server that fails is one line.

    A wrong ``--admin`` (or ``--database-url``), a server that is down, a role
    it refuses: ``python -m bench.NAME: cannot connect to PostgreSQL: ...`` on
    stderr, exit status 1, no traceback, no report written. Any other error
    keeps its traceback.
    """
    try:
        main()
    except (psycopg.OperationalError, sa_exc.OperationalError) as exc:
        cause = exc.orig if isinstance(exc, sa_exc.OperationalError) else exc
        text = str(cause).strip()
        if not text.startswith("connection failed"):
            raise
        script = Path(sys.argv[0]).stem
        first = text.splitlines()[0].removeprefix("connection failed: ")
        message = f"python -m bench.{script}: cannot connect to PostgreSQL: {first}"
        raise SystemExit(message) from None


def markers(module: str) -> tuple[str, str]:
    """The begin and end markers of ``module``'s section of BENCHMARKS.md."""
    return (
        f"<!-- {module}: begin (generated; rerun to refresh) -->",
        f"<!-- {module}: end -->",
    )


def write_section(path: Path, module: str, section: str) -> None:
    """Replace ``module``'s section of the report (between its markers) with ``section``;
    a new section goes before the hand-written "Reliability" one, or at the end."""
    begin_mark, end_mark = markers(module)
    text = path.read_text(encoding="utf-8") if path.exists() else PREAMBLE
    begin, end = text.find(begin_mark), text.find(end_mark)
    if begin != -1 and end > begin:
        text = text[:begin] + section.rstrip("\n") + text[end + len(end_mark) :]
    else:
        at = text.find("\n## Reliability")
        text = (
            text.rstrip("\n") + "\n\n" + section
            if at == -1
            else text[:at] + "\n" + section + text[at:]
        )
    path.write_text(text, encoding="utf-8")


def add_server_options(parser: argparse.ArgumentParser, database: str) -> None:
    """``--admin``, ``--database`` (the scratch database, dropped first) and ``--markdown``."""
    parser.add_argument(
        "--admin",
        default=os.environ.get("HERALD_BENCH_DATABASE_URL", DEFAULT_ADMIN),
        help="A superuser's URL on the server.",
    )
    parser.add_argument("--database", default=database, help="The scratch database.")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="The report to update.")


def filesystem_of(path: Path) -> str:
    """The type of the file system ``path`` is on (``ext4``, ``tmpfs``), from /proc/mounts."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return kind
