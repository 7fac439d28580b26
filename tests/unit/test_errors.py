"""herald's errors: default messages, exit codes, structured fields."""

from __future__ import annotations

from herald.errors import (
    AppendOnlyViolation,
    ConfigError,
    HeraldError,
    InvalidTransition,
    NotMigrated,
    PayloadTooLarge,
    UsageError,
    VersionConflict,
)


def test_docstring_is_the_default_message() -> None:
    assert str(NotMigrated()) == "The database has no herald schema; run `herald db upgrade` first."
    assert str(AppendOnlyViolation()).startswith("The log is append-only")


def test_usage_errors_exit_2_others_exit_1() -> None:
    assert ConfigError("HERALD_X", "bad").exit_code == 2
    assert PayloadTooLarge("t", 10, 5).exit_code == 2
    assert isinstance(PayloadTooLarge("t", 10, 5), UsageError)
    assert VersionConflict("build-1", 3).exit_code == 1
    assert HeraldError().exit_code == 1


def test_structured_fields() -> None:
    error = VersionConflict("build-1", 3)
    assert (error.aggregate_id, error.version) == ("build-1", 3)
    assert error.details == {"aggregate_id": "build-1", "version": 3}
    assert ConfigError("HERALD_DATABASE_URL", "x").setting == "HERALD_DATABASE_URL"


def test_invalid_transition_says_what_and_where() -> None:
    error = InvalidTransition("build 42", "finish", "finished", "status 0")
    assert str(error) == "cannot finish build 42: it is finished (status 0)"
    assert (error.aggregate, error.attempted, error.state) == ("build 42", "finish", "finished")
    assert error.exit_code == 2
