"""``herald audit``: questions about the log, for people (tables) and scripts (--json)."""

from __future__ import annotations

import click

__all__ = ["audit_group"]


@click.group("audit")
def audit_group() -> None:
    """Ask the log what happened: a build's timeline, a consumer's backlog and history."""
