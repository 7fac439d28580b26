"""The record of operator actions: resets, replays, prunes (``herald_operations``).

Every command that changes what a consumer reads or what the log holds
writes one row here in the same transaction as the change itself: who ran it
(the operating-system user and host, and the database role), when, and what
it did. ``herald audit consumer`` shows a consumer's resets and replays from
it; ``herald audit operations`` all of them.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from herald.schema import operations
from herald.schema.dberrors import translated

__all__ = ["Action", "Operation", "actor", "history", "record"]

Action = Literal["reset", "replay", "prune"]


@dataclass(frozen=True, slots=True)
class Operation:
    """One recorded operator action."""

    id: int
    action: str
    consumer: str | None
    actor: str
    db_user: str | None
    at: datetime
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "consumer": self.consumer,
            "actor": self.actor,
            "db_user": self.db_user,
            "at": self.at.isoformat(),
            "detail": self.detail,
        }


def actor() -> str:
    """Who runs this command: ``user@host`` (``HERALD_ACTOR`` overrides it, e.g. from sudo)."""
    named = os.environ.get("HERALD_ACTOR", "").strip()
    if named:
        return named[:200]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:200]


def record(
    conn: sa.Connection, action: Action, consumer: str | None, detail: dict[str, Any]
) -> int:
    """Record an action in the caller's transaction; returns its id."""
    db_user = None
    with translated():
        if conn.dialect.name == "postgresql":
            db_user = conn.execute(sa.text("SELECT current_user")).scalar_one()
        return int(
            conn.execute(
                operations.insert()
                .values(
                    action=action,
                    consumer=consumer,
                    actor=actor(),
                    db_user=db_user,
                    at=datetime.now(UTC),
                    detail=detail,
                )
                .returning(operations.c.id)
            ).scalar_one()
        )


def history(
    conn: sa.Connection,
    *,
    consumer: str | None = None,
    action: Action | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Operation]:
    """Recorded actions, newest first (of one consumer and/or one kind, since a time)."""
    stmt = sa.select(operations).order_by(operations.c.id.desc()).limit(limit)
    if consumer is not None:
        stmt = stmt.where(operations.c.consumer == consumer)
    if action is not None:
        stmt = stmt.where(operations.c.action == action)
    if since is not None:
        stmt = stmt.where(operations.c.at >= since)
    with translated():
        rows = conn.execute(stmt).all()
    return [
        Operation(
            id=r.id,
            action=r.action,
            consumer=r.consumer,
            actor=r.actor,
            db_user=r.db_user,
            at=r.at if r.at.tzinfo is not None else r.at.replace(tzinfo=UTC),
            detail=r.detail,
        )
        for r in rows
    ]
