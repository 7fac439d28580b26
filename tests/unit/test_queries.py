"""The named-query file: every block parses, and every name the code uses exists."""

from __future__ import annotations

import re
from pathlib import Path

import herald
from herald.schema.queries import QUERIES, load_queries


def test_blocks_are_split_by_name() -> None:
    text = "-- a --\n-- says a\nSELECT 1\n\n-- b_c --\n-- says b\nSELECT\n  2\n"
    assert load_queries(text) == {"a": "SELECT 1", "b_c": "SELECT\n  2"}


def test_every_query_used_in_the_code_exists() -> None:
    root = Path(herald.__file__).parent
    used = {
        name
        for path in root.rglob("*.py")
        for name in re.findall(r"""(?:query\(|QUERIES\[)["']([a-z_]+)["']""", path.read_text())
    }
    assert used, "the scan found no query names: the pattern is stale"
    assert used <= set(QUERIES), f"missing from queries.sql: {used - set(QUERIES)}"


def test_every_block_has_a_body() -> None:
    assert all(sql and not sql.startswith("--") for sql in QUERIES.values())
