"""`herald demo`: the farm day, run by the real command, checked against the database."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from herald.schema import build_messages, builds, evaluations
from tests.acceptance.conftest import assert_ok, connect, event_rows, herald

pytestmark = pytest.mark.acceptance


def test_the_farm_day(db_url: str) -> None:
    result = herald(db_url, "demo", "--builds", "120", "--writers", "3")
    assert_ok(result)
    assert "dense, no gaps" in result.stdout
    assert "timeline of build 1 " in result.stdout
    with connect(db_url) as conn:
        states = set(conn.execute(sa.select(evaluations.c.state)).scalars())
        outcome: dict[int | None, int] = dict(
            conn.execute(
                sa.select(builds.c.status, sa.func.count()).group_by(builds.c.status)
            ).all()
        )
        messages: dict[str, str] = dict(
            conn.execute(
                sa.select(build_messages.c.message_id, build_messages.c.state).where(
                    build_messages.c.build_id == 7
                )
            ).all()
        )
        build_1 = conn.execute(
            sa.select(builds.c.status, builds.c.generation).where(builds.c.build_id == 1)
        ).one()
    assert states == {"added", "cached", "failed"}
    assert messages == {"ci-1": "applied", "ci-2": "ignored"}
    assert tuple(build_1) == (0, 2), "build 1 was restarted and succeeded"
    finished = [
        row.payload
        for row in event_rows(db_url)
        if row.topic == "build_finished" and row.payload["build_id"] == 1
    ]
    assert [(p["status"], p["generation"]) for p in finished] == [(1, 1), (0, 2)]
    dependents = finished[0]["dependent_ids"]
    assert dependents, "the failure took no dependent with it"
    assert outcome.get(2) == len(dependents), "every listed dependent is 'dependency failed'"
    assert outcome.get(0) == 120 - len(dependents)
