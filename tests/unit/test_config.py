"""HERALD_DATABASE_URL: what it accepts, and the one-line errors for what it does not."""

from __future__ import annotations

import pytest

from herald.config import DEFAULT_DATABASE_URL, database_url
from herald.errors import ConfigError


def test_default_is_an_sqlite_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERALD_DATABASE_URL", raising=False)
    assert database_url().render_as_string() == DEFAULT_DATABASE_URL


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_DATABASE_URL", "postgresql://u@db.example:6543/farm")
    url = database_url()
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database) == ("db.example", 6543, "farm")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://x/y", "'mysql' is not supported"),
        ("postgresql+asyncpg://x/y", "driver 'asyncpg' is not supported"),
        ("postgresql://host", "names no database"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
    ],
)
def test_bad_urls_name_the_setting(raw: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        database_url(raw)
    assert str(info.value).startswith("HERALD_DATABASE_URL: ")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        database_url("mysql://user:s3cret@host/db")
    assert "s3cret" not in str(info.value)
