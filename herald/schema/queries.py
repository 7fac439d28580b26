"""The named PostgreSQL queries of ``sql/queries.sql``, loaded once into a dict.

A block starts with ``-- name --`` and a one-line comment saying what it is
for. Queries are looked up by name (``QUERIES["read_page"]``) and
executed with bound parameters only.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Final

import sqlalchemy as sa

__all__ = ["QUERIES", "load_queries", "query"]

_HEADER: Final = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split ``text`` into ``{name: sql}`` at ``-- name --`` headers."""
    parts = _HEADER.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        named[name] = "\n".join(lines).strip()
    return named


QUERIES: Final[dict[str, str]] = load_queries(
    resources.files("herald.schema").joinpath("sql/queries.sql").read_text(encoding="utf-8")
)


@cache
def query(name: str) -> sa.TextClause:
    """The named query as a SQLAlchemy text clause (compiled once, cached)."""
    return sa.text(QUERIES[name])
