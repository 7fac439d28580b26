"""``herald db roles``: PostgreSQL roles for least privilege.

Registered on the ``db`` group by :mod:`herald.cli`.
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herald.cli_common import State, pass_state
from herald.config import database_url
from herald.errors import UsageError
from herald.schema.roles import DEFAULT_PREFIX, ROLES, create_roles, script, validate_prefix

__all__ = ["roles_command"]


@click.command("roles")
@click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    metavar="PREFIX",
    help="The roles are PREFIX_owner, PREFIX_writer, PREFIX_daemon, PREFIX_auditor "
    "(lowercase letters, digits, _).",
)
@click.option(
    "--print",
    "print_sql",
    is_flag=True,
    help="Print the SQL (for psql) and change nothing.",
)
@pass_state
def roles_command(state: State, prefix: str, print_sql: bool) -> None:
    """Create the PostgreSQL roles herald's parts run as (safe to run again).

    Four roles that cannot log in: PREFIX_owner owns herald's tables
    (`herald db upgrade`, `herald prune`, `herald projections rebuild`),
    PREFIX_writer appends events and writes the projections, PREFIX_daemon
    runs `herald run` and the consumer commands, PREFIX_auditor reads. Grant
    them to login roles; the login that migrates also takes PREFIX_owner as
    its default role (ALTER ROLE ... SET ROLE), so that what it creates
    belongs to the owner. Run it as a superuser in herald's migrated database,
    and again after every `herald db upgrade`, so that new tables get their
    grants. Privileges the roles hold beyond these are revoked.
    """
    validate_prefix(prefix)
    if database_url(state.database_url).get_backend_name() != "postgresql":
        raise UsageError(
            "roles are PostgreSQL's; on SQLite, protect the database file with file "
            "permissions (readable and writable only by the user that runs herald)"
        )
    if print_sql:
        click.echo(script(prefix), nl=False)
        return
    engine = state.engine()
    with engine.connect() as conn:
        created = create_roles(conn, prefix)
    table = Table(box=None, pad_edge=False)
    for column in ("ROLE", "CHANGE", "MAY"):
        table.add_column(column, overflow="fold")
    for role in ROLES:
        name = role.name(prefix)
        table.add_row(
            escape(name), "created" if name in created else "updated", escape(role.description)
        )
    Console(soft_wrap=True).print(table)
    click.echo(
        f"grant each login the role of its part, e.g. `GRANT {prefix}_writer TO hydra;`; "
        f"the login that migrates: `GRANT {prefix}_owner TO deploy; "
        f"ALTER ROLE deploy SET ROLE {prefix}_owner;`"
    )
