"""herald's errors: one base class, one subclass per situation.

Every layer may import this module (it imports nothing of herald). Each
error's docstring is its default message; subclasses carry the structured
fields a caller or a log line needs. Driver errors (SQLAlchemy, psycopg,
sqlite3) are translated once, at the boundary that touches the database,
with ``raise ... from exc``; only :class:`TransientDatabaseError` is worth a
retry.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AppendOnlyViolation",
    "ConfigError",
    "ConsumerBusy",
    "DatabaseError",
    "DatabaseUnavailable",
    "HeraldError",
    "InvalidPayload",
    "InvalidTopic",
    "InvalidTransition",
    "LostClaim",
    "NotMigrated",
    "NotParked",
    "PayloadTooLarge",
    "TransientDatabaseError",
    "UnknownAggregate",
    "UnknownConsumer",
    "UsageError",
    "VersionConflict",
    "WaitTimeout",
]


class HeraldError(Exception):
    """herald failed."""

    #: the CLI's exit status for this kind of error (2 = the caller's input was wrong)
    exit_code: int = 1

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        self.details = details
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class UsageError(HeraldError):
    """The input is not valid."""

    exit_code = 2


class ConfigError(UsageError):
    """A setting has a bad value."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}", setting=setting)
        self.setting = setting


class InvalidTopic(UsageError):
    """The topic name is not valid."""

    def __init__(self, topic: object, problem: str) -> None:
        super().__init__(f"topic {topic!r}: {problem}", topic=topic)
        self.topic = topic


class InvalidPayload(UsageError):
    """The payload is not valid."""

    def __init__(self, topic: str, problem: str) -> None:
        super().__init__(f"payload of {topic!r}: {problem}", topic=topic)
        self.topic = topic


class PayloadTooLarge(InvalidPayload):
    """The payload is larger than the log accepts."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(topic, f"{size} bytes of JSON, more than the limit of {limit}")
        self.size = size
        self.limit = limit


class VersionConflict(HeraldError):
    """Another writer changed the aggregate first; nothing was written."""

    exit_code = 1

    def __init__(self, aggregate_id: str, version: int) -> None:
        super().__init__(
            f"version conflict: aggregate {aggregate_id} already has version {version} "
            "(another writer changed it first); nothing was written",
            aggregate_id=aggregate_id,
            version=version,
        )
        self.aggregate_id = aggregate_id
        self.version = version


class UnknownAggregate(UsageError):
    """No such build or evaluation in the log."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key} does not exist", kind=kind, key=key)
        self.kind = kind
        self.key = key


class InvalidTransition(HeraldError):
    """The command does not apply to the aggregate in its current state; nothing changed."""

    exit_code = 2

    def __init__(self, aggregate: str, attempted: str, state: str, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"cannot {attempted} {aggregate}: it is {state}{why}",
            aggregate=aggregate,
            attempted=attempted,
            state=state,
        )
        self.aggregate = aggregate
        self.attempted = attempted
        self.state = state


class DatabaseError(HeraldError):
    """The database refused the operation."""


class AppendOnlyViolation(DatabaseError):
    """The log is append-only: its rows cannot be updated or deleted."""


class NotMigrated(DatabaseError):
    """The database has no herald schema; run `herald db upgrade` first."""


class TransientDatabaseError(DatabaseError):
    """The database could not be reached or the connection broke; retrying may help."""


class DatabaseUnavailable(TransientDatabaseError):
    """The database server does not answer."""


class UnknownConsumer(UsageError):
    """No such consumer."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        hint = f"; known: {', '.join(known)}" if known else "; no consumer has run on this database"
        super().__init__(f"unknown consumer {name!r}{hint}", consumer=name)
        self.consumer = name


class ConsumerBusy(HeraldError):
    """A live daemon runs the consumer; nothing was changed."""

    def __init__(self, consumer: str, run_by: str, change: str) -> None:
        super().__init__(
            f"consumer {consumer!r} is being run by {run_by} right now; {change} refused "
            "(stop that `herald run` first, or give --force: it then takes the change at "
            "its next batch)",
            consumer=consumer,
        )
        self.consumer = consumer
        self.run_by = run_by


class NotParked(UsageError):
    """The event is not parked for that consumer."""

    def __init__(self, consumer: str, seq: int, problem: str | None = None) -> None:
        super().__init__(
            problem or f"seq {seq} is not parked for consumer {consumer!r}",
            consumer=consumer,
            seq=seq,
        )
        self.consumer = consumer
        self.seq = seq


class LostClaim(HeraldError):
    """Another process runs this consumer now."""

    def __init__(self, consumer: str) -> None:
        super().__init__(
            f"consumer {consumer!r} is run by another process now; its batch was not committed",
            consumer=consumer,
        )
        self.consumer = consumer


class WaitTimeout(HeraldError):
    """The consumer did not finish the event in time."""

    def __init__(self, consumer: str, seq: int, timeout: float, offset: int) -> None:
        super().__init__(
            f"consumer {consumer!r} has not finished seq {seq} within {timeout:g} s "
            f"(its offset is {offset})",
            consumer=consumer,
            seq=seq,
        )
        self.consumer = consumer
        self.seq = seq
        self.offset = offset
