"""herald's PostgreSQL roles, for real: each login does its part, and nothing else.

Every test creates the four roles with a prefix of its own (roles are
cluster-wide) in its own migrated database, and one LOGIN role per herald
role (plus one in none of them), and connects as those logins. Refusals are
PostgreSQL's own (SQLSTATE 42501, or herald's append-only trigger), never a
check in herald's Python. The roles and logins are dropped at teardown.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from alembic import command
from sqlalchemy.engine import make_url

from herald import operations
from herald.config import create_engine
from herald.consumers import Consumer, Daemon, store
from herald.domain import Evaluation
from herald.errors import AppendOnlyViolation, DatabaseError, NotMigrated, UsageError
from herald.outbox import (
    LogEntry,
    LogReader,
    NewEvent,
    Sequencer,
    UnitOfWork,
    append,
    append_many,
    sync_catalogue,
)
from herald.outbox.farm import NewBuild, add_evaluation, finish_build
from herald.outbox.projector import rebuild
from herald.schema import metadata, migrate
from herald.schema.dberrors import sqlstate, translated
from herald.schema.roles import ROLES, create_roles, role_statements, script, validate_prefix

pytestmark = pytest.mark.postgresql

#: The parts, and the suffix of the login role created for each.
LOGINS = {"owner": "o", "writer": "w", "daemon": "d", "auditor": "a", "nobody": "n"}
APPEND = "herald_append(text, jsonb, text, text, text, timestamptz)"
SEQUENCE_FUNCTION = "herald_sequence_v1()"
TABLES = sorted([*metadata.tables, "alembic_version"])
PROJECTIONS = [
    "herald_evaluations",
    "herald_builds",
    "herald_build_dependencies",
    "herald_build_steps",
    "herald_build_messages",
]
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
READ_UPDATE = {"SELECT", "INSERT", "UPDATE"}
READ_WRITE = {"SELECT", "INSERT", "UPDATE", "DELETE"}

#: What each role may do to each table; every other privilege on every table is refused.
EXPECTED: dict[str, dict[str, set[str]]] = {
    "writer": {
        "herald_events": {"SELECT", "INSERT"},
        "herald_topics": {"SELECT"},
        "alembic_version": {"SELECT"},
        **dict.fromkeys(PROJECTIONS, READ_UPDATE),
    },
    "daemon": {
        "herald_events": {"SELECT"},
        "herald_topics": {"SELECT"},
        "herald_log": {"SELECT", "INSERT"},
        "herald_sequencer": {"SELECT", "UPDATE"},
        "herald_consumers": READ_UPDATE,
        "herald_deliveries": {"SELECT", "INSERT"},
        "herald_parked": READ_WRITE,
        "herald_operations": {"SELECT", "INSERT"},
        "alembic_version": {"SELECT"},
        **{table: {"SELECT"} for table in PROJECTIONS},
    },
    "auditor": {table: {"SELECT"} for table in TABLES},
    "nobody": {},
}
SEQUENCES = ("herald_events_position_seq", "herald_deliveries_id_seq", "herald_operations_id_seq")
SEQUENCE_USAGE = {
    "writer": {"herald_events_position_seq"},
    "daemon": {"herald_deliveries_id_seq", "herald_operations_id_seq"},
    "auditor": set(),
    "nobody": set(),
}

INSERT_EVENT = (
    "INSERT INTO herald_events (topic, payload, delivery, occurred_at) "
    "VALUES ('acme.tick', '{}', 'ephemeral', now())"
)
INSERT_DELIVERY = (
    "INSERT INTO herald_deliveries (consumer, seq, attempt, outcome, started_at, duration_ms) "
    "VALUES ('x', 1, 1, 'delivered', now(), 0)"
)


@dataclass
class Roles:
    """herald's roles in one test database, and an engine per login."""

    prefix: str
    url: str
    admin: sa.Engine
    engines: dict[str, sa.Engine] = field(default_factory=dict)

    def role(self, part: str) -> str:
        return f"{self.prefix}_{part}"

    def login(self, part: str) -> str:
        return f"{self.prefix}_{LOGINS[part]}_login"

    def engine(self, part: str) -> sa.Engine:
        """An engine that connects as the login of ``part`` (owner, writer, daemon, ...)."""
        if part not in self.engines:
            url = make_url(self.url).set(username=self.login(part))
            self.engines[part] = create_engine(url)
        return self.engines[part]

    def scalar(self, sql: str, **params: Any) -> Any:
        """One value, read as the superuser."""
        with self.admin.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()


def drop_roles(url: str, prefix: str) -> None:
    """Drop every role named ``{prefix}_...`` and what it owns or was granted in the
    database at ``url`` (its tables go back to postgres first)."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (prefix + "\\_%",)
            )
        ]
        for name in names:
            quoted = f'"{name}"'
            conn.execute(f"REASSIGN OWNED BY {quoted} TO postgres")
            conn.execute(f"DROP OWNED BY {quoted}")
        for name in names:
            conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def roles(pg_url: str) -> Iterator[Roles]:
    """The roles (a fresh prefix) in a fresh migrated database, with a login for each."""
    prefix = f"hr{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url)
    state = Roles(prefix, pg_url, admin)
    try:
        with admin.connect() as conn:
            created = create_roles(conn, prefix)
        assert created == [role.name(prefix) for role in ROLES]
        with admin.begin() as conn:
            for part in LOGINS:
                conn.exec_driver_sql(f"CREATE ROLE {state.login(part)} LOGIN")
                if part != "nobody":
                    conn.exec_driver_sql(f"GRANT {state.role(part)} TO {state.login(part)}")
            # The recipe for the login that migrates: what it creates belongs to the role.
            conn.exec_driver_sql(
                f"ALTER ROLE {state.login('owner')} SET ROLE {state.role('owner')}"
            )
        yield state
    finally:
        for engine in state.engines.values():
            engine.dispose()
        admin.dispose()
        drop_roles(pg_url, prefix)


def refused(engine: sa.Engine, sql: str, **params: Any) -> None:
    """``sql`` fails with PostgreSQL's permission denied (SQLSTATE 42501)."""
    with pytest.raises(sa_exc.DBAPIError) as info, engine.begin() as conn:
        conn.execute(sa.text(sql), params)
    assert isinstance(info.value.orig, psycopg.errors.InsufficientPrivilege), info.value


def refused_by_herald(call: Callable[[], object]) -> DatabaseError:
    """``call()`` raises herald's DatabaseError caused by permission denied."""
    with pytest.raises(DatabaseError) as info:
        call()
    assert sqlstate(info.value.__cause__ or info.value) == "42501", repr(info.value.__cause__)
    return info.value


def append_as(engine: sa.Engine, *ns: int, topic: str = "acme.tick") -> list[int]:
    """Append one event per ``n`` in one transaction (as the engine's login)."""
    with engine.begin() as conn:
        return append_many(conn, [NewEvent(topic, {"n": n}) for n in ns])


def log_rows(roles: Roles) -> list[tuple[int, int]]:
    with roles.admin.connect() as conn:
        return [
            (int(seq), int(position))
            for seq, position in conn.execute(
                sa.text("SELECT seq, position FROM herald_log ORDER BY seq")
            )
        ]


def acls(engine: sa.Engine, prefix: str) -> list[tuple[Any, ...]]:
    """Every privilege and owner of herald's objects, the schema and the roles, as text."""
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.text(
                    "SELECT 'rel', relname, relowner::regrole::text, relacl::text FROM pg_class "
                    "WHERE relname = ANY(:tables) OR relname LIKE 'herald\\_%\\_seq' "
                    "UNION ALL SELECT 'fn', proname, proowner::regrole::text, proacl::text "
                    "FROM pg_proc WHERE proname LIKE 'herald\\_%' "
                    "UNION ALL SELECT 'schema', nspname, nspowner::regrole::text, nspacl::text "
                    "FROM pg_namespace WHERE nspname = current_schema() "
                    "UNION ALL SELECT 'role', rolname, rolcanlogin::text, "
                    "shobj_description(oid, 'pg_authid') FROM pg_roles "
                    "WHERE rolname LIKE :prefix ORDER BY 1, 2"
                ),
                {"tables": TABLES, "prefix": prefix + "\\_%"},
            )
        ]


# -- the roles and their privileges ------------------------------------------------------


def test_every_role_has_exactly_its_privileges(roles: Roles) -> None:
    owner = roles.role("owner")
    with roles.admin.connect() as conn:
        herald_tables = set(
            conn.execute(
                sa.text(
                    "SELECT relname FROM pg_class WHERE relkind = 'r' "
                    "AND relnamespace = current_schema()::regnamespace"
                )
            ).scalars()
        )
        assert herald_tables == set(TABLES)
        owners: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT relname, relowner::regrole::text FROM pg_class "
                    "WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'S')"
                )
            ).all()
        )
        assert set(owners.values()) == {owner}, owners
        functions: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT proname, proowner::regrole::text FROM pg_proc "
                    "WHERE proname IN ('herald_append', 'herald_refuse_change', "
                    "'herald_sequence_v1')"
                )
            ).all()
        )
        assert functions == {
            "herald_append": owner,
            "herald_refuse_change": owner,
            "herald_sequence_v1": owner,
        }
        assert conn.execute(
            sa.text(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE :p AND rolcanlogin ORDER BY 1"
            ),
            {"p": roles.prefix + "\\_%\\_login"},
        ).scalars().all() == sorted(roles.login(part) for part in LOGINS)
        assert not conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names) "
                "AND (rolcanlogin OR rolsuper OR rolcreaterole OR rolcreatedb)"
            ),
            {"names": [role.name(roles.prefix) for role in ROLES]},
        ).scalar_one()
        # No EXECUTE for PUBLIC: the function's ACL names the owner and the writer only.
        assert conn.execute(
            sa.text("SELECT proacl::text[] FROM pg_proc WHERE proname = 'herald_append'")
        ).scalar_one() == [f"{owner}=X/{owner}", f"{roles.role('writer')}=X/{owner}"]
        assert conn.execute(
            sa.text("SELECT proacl::text[] FROM pg_proc WHERE proname = 'herald_sequence_v1'")
        ).scalar_one() == [f"{owner}=X/{owner}", f"{roles.role('daemon')}=X/{owner}"]

        def may(function: str, *args: str) -> bool:
            placeholders = ", ".join(f":a{i}" for i in range(len(args)))
            params = {f"a{i}": arg for i, arg in enumerate(args)}
            return bool(
                conn.execute(sa.text(f"SELECT {function}({placeholders})"), params).scalar_one()
            )

        for part, expected in EXPECTED.items():
            grantee = roles.role(part) if part != "nobody" else roles.login(part)
            for table in TABLES:
                allowed = {p for p in PRIVILEGES if may("has_table_privilege", grantee, table, p)}
                assert allowed == expected.get(table, set()), (part, table)
            for sequence in SEQUENCES:
                usage = may("has_sequence_privilege", grantee, sequence, "USAGE")
                assert usage == (sequence in SEQUENCE_USAGE[part]), (part, sequence)
            assert may("has_function_privilege", grantee, APPEND, "EXECUTE") == (part == "writer")
            ordering = may("has_function_privilege", grantee, SEQUENCE_FUNCTION, "EXECUTE")
            assert ordering == (part == "daemon"), part
            assert not may("has_schema_privilege", grantee, "public", "CREATE"), part
        for p in PRIVILEGES:
            assert may("has_table_privilege", owner, "herald_events", p)
        assert may("has_schema_privilege", owner, "public", "CREATE")


def test_creating_the_roles_again_is_harmless_and_undoes_extra_grants(roles: Roles) -> None:
    before = acls(roles.admin, roles.prefix)
    with roles.admin.connect() as conn:
        assert create_roles(conn, roles.prefix) == []
    assert acls(roles.admin, roles.prefix) == before
    with roles.admin.begin() as conn:
        conn.exec_driver_sql(f"GRANT DELETE ON herald_events TO {roles.role('writer')}")
        conn.exec_driver_sql(f"GRANT INSERT ON herald_log TO {roles.role('auditor')}")
        conn.exec_driver_sql(f"GRANT EXECUTE ON FUNCTION {APPEND} TO PUBLIC")
        conn.exec_driver_sql(f"ALTER ROLE {roles.role('daemon')} LOGIN")
    assert acls(roles.admin, roles.prefix) != before
    with roles.admin.connect() as conn:
        assert create_roles(conn, roles.prefix) == []
    assert acls(roles.admin, roles.prefix) == before
    # The writer's logins still work after a run: nothing was dropped and recreated.
    append_as(roles.engine("writer"), 1)


def test_the_script_is_the_statements_in_one_transaction() -> None:
    statements = role_statements("acme")
    text = script("acme")
    assert text.count("BEGIN;") == 1
    assert text.rstrip().endswith("COMMIT;")
    assert all(statement + ";" in text for statement in statements)
    assert "CREATE ROLE acme_owner NOLOGIN" in text
    assert f"REVOKE ALL ON FUNCTION {APPEND} FROM PUBLIC" in text
    assert f"REVOKE ALL ON FUNCTION {SEQUENCE_FUNCTION} FROM PUBLIC" in text


@pytest.mark.parametrize("prefix", ["Bad-Name", "1herald", "", "herald;drop", "a" * 41, "hé"])
def test_a_prefix_that_is_not_a_role_name_is_refused(prefix: str) -> None:
    with pytest.raises(UsageError) as info:
        role_statements(prefix)
    assert "\n" not in str(info.value)
    assert "lowercase letters, digits and _" in str(info.value)
    assert validate_prefix("a" * 40) == "a" * 40


# -- writer ---------------------------------------------------------------------------------


def test_the_writer_appends_and_keeps_the_projections(roles: Roles) -> None:
    writer = roles.engine("writer")
    with writer.begin() as conn:
        position = append(conn, "build_queued", {"build_id": 99})
        by_sql = conn.execute(
            sa.text("SELECT herald_append('acme.deployed', CAST(:payload AS jsonb))"),
            {"payload": '{"n": 1}'},
        ).scalar_one()
    assert by_sql > position
    with writer.begin() as conn:
        uow = UnitOfWork(conn)
        uow.add(Evaluation("trace-1", 7))
        add_evaluation(
            uow,
            "trace-1",
            1,
            [
                NewBuild(1, "a", "/nix/store/a.drv", "x86_64-linux"),
                NewBuild(2, "b", "/nix/store/b.drv", "x86_64-linux", dependencies=(1,)),
            ],
        )
        uow.save()
    with writer.begin() as conn:
        uow = UnitOfWork(conn)
        uow.build(1).start()
        uow.save()
    with writer.begin() as conn:
        uow = UnitOfWork(conn)
        finish_build(uow, 1, 1)  # a failure: build 2 finishes with it
        uow.save()
    with writer.connect() as conn:
        states = conn.execute(
            sa.text("SELECT build_id, state, status FROM herald_builds ORDER BY build_id")
        ).all()
    assert [tuple(row) for row in states] == [(1, "finished", 1), (2, "finished", 2)]
    events = int(roles.scalar("SELECT count(*) FROM herald_events"))
    assert events >= 8
    # The writer cannot order what it wrote, nor touch anything but its own tables.
    assert log_rows(roles) == []
    for sql in (
        "UPDATE herald_events SET topic = topic",
        "DELETE FROM herald_events",
        "TRUNCATE herald_events",
        "INSERT INTO herald_log (seq, position) SELECT 1, min(position) FROM herald_events",
        "UPDATE herald_log SET seq = seq",
        "DELETE FROM herald_log",
        "UPDATE herald_sequencer SET last_seq = 0",
        "INSERT INTO herald_consumers (name) VALUES ('x')",
        "UPDATE herald_consumers SET owner = NULL",
        INSERT_DELIVERY,
        "DELETE FROM herald_parked",
        "INSERT INTO herald_operations (action, actor, detail) VALUES ('prune', 'x', '{}')",
        "UPDATE herald_topics SET delivery = delivery",
        "UPDATE alembic_version SET version_num = version_num",
        "DELETE FROM herald_builds",
        "TRUNCATE herald_builds",
    ):
        refused(writer, sql)
    assert int(roles.scalar("SELECT count(*) FROM herald_events")) == events
    # Reading the log is not the writer's business either, nor rebuilding the projections.
    refused_by_herald(lambda: list(LogReader(writer).until_head()))

    def rebuild_as_writer() -> None:
        with translated(), writer.begin() as conn:  # as `herald projections rebuild` does
            rebuild(conn)

    refused_by_herald(rebuild_as_writer)
    with roles.engine("owner").begin() as conn:
        assert rebuild(conn) > 0
    assert int(roles.scalar("SELECT count(*) FROM herald_builds")) == 2


# -- daemon ---------------------------------------------------------------------------------


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def test_the_daemon_orders_the_log_and_runs_consumers(roles: Roles) -> None:
    writer, daemon = roles.engine("writer"), roles.engine("daemon")
    positions = append_as(writer, 1, 2, 3)
    with daemon.connect() as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
        conn.rollback()
        assert Sequencer().cycle(conn) == 3
    assert log_rows(roles) == list(zip([1, 2, 3], positions, strict=True))

    delivered: list[int] = []
    failed_once: set[int] = set()

    def handler(entry: LogEntry) -> None:
        if entry.payload["n"] == 2 and entry.seq not in failed_once:
            failed_once.add(entry.seq)
            raise ValueError("not yet")
        delivered.append(entry.payload["n"])

    member = Consumer(
        "roles-test", ["acme.*"], handler, max_attempts=1, retry_initial=0.01, retry_max=0.05
    )

    def offset() -> int:
        with daemon.connect() as conn:
            row = store.consumer_row(conn, "roles-test")
        return row.offset if row is not None else 0

    def parked() -> list[int]:
        with daemon.connect() as conn:
            return [row.seq for row in store.parked_rows(conn, "roles-test")]

    stop = threading.Event()
    runner = Daemon(daemon, [member], poll_interval=0.05, claim_interval=0.1)
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        append_as(writer, 4)  # ordered by the daemon's own sequencer
        _until(lambda: offset() == 4, 10, "the consumer's offset reaching 4")
        assert parked() == [2]
        assert delivered == [1, 3, 4]
        with daemon.begin() as conn:  # `herald parked redeliver`
            assert store.request_redelivery(conn, "roles-test", 2) == [2]
        _until(lambda: parked() == [], 10, "the redelivery of seq 2")
        assert delivered == [1, 3, 4, 2]
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    with daemon.begin() as conn:  # `herald consumers reset` and `herald replay` record this
        operations.record(conn, "reset", "roles-test", {"from": 4, "to": 4})
    outcomes = roles.scalar(
        "SELECT string_agg(outcome, ',' ORDER BY id) FROM herald_deliveries WHERE seq = 2"
    )
    assert outcomes == "parked,delivered"
    assert roles.scalar("SELECT db_user FROM herald_operations") == roles.login("daemon")

    # It cannot append, nor rewrite what it ordered, nor write the projections.
    refused_by_herald(lambda: append_as(daemon, 5))
    for sql in (
        "SELECT herald_append('acme.tick', CAST('{}' AS jsonb))",
        INSERT_EVENT,
        "UPDATE herald_events SET topic = topic",
        "DELETE FROM herald_events",
        "DELETE FROM herald_log",
        "UPDATE herald_log SET seq = seq",
        "TRUNCATE herald_log",
        "DELETE FROM herald_consumers",
        "DELETE FROM herald_deliveries",
        "UPDATE herald_deliveries SET outcome = outcome",
        "DELETE FROM herald_operations",
        "UPDATE herald_builds SET priority = priority",
        "INSERT INTO herald_evaluations SELECT * FROM herald_evaluations",
        "UPDATE herald_topics SET delivery = delivery",
    ):
        refused(daemon, sql)
    assert [seq for seq, _ in log_rows(roles)] == [1, 2, 3, 4]


# -- auditor --------------------------------------------------------------------------------


def test_the_auditor_reads_everything_and_writes_nothing(
    roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    writer, daemon, auditor = (roles.engine(p) for p in ("writer", "daemon", "auditor"))
    append_as(writer, 1, 2)
    with daemon.connect() as conn:
        assert Sequencer().cycle(conn) == 2
    append_as(writer, 3)  # committed, not ordered: the auditor cannot order it
    with auditor.connect() as conn:
        counts = {
            table: int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in TABLES
        }
        assert migrate.current_revision(conn) == migrate.head_revision()
    assert counts["herald_events"] == 3
    assert counts["herald_log"] == 2
    assert counts["herald_topics"] > 0

    caplog.set_level(logging.DEBUG, logger="herald.sequencer")
    reader = LogReader(auditor)
    for _ in range(2):
        assert [(e.seq, e.payload["n"]) for e in reader.until_head()] == [(1, 1), (2, 2)]
    refusals = [r for r in caplog.records if "may not order" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.DEBUG
    with auditor.connect() as conn:
        assert Sequencer().cycle(conn) == 0
    assert len(log_rows(roles)) == 2

    refused_by_herald(lambda: append_as(auditor, 4))
    for sql in (
        "SELECT herald_append('acme.tick', CAST('{}' AS jsonb))",
        "SELECT * FROM herald_sequence_v1()",
        "INSERT INTO herald_log (seq, position) SELECT 3, max(position) FROM herald_events",
        "SELECT * FROM herald_sequencer FOR UPDATE",
        "UPDATE herald_sequencer SET last_seq = last_seq",
        "INSERT INTO herald_consumers (name) VALUES ('x')",
        "UPDATE herald_consumers SET owner = NULL",
        INSERT_DELIVERY,
        "DELETE FROM herald_parked",
        "INSERT INTO herald_operations (action, actor, detail) VALUES ('prune', 'x', '{}')",
        "UPDATE herald_builds SET priority = priority",
        "UPDATE herald_topics SET delivery = delivery",
        "DELETE FROM alembic_version",
    ):
        refused(auditor, sql)
    # A login in none of the roles cannot even read.
    refused(roles.engine("nobody"), "SELECT count(*) FROM herald_events")
    refused(roles.engine("nobody"), "SELECT herald_append('acme.tick', CAST('{}' AS jsonb))")


def test_a_cycle_still_translates_every_other_error(pg_empty_url: str) -> None:
    engine = create_engine(pg_empty_url)
    try:
        with engine.connect() as conn, pytest.raises(NotMigrated):
            Sequencer().cycle(conn)
    finally:
        engine.dispose()


# -- owner ----------------------------------------------------------------------------------


def test_the_owner_migrates(roles: Roles) -> None:
    owner = roles.engine("owner")
    with owner.connect() as conn:
        # The login's default role (ALTER ROLE ... SET ROLE): what it creates is the role's.
        assert conn.execute(sa.text("SELECT current_user")).scalar_one() == roles.role("owner")
        conn.rollback()
        migrate.upgrade(conn)
        command.downgrade(migrate.alembic_config(conn), "0003")
        conn.commit()
        assert migrate.current_revision(conn) == "0003"
        conn.rollback()
        migrate.upgrade(conn)
        with conn.begin():
            assert sync_catalogue(conn) > 0
        assert migrate.current_revision(conn) == migrate.head_revision()
    assert roles.scalar(
        "SELECT relowner::regrole::text FROM pg_class WHERE relname = 'herald_operations'"
    ) == roles.role("owner")
    # A table a migration creates has no grants until the roles are brought up to date.
    grant = "SELECT has_table_privilege(:role, 'herald_operations', 'INSERT')"
    assert roles.scalar(grant, role=roles.role("daemon")) is False
    with roles.admin.connect() as conn:
        assert create_roles(conn, roles.prefix) == []
    assert roles.scalar(grant, role=roles.role("daemon")) is True


def test_the_owner_prunes_only_with_the_setting(roles: Roles) -> None:
    writer, daemon, owner = (roles.engine(p) for p in ("writer", "daemon", "owner"))
    positions = append_as(writer, 1, 2, 3)
    with daemon.connect() as conn:
        assert Sequencer().cycle(conn) == 3
    with daemon.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO herald_deliveries (consumer, seq, attempt, outcome, started_at, "
                "duration_ms) SELECT 'c', seq, 1, 'delivered', now(), 1 FROM herald_log"
            )
        )

    for sql in ("DELETE FROM herald_log WHERE seq <= 2", "DELETE FROM herald_events"):
        with pytest.raises(AppendOnlyViolation), translated(), owner.begin() as conn:
            conn.execute(sa.text(sql))

    with translated(), owner.begin() as conn:
        conn.execute(sa.text("SET LOCAL herald.prune = 'on'"))
        conn.execute(sa.text("DELETE FROM herald_deliveries WHERE seq <= 2"))
        pruned = (
            conn.execute(sa.text("DELETE FROM herald_log WHERE seq <= 2 RETURNING position"))
            .scalars()
            .all()
        )
        conn.execute(
            sa.text("DELETE FROM herald_events WHERE position = ANY(:positions)"),
            {"positions": list(pruned)},
        )
        operations.record(conn, "prune", None, {"from": 1, "to": 2, "events": len(pruned)})
        with pytest.raises(sa_exc.DBAPIError) as info, conn.begin_nested():
            conn.execute(sa.text("UPDATE herald_events SET topic = topic"))
        assert sqlstate(info.value) == "HE001"  # UPDATE: refused even while pruning

    assert sorted(pruned) == positions[:2]
    assert log_rows(roles) == [(3, positions[2])]
    assert roles.scalar("SELECT count(*) FROM herald_events") == 1
    assert roles.scalar("SELECT string_agg(seq::text, ',') FROM herald_deliveries") == "3"
    assert roles.scalar("SELECT action || ' by ' || db_user FROM herald_operations") == (
        f"prune by {roles.role('owner')}"
    )
    # SET LOCAL ended with the transaction: the log is append-only again.
    with pytest.raises(AppendOnlyViolation), translated(), owner.begin() as conn:
        conn.execute(sa.text("DELETE FROM herald_log"))
    with pytest.raises(AppendOnlyViolation), translated(), owner.begin() as conn:
        conn.execute(sa.text("TRUNCATE herald_log"))
    assert len(log_rows(roles)) == 1
