"""`herald projections check` and `rebuild`, run as the real command."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from herald.config import create_engine
from herald.domain import Build
from herald.outbox import UnitOfWork
from herald.outbox.farm import finish_build
from herald.schema import builds
from tests.acceptance.conftest import assert_ok, connect, herald

pytestmark = pytest.mark.acceptance


def test_check_finds_a_tampered_row_and_rebuild_mends_it(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            for build_id in (1, 2, 3):
                deps = [1] if build_id > 1 else []
                uow.add(
                    Build(
                        build_id,
                        1,
                        f"job{build_id}",
                        f"/nix/{build_id}.drv",
                        "x86_64-linux",
                        dependencies=deps,
                    )
                )
            uow.save()
        with engine.begin() as conn:
            uow = UnitOfWork(conn)
            uow.build(1).start()
            finish_build(uow, 1, 1)  # 2 and 3 finish as "dependency failed"
            uow.save()
    finally:
        engine.dispose()
    assert_ok(herald(db_url, "projections", "check"))

    with connect(db_url) as conn:
        conn.execute(sa.update(builds).where(builds.c.build_id == 2).values(status=0))
        conn.commit()
    result = herald(db_url, "projections", "check", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == [
        {"table": "herald_builds", "key": [2], "kind": "changed", "columns": ["status"]}
    ]
    with connect(db_url) as conn:  # check changed nothing
        assert (
            conn.execute(sa.select(builds.c.status).where(builds.c.build_id == 2)).scalar_one() == 0
        )

    rebuilt = herald(db_url, "projections", "rebuild")
    assert_ok(rebuilt)
    assert "rebuilt from" in rebuilt.stdout
    assert_ok(herald(db_url, "projections", "check"))
    with connect(db_url) as conn:
        assert (
            conn.execute(sa.select(builds.c.status).where(builds.c.build_id == 2)).scalar_one() == 2
        )
