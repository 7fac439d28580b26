"""``herald db roles``: PostgreSQL roles for least privilege."""

from __future__ import annotations

import click

__all__ = ["roles_command"]


@click.command("roles")
def roles_command() -> None:
    """Create the PostgreSQL roles herald's parts run as."""
