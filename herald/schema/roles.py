"""PostgreSQL roles for least privilege: one NOLOGIN role for each part of herald.

``herald db roles`` creates four roles named with a prefix (default
``herald``) and gives each exactly the privileges its part needs:

* ``{prefix}_owner`` owns every herald table and function and may create in
  herald's schema: ``herald db upgrade``, ``herald prune`` and ``herald
  projections rebuild`` (which empties the projections). The
  append-only trigger refuses its UPDATEs and TRUNCATEs like anyone's, and
  its DELETEs unless the transaction set ``herald.prune``.
* ``{prefix}_writer`` appends events (Python, and ``herald_append`` in SQL)
  and writes the projections: what Hydra's evaluator and queue runner do.
* ``{prefix}_daemon`` orders the log and runs the consumers (``herald run``),
  and is what ``herald parked``, ``herald consumers reset`` and ``herald
  replay`` need. It cannot append.
* ``{prefix}_auditor`` reads every herald table and writes nothing.

The roles cannot log in: an operator grants them to login roles
(``GRANT herald_writer TO hydra;``). What a login creates belongs to the
login, not to its roles, so the login that migrates also takes the owner
role as its default (``ALTER ROLE deploy SET ROLE herald_owner;``): tables a
migration creates then belong to the owner too. A role is cluster-wide, its
privileges are per database; the statements are idempotent (run them again
after every ``herald db upgrade``, so that new tables get their grants) and
name tables unqualified, resolved through the ``search_path`` like herald's
own queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import RESERVED_WORDS

from herald.errors import UsageError
from herald.schema.dberrors import translated
from herald.schema.tables import (
    PROJECTIONS,
    consumers,
    deliveries,
    events,
    log_order,
    metadata,
    operations,
    parked,
    sequencer_state,
    topics,
)

__all__ = [
    "DEFAULT_PREFIX",
    "ROLES",
    "Role",
    "create_roles",
    "role_names",
    "role_statements",
    "script",
    "validate_prefix",
]

#: The prefix of the role names unless one is given.
DEFAULT_PREFIX: Final = "herald"

#: The longest prefix: the longest role name (``{prefix}_auditor``) stays far
#: below PostgreSQL's 63 characters.
MAX_PREFIX_LENGTH: Final = 40

_PREFIX = re.compile(r"[a-z][a-z0-9_]*")

#: Alembic's table of the schema revision (not in herald's metadata).
ALEMBIC_VERSION: Final = "alembic_version"

#: ``herald_append``'s signature, as ALTER FUNCTION, GRANT and REVOKE name it.
APPEND_FUNCTION: Final = "herald_append(text, jsonb, text, text, text, timestamptz)"

#: The append-only trigger function (0001_log, replaced by 0004_operations).
REFUSE_FUNCTION: Final = "herald_refuse_change()"

#: The sequencer's cycle (0005_sequence_function): the daemon's to call.
SEQUENCE_FUNCTION: Final = "herald_sequence_v1()"

#: The sequences of herald's bigserial columns (PostgreSQL names them table_column_seq).
EVENTS_SEQUENCE: Final = f"{events.name}_position_seq"
DELIVERIES_SEQUENCE: Final = f"{deliveries.name}_id_seq"
OPERATIONS_SEQUENCE: Final = f"{operations.name}_id_seq"
SEQUENCES: Final = (EVENTS_SEQUENCE, DELIVERIES_SEQUENCE, OPERATIONS_SEQUENCE)


@dataclass(frozen=True, slots=True)
class Role:
    """One of herald's roles: its name's suffix and what it may do."""

    suffix: str
    description: str

    def name(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The role's name with ``prefix`` (which must be valid)."""
        return f"{prefix}_{self.suffix}"


OWNER = Role(
    "owner",
    "owns herald's tables and functions: `herald db upgrade`, `herald prune`, "
    "`herald projections rebuild`",
)
WRITER = Role(
    "writer",
    "appends events (Python, SQL herald_append) and writes the projections",
)
DAEMON = Role(
    "daemon",
    "`herald run` (orders the log, runs consumers), `herald parked`, "
    "`herald consumers reset`, `herald replay`; cannot append",
)
AUDITOR = Role("auditor", "reads every herald table; writes nothing")

#: herald's roles, most privileged first.
ROLES: Final = (OWNER, WRITER, DAEMON, AUDITOR)

_SELECT = ("SELECT",)
_READ_APPEND = ("SELECT", "INSERT")
_READ_UPDATE = ("SELECT", "INSERT", "UPDATE")
_READ_WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")

#: Table privileges of the writer: append (and read back dedupe keys and
#: aggregates), validate against the catalogue, keep the projections up to
#: date. Emptying them (`herald projections rebuild`) is the owner's.
WRITER_TABLES: Final[dict[str, tuple[str, ...]]] = {
    events.name: _READ_APPEND,
    topics.name: _SELECT,
    ALEMBIC_VERSION: _SELECT,
    **{table.name: _READ_UPDATE for table in PROJECTIONS},
}

#: Table privileges of the daemon: order the log (the sequencer), run consumers
#: (offsets, delivery records, parked events), record resets and replays.
DAEMON_TABLES: Final[dict[str, tuple[str, ...]]] = {
    events.name: _SELECT,
    topics.name: _SELECT,
    log_order.name: _READ_APPEND,
    # UPDATE: the cycle locks the state row (FOR UPDATE) and advances it.
    sequencer_state.name: ("SELECT", "UPDATE"),
    consumers.name: _READ_UPDATE,
    deliveries.name: _READ_APPEND,
    parked.name: _READ_WRITE,
    operations.name: _READ_APPEND,
    ALEMBIC_VERSION: _SELECT,
    **{table.name: _SELECT for table in PROJECTIONS},
}

#: Every table the roles cover: herald's, in creation order, and Alembic's.
TABLES: Final = (*(table.name for table in metadata.sorted_tables), ALEMBIC_VERSION)


def validate_prefix(prefix: str) -> str:
    """``prefix`` if it makes valid role names; :class:`UsageError` otherwise."""
    if len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX.fullmatch(prefix):
        raise UsageError(
            f"role prefix {prefix!r}: use lowercase letters, digits and _, starting with a "
            f"letter, at most {MAX_PREFIX_LENGTH} characters"
        )
    return prefix


def role_names(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """The role names for ``prefix``, by suffix (owner, writer, daemon, auditor)."""
    validate_prefix(prefix)
    return {role.suffix: role.name(prefix) for role in ROLES}


_PLAIN = re.compile(r"[a-z_][a-z0-9_]*")


def _ident(name: str) -> str:
    """``name`` as an SQL identifier, quoted where PostgreSQL needs it."""
    if _PLAIN.fullmatch(name) and name not in RESERVED_WORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _create_role(name: str, description: str) -> list[str]:
    # A concurrent run may create the role between the test and the CREATE:
    # duplicate_object is then as good as success.
    create = (
        "DO $$\nBEGIN\n"
        f"    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(name)}) THEN\n"
        f"        CREATE ROLE {_ident(name)} NOLOGIN;\n"
        "    END IF;\n"
        "EXCEPTION WHEN duplicate_object THEN NULL;\n"
        "END $$"
    )
    return [
        create,
        f"ALTER ROLE {_ident(name)} NOLOGIN",
        f"COMMENT ON ROLE {_ident(name)} IS {_literal('herald: ' + description)}",
    ]


def _schema_grants(names: dict[str, str]) -> str:
    """USAGE on herald's schema (the one holding herald_events) for all, CREATE for the owner."""
    others = [names["writer"], names["daemon"], names["auditor"]]
    return (
        "DO $$\nDECLARE\n    herald_schema text;\nBEGIN\n"
        "    SELECT n.nspname INTO herald_schema FROM pg_class c\n"
        "        JOIN pg_namespace n ON n.oid = c.relnamespace\n"
        f"        WHERE c.oid = {_literal(events.name)}::regclass;\n"
        "    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', herald_schema, "
        f"{_literal(names['owner'])});\n"
        "    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I, %I, %I', herald_schema, "
        f"{', '.join(_literal(name) for name in others)});\n"
        "END $$"
    )


def _grants(privileges: dict[str, tuple[str, ...]], role: str) -> list[str]:
    """GRANT statements for ``privileges`` (table -> privileges), one per privilege set."""
    by_set: dict[tuple[str, ...], list[str]] = {}
    for table, granted in privileges.items():
        by_set.setdefault(granted, []).append(table)
    return [
        f"GRANT {', '.join(granted)} ON TABLE {', '.join(map(_ident, tables))} TO {_ident(role)}"
        for granted, tables in by_set.items()
    ]


def role_statements(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The SQL that creates herald's roles (``prefix``) and grants their privileges.

    Idempotent, and meant to run in one transaction in herald's (migrated)
    database, as a superuser (it creates roles and gives tables away).
    Privileges the roles hold beyond these are revoked first, so a second
    run leaves exactly what a first run on a new database would. Raises
    :class:`UsageError` for a prefix that is not valid.
    """
    names = role_names(prefix)
    owner, writer, daemon, auditor = (
        _ident(names[suffix]) for suffix in ("owner", "writer", "daemon", "auditor")
    )
    statements: list[str] = []
    for role in ROLES:
        statements += _create_role(role.name(prefix), role.description)
    statements.append(_schema_grants(names))
    # Ownership: migrations and prune. Indexes, triggers and the bigserial
    # sequences follow their table.
    statements += [f"ALTER TABLE {_ident(table)} OWNER TO {owner}" for table in TABLES]
    statements += [
        f"ALTER FUNCTION {function} OWNER TO {owner}"
        for function in (APPEND_FUNCTION, REFUSE_FUNCTION, SEQUENCE_FUNCTION)
    ]
    # Start from nothing: what earlier runs (or hands) granted, and PUBLIC's
    # EXECUTE on functions (PostgreSQL's default).
    all_tables = ", ".join(map(_ident, TABLES))
    grantees = f"PUBLIC, {writer}, {daemon}, {auditor}"
    statements += [
        f"REVOKE ALL ON TABLE {all_tables} FROM {grantees}",
        f"REVOKE ALL ON SEQUENCE {', '.join(map(_ident, SEQUENCES))} FROM {grantees}",
        f"REVOKE ALL ON FUNCTION {APPEND_FUNCTION} FROM {grantees}",
        f"REVOKE ALL ON FUNCTION {SEQUENCE_FUNCTION} FROM {grantees}",
    ]
    # writer
    statements += _grants(WRITER_TABLES, names["writer"])
    statements += [
        f"GRANT USAGE ON SEQUENCE {_ident(EVENTS_SEQUENCE)} TO {writer}",
        f"GRANT EXECUTE ON FUNCTION {APPEND_FUNCTION} TO {writer}",
    ]
    # daemon
    statements += _grants(DAEMON_TABLES, names["daemon"])
    statements.append(
        f"GRANT USAGE ON SEQUENCE {_ident(DELIVERIES_SEQUENCE)}, "
        f"{_ident(OPERATIONS_SEQUENCE)} TO {daemon}"
    )
    statements.append(f"GRANT EXECUTE ON FUNCTION {SEQUENCE_FUNCTION} TO {daemon}")
    # auditor
    statements.append(f"GRANT SELECT ON TABLE {all_tables} TO {auditor}")
    return statements


def script(prefix: str = DEFAULT_PREFIX) -> str:
    """:func:`role_statements` as one psql script, in one transaction."""
    body = ";\n\n".join(role_statements(prefix))
    return (
        f"-- herald's PostgreSQL roles ({prefix}_owner, _writer, _daemon, _auditor).\n"
        "-- Run in herald's database as a superuser, e.g. psql -v ON_ERROR_STOP=1 -f roles.sql\n"
        f"BEGIN;\n\n{body};\n\nCOMMIT;\n"
    )


def create_roles(conn: sa.Connection, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Create herald's roles (or bring them up to date) in one transaction; commits.

    ``conn`` (PostgreSQL, herald's migrated database) must have no
    transaction open. Returns the names of the roles that did not exist
    before. Raises :class:`UsageError` for SQLite or a prefix that is not
    valid, and herald's database errors for what the server refuses.
    """
    if conn.dialect.name != "postgresql":
        raise UsageError("roles are PostgreSQL's; protect an SQLite database with file permissions")
    names = list(role_names(prefix).values())
    statements = role_statements(prefix)
    with translated(), conn.begin():
        existing = set(
            conn.execute(
                sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"),
                {"names": names},
            ).scalars()
        )
        for statement in statements:
            # The driver reads % as a placeholder (format()'s %I in a DO block).
            conn.exec_driver_sql(statement.replace("%", "%%"))
    return [name for name in names if name not in existing]
