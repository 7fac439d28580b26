"""herald.toml: consumers of every type, and one clear error per mistake."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from herald.consumers.builtin import CommandHandler, JsonlHandler, WebhookHandler, load_object
from herald.consumers.config import (
    CONFIG_SETTING,
    Config,
    Options,
    consumer_types,
    load_config,
    parse_config,
    parse_duration,
)
from herald.consumers.model import Delivered
from herald.errors import ConfigError, HeraldError
from herald.outbox import LogEntry

WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EVENT = LogEntry(
    seq=3,
    position=30,
    topic="build_finished",
    payload={"build_id": 9, "dependent_ids": []},
    delivery="at_least_once",
    dedupe_key=None,
    aggregate_id=None,
    aggregate_version=None,
    trace_id=None,
    occurred_at=WHEN,
    recorded_at=WHEN,
)


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_SETTING, raising=False)
    monkeypatch.delenv("HERALD_TEST_UNSET", raising=False)


@pytest.fixture
def write(tmp_path: Path) -> Iterator[Any]:
    """Writes a herald.toml; loads it; closes every configuration loaded."""
    loaded: list[Config] = []

    def load(text: str) -> Config:
        path = tmp_path / "herald.toml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        config = load_config(path)
        loaded.append(config)
        return config

    yield load
    for config in loaded:
        config.close()


def error_of(tmp_path: Path, text: str) -> str:
    path = tmp_path / "herald.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path).close()
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message


@pytest.fixture
def modules() -> Iterator[list[str]]:
    """Module names a test imports from tmp_path; forgotten afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 7 ", 7.0),
        ("3 s", 3.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["10 parsecs", "", "s", "-1s", "1d", None, [], True])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, 0.0, "0s", "0ms"])
def test_parse_duration_refuses_zero(value: object) -> None:
    with pytest.raises(ValueError, match="more than 0"):
        parse_duration(value)


# --------------------------------------------------------------------------- Options


def test_options_read_by_type_and_report_unused_keys() -> None:
    options = Options(
        "f.toml",
        "c",
        {"s": "x", "n": 3, "b": True, "l": ["a", "b"], "one": "a", "t": {"k": "v"}, "d": "2s"},
    )
    assert options.string("s") == "x"
    assert options.string("absent", "dflt") == "dflt"
    assert options.integer("n", 1, minimum=1) == 3
    assert options.boolean("b", False) is True
    assert options.strings("l") == ["a", "b"]
    assert options.strings("one") == ["a"]
    assert options.table("t") == {"k": "v"}
    assert options.duration("d", 1.0) == 2.0
    options.check_unused("x")
    unread = Options("f.toml", "c", {"s": "x", "typo": 1})
    unread.string("s")
    with pytest.raises(
        ConfigError, match=r"^f\.toml: consumers\.c\.typo: unknown key; x takes: s$"
    ):
        unread.check_unused("x")


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda o: o.string("n"), "consumers.c.n: must be a non-empty string, not 3"),
        (lambda o: o.string("absent", required=True), "consumers.c.absent: is required"),
        (lambda o: o.integer("s", 1), "consumers.c.s: must be a whole number"),
        (lambda o: o.integer("b", 1), "consumers.c.b: must be a whole number"),
        (lambda o: o.integer("n", 1, maximum=2), "consumers.c.n: must be between 0 and 2, not 3"),
        (lambda o: o.boolean("s", True), "consumers.c.s: must be true or false"),
        (lambda o: o.strings("n"), "consumers.c.n: must be a list of strings"),
        (lambda o: o.table("s"), "consumers.c.s: must be a table of strings"),
        (lambda o: o.duration("s", 1.0), "consumers.c.s: 'text' is not a duration"),
    ],
)
def test_options_errors_name_file_consumer_and_key(read: Any, message: str) -> None:
    options = Options("f.toml", "c", {"s": "text", "n": 3, "b": True})
    with pytest.raises(ConfigError) as caught:
        read(options)
    assert str(caught.value).startswith(f"f.toml: {message}")


# --------------------------------------------------------------------------- valid files


def test_every_builtin_type_from_one_file(
    write: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: list[str]
) -> None:
    monkeypatch.setenv("HERALD_TEST_HOOK_SECRET", "hush")
    (tmp_path / "herald_test_hooks.py").write_text(
        "def deliver(entry):\n    deliver.seen.append(entry.seq)\n\ndeliver.seen = []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    modules.append("herald_test_hooks")
    config = write(
        f"""
        [daemon]
        poll_interval = "250ms"

        [consumers.archive]
        type = "jsonl"
        topics = ["*"]
        path = "{tmp_path / "events.jsonl"}"
        fsync = true
        delivery = "at_least_once"
        batch_size = 1000

        [consumers.github]
        type = "webhook"
        topics = ["build_started", "build_finished"]
        concurrency = 4
        timeout = "10s"
        max_attempts = 8
        retry_initial = "1s"
        retry_max = "5m"
        url = "https://ci.example.org/hooks/herald"
        secret_env = "HERALD_TEST_HOOK_SECRET"
        headers = {{ X-Farm = "main" }}

        [consumers.notify]
        type = "command"
        topics = "build_*"
        delivery = "ephemeral"
        staleness = "1h"
        command = "notify-send herald"
        env = {{ LANG = "C" }}

        [consumers.py]
        type = "python"
        topics = ["acme.*"]
        handler = "herald_test_hooks:deliver"
        """
    )
    assert config.poll_interval == 0.25
    assert [c.name for c in config.consumers] == ["archive", "github", "notify", "py"]

    archive = config.consumer("archive")
    assert archive is not None
    assert archive.type == "jsonl"
    assert archive.topics == ["*"]
    assert archive.delivery == "at_least_once"
    assert archive.batch_size == 1000
    assert isinstance(archive.handler, JsonlHandler)
    assert archive.handler.fsync is True
    assert archive.handler.budget == pytest.approx(27.0)  # 0.9 × the default 30 s

    github = config.consumer("github")
    assert github is not None
    assert (github.concurrency, github.timeout, github.max_attempts) == (4, 10.0, 8)
    assert (github.retry_initial, github.retry_max) == (1.0, 300.0)
    assert github.delivery == "auto"
    assert isinstance(github.handler, WebhookHandler)
    assert github.handler.budget == pytest.approx(9.0)
    assert "hush" not in repr(github.handler)

    notify = config.consumer("notify")
    assert notify is not None
    assert notify.topics == ["build_*"]
    assert (notify.delivery, notify.staleness) == ("ephemeral", 3600.0)
    assert isinstance(notify.handler, CommandHandler)
    assert notify.handler.argv == ["notify-send", "herald"]
    assert notify.handler.env == {"LANG": "C"}
    assert notify.handler.consumer == "notify"

    py = config.consumer("py")
    assert py is not None
    assert py.type == "python"
    deliver = load_object("herald_test_hooks:deliver")
    assert py.handler is deliver
    py.handler(EVENT)
    assert deliver.seen == [3]
    assert config.consumer("nobody") is None

    # The jsonl consumer delivers for real.
    archive.handler(EVENT)
    assert (tmp_path / "events.jsonl").read_text().count("\n") == 1


def test_disabled_consumer_is_skipped(write: Any) -> None:
    config = write(
        """
        [consumers.off]
        enabled = false
        type = "command"
        topics = ["build_finished"]
        command = "true"

        [consumers.on]
        enabled = true
        type = "command"
        topics = ["build_finished"]
        command = "true"
        """
    )
    assert [c.name for c in config.consumers] == ["on"]


def test_no_file_means_no_consumers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./herald.toml here
    config = load_config()
    assert config.consumers == []
    assert config.path is None
    assert config.poll_interval == 1.0


def test_herald_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "farm.toml"
    path.write_text(
        '[daemon]\npoll_interval = 3\n[consumers.x]\ntype = "jsonl"\ntopics = "*"\npath = "x"\n'
    )
    monkeypatch.setenv(CONFIG_SETTING, str(path))
    config = load_config()
    try:
        assert config.path == path
        assert config.poll_interval == 3.0
        assert [c.name for c in config.consumers] == ["x"]
    finally:
        config.close()


def test_herald_config_pointing_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_SETTING, str(tmp_path / "missing.toml"))
    with pytest.raises(
        ConfigError, match=rf"^HERALD_CONFIG: {tmp_path}/missing\.toml: no such file$"
    ):
        load_config()
    with pytest.raises(ConfigError, match=r"^--config: .*nope\.toml: no such file$"):
        load_config(tmp_path / "nope.toml")


def test_without_handlers_the_type_is_not_checked(tmp_path: Path) -> None:
    data = {"consumers": {"x": {"type": "not-installed", "topics": ["*"], "anything": 1}}}
    config = parse_config(data, "f.toml", build_handlers=False)
    [consumer] = config.consumers
    assert consumer.type == "not-installed"
    with pytest.raises(HeraldError, match="without its handler"):
        consumer.handler(EVENT)


# --------------------------------------------------------------------------- bad files

BAD: list[tuple[str, str, str]] = [
    ("missing type", '[consumers.a]\ntopics = ["*"]\n', "consumers.a.type: is required"),
    (
        "unknown type",
        '[consumers.a]\ntype = "webhok"\ntopics = ["*"]\n',
        "consumers.a.type: unknown consumer type 'webhok'; one of command, jsonl, python, webhook",
    ),
    (
        "missing topics",
        '[consumers.a]\ntype = "jsonl"\npath = "x"\n',
        "consumers.a.topics: is required",
    ),
    (
        "empty topics",
        '[consumers.a]\ntype = "jsonl"\ntopics = []\npath = "x"\n',
        "consumers.a.topics: is empty",
    ),
    (
        "bad pattern",
        '[consumers.a]\ntype = "jsonl"\ntopics = ["Build-*"]\npath = "x"\n',
        "consumers.a.topics: topic 'Build-*': a pattern is a topic with * wildcards",
    ),
    (
        "unknown topic",
        '[consumers.a]\ntype = "jsonl"\ntopics = ["build_finshed"]\npath = "x"\n',
        "consumers.a.topics: topic 'build_finshed': not in the event catalogue",
    ),
    (
        "bad delivery",
        '[consumers.a]\ntype = "jsonl"\ntopics = "*"\ndelivery = "sometimes"\npath = "x"\n',
        "consumers.a.delivery: must be one of auto, at_least_once, ephemeral, not 'sometimes'",
    ),
    (
        "concurrency 0",
        '[consumers.a]\ntype = "jsonl"\ntopics = "*"\nconcurrency = 0\npath = "x"\n',
        "consumers.a.concurrency: must be between 1 and 256, not 0",
    ),
    (
        "bad duration",
        '[consumers.a]\ntype = "jsonl"\ntopics = "*"\ntimeout = "10 parsecs"\npath = "x"\n',
        "consumers.a.timeout: '10 parsecs' is not a duration",
    ),
    (
        "typo",
        '[consumers.a]\ntype = "webhook"\ntopics = "*"\nurll = "http://h/"\n',
        "consumers.a.urll: unknown key (webhook needs 'url')",
    ),
    (
        "typo next to the real key",
        '[consumers.a]\ntype = "webhook"\ntopics = "*"\nurl = "http://h/"\nurll = "http://h/"\n',
        "consumers.a.urll: unknown key; webhook takes: headers, secret, secret_env, url",
    ),
    (
        "key of another type",
        '[consumers.a]\ntype = "jsonl"\ntopics = "*"\npath = "x"\nurl = "http://h/"\n',
        "consumers.a.url: unknown key; jsonl takes: fsync, path",
    ),
    (
        "webhook url not http",
        '[consumers.a]\ntype = "webhook"\ntopics = "*"\nurl = "file:///etc/passwd"\n',
        "consumers.a.url: must be an http:// or https:// URL, not 'file:///etc/passwd'",
    ),
    (
        "secret and secret_env",
        (
            '[consumers.a]\ntype = "webhook"\ntopics = "*"\nurl = "http://h/"\n'
            'secret = "topsecret"\nsecret_env = "HERALD_TEST_UNSET"\n'
        ),
        "consumers.a.secret: give secret or secret_env, not both",
    ),
    (
        "secret_env unset",
        (
            '[consumers.a]\ntype = "webhook"\ntopics = "*"\nurl = "http://h/"\n'
            'secret_env = "HERALD_TEST_UNSET"\n'
        ),
        "consumers.a.secret_env: the environment variable HERALD_TEST_UNSET is not set or empty",
    ),
    (
        "command empty",
        '[consumers.a]\ntype = "command"\ntopics = "*"\ncommand = []\n',
        "consumers.a.command: is empty",
    ),
    (
        "enabled not a boolean",
        '[consumers.a]\nenabled = "no"\ntype = "command"\ntopics = "*"\ncommand = "true"\n',
        "consumers.a.enabled: must be true or false, not 'no'",
    ),
    (
        "bad consumer name",
        '[consumers."a b"]\ntype = "jsonl"\n',
        "consumers.a b: a consumer name is",
    ),
    ("consumer not a table", "[consumers]\na = 1\n", "consumers.a: must be a table"),
    (
        "daemon unknown key",
        "[daemon]\npoll = 1\n",
        "daemon.poll: unknown key; [daemon] takes: poll_interval",
    ),
    (
        "daemon bad interval",
        '[daemon]\npoll_interval = "soon"\n',
        "daemon.poll_interval: 'soon' is not",
    ),
    ("unknown section", "[consumer.a]\ntype = 1\n", "consumer: unknown section"),
    ("invalid TOML", "[consumers.a\ntype = ", "not valid TOML"),
]


@pytest.mark.parametrize(
    ("text", "message"), [(t, m) for _, t, m in BAD], ids=[i for i, _, _ in BAD]
)
def test_bad_config_names_file_consumer_and_key(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'herald.toml'}: {message}"), error
    assert "topsecret" not in error


def test_an_error_closes_the_consumers_already_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: list[str]
) -> None:
    closed = plugin(tmp_path, monkeypatch, modules)
    error = error_of(
        tmp_path,
        """
        [consumers.first]
        type = "shout"
        topics = "*"

        [consumers.second]
        type = "shout"
        topics = "*"
        lodness = 11
        """,
    )
    assert "consumers.second.lodness: unknown key; shout takes: loudness" in error
    assert sorted(closed) == ["first", "second"]


# --------------------------------------------------------------------------- python handlers


def test_python_handler_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: list[str]
) -> None:
    (tmp_path / "herald_test_handlers.py").write_text(
        "NOT_CALLABLE = 1\n\ndef ok(entry):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    modules.append("herald_test_handlers")
    head = '[consumers.p]\ntype = "python"\ntopics = "*"\n'
    cases = {
        "herald_test_nowhere:f": (
            "cannot load 'herald_test_nowhere:f': No module named 'herald_test_nowhere'"
        ),
        "herald_test_handlers:missing": "cannot load 'herald_test_handlers:missing': module",
        "herald_test_handlers.ok": "cannot load 'herald_test_handlers.ok': ",
        "herald_test_handlers:NOT_CALLABLE": "'herald_test_handlers:NOT_CALLABLE' is not callable",
    }
    for target, message in cases.items():
        error = error_of(tmp_path, f'{head}handler = "{target}"\n')
        assert f"consumers.p.handler: {message}" in error
    assert "consumers.p.handler: is required" in error_of(tmp_path, head)


# --------------------------------------------------------------------------- plugins


PLUGIN = """
from herald.consumers.model import Delivered

CLOSED = []


class Shout:
    def __init__(self, name, loudness):
        self.name, self.loudness = name, loudness

    def __call__(self, entry):
        return Delivered(detail={"shouted": entry.topic.upper() + "!" * self.loudness})

    def close(self):
        CLOSED.append(self.name)


def factory(options, context):
    return Shout(context.consumer, options.integer("loudness", 1, minimum=1, maximum=11))
"""


def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: list[str]) -> list[str]:
    """A real distribution on sys.path with a ``herald.consumers`` entry point; its CLOSED list."""
    site = tmp_path / "site"
    info = site / "herald_test_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "herald_test_plugin.py").write_text(PLUGIN)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: herald-test-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[herald.consumers]\nshout = herald_test_plugin:factory\nbroken = herald_test_plugin:nope\n"
    )
    monkeypatch.syspath_prepend(str(site))
    modules.append("herald_test_plugin")
    import herald_test_plugin  # type: ignore[import-not-found]  # noqa: PLC0415

    closed: list[str] = herald_test_plugin.CLOSED
    return closed


def test_entry_point_type(
    write: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: list[str]
) -> None:
    closed = plugin(tmp_path, monkeypatch, modules)
    assert {"shout", "broken", "jsonl", "webhook", "command", "python"} <= set(consumer_types())
    config = write(
        """
        [consumers.loud]
        type = "shout"
        topics = ["build_*"]
        loudness = 3
        concurrency = 2
        """
    )
    [loud] = config.consumers
    assert (loud.type, loud.concurrency) == ("shout", 2)
    assert loud.handler(EVENT) == Delivered(detail={"shouted": "BUILD_FINISHED!!!"})
    config.close()
    assert closed == ["loud"]
    # Its own keys are checked by its own Options reads.
    error = error_of(tmp_path, '[consumers.a]\ntype = "shout"\ntopics = "*"\nloudness = 12\n')
    assert "consumers.a.loudness: must be between 1 and 11, not 12" in error
    error = error_of(tmp_path, '[consumers.a]\ntype = "broken"\ntopics = "*"\n')
    assert (
        "consumers.a.type: the consumer type 'broken' (herald_test_plugin:nope) cannot be loaded"
        in error
    )
