"""Consumers from a TOML file: ``HERALD_CONFIG``, by default ``./herald.toml``.

::

    [daemon]
    poll_interval = "1s"          # the poll fallback when no NOTIFY comes

    [consumers.github]
    type = "webhook"              # jsonl | webhook | command | python | an entry point
    topics = ["build_started", "build_finished"]
    delivery = "auto"             # auto | at_least_once | ephemeral
    concurrency = 4
    timeout = "10s"
    url = "https://ci.example.org/hooks/herald"
    secret_env = "GITHUB_HOOK_SECRET"

Every consumer takes the common keys (:data:`COMMON_KEYS`); the rest belong
to its type. Durations are seconds (a number) or a string with a unit
(``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"``). A bad file is one
:class:`~herald.errors.ConfigError` naming the file, the consumer and the key.

Third-party types register a factory in the entry-point group
``herald.consumers``: ``factory(options, context) -> handler`` where
``options`` is an :class:`Options` (read your keys through it: unknown keys
are then reported for you) and ``context`` a
:class:`~herald.consumers.model.HandlerContext`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from herald.consumers.model import (
    DELIVERY_POLICIES,
    NAME_PATTERN,
    Consumer,
    Handler,
    HandlerContext,
)
from herald.errors import ConfigError, HeraldError, UsageError
from herald.outbox import TopicFilter

__all__ = [
    "COMMON_KEYS",
    "CONFIG_SETTING",
    "DEFAULT_CONFIG",
    "ENTRY_POINT_GROUP",
    "Config",
    "Factory",
    "Options",
    "consumer_types",
    "load_config",
    "parse_config",
    "parse_duration",
]

CONFIG_SETTING: Final = "HERALD_CONFIG"
DEFAULT_CONFIG: Final = "herald.toml"
ENTRY_POINT_GROUP: Final = "herald.consumers"

COMMON_KEYS: Final = (
    "type",
    "topics",
    "delivery",
    "concurrency",
    "timeout",
    "max_attempts",
    "retry_initial",
    "retry_max",
    "staleness",
    "batch_size",
    "enabled",
)

Factory = Callable[["Options", HandlerContext], Handler]

#: The longest duration a setting may have (30 days): longer ones are typos, and
#: overflow the timeouts of locks and sockets.
MAX_DURATION: Final = 30 * 86400.0

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"250ms"``, ``"10s"``, ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 - reported as a bad value, like any other
            "a duration is a number of seconds or a string like '10s'"
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(
            f"{value!r} is not a duration (a number of seconds, or '250ms', '10s', '5m')"
        )
    if not seconds > 0:
        raise ValueError("a duration must be more than 0")
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"a duration must be at most {MAX_DURATION // 86400:g} days")
    return seconds


class Options:
    """A consumer's keys, read by type; every problem names the file, consumer and key.

    The typed getters quote a bad value in their error: read secrets with
    :meth:`raw` and check them yourself, so that no error ever shows one.
    """

    def __init__(self, source: str, consumer: str, values: Mapping[str, Any]) -> None:
        self.source = source
        self.consumer = consumer
        self._values = dict(values)
        self._read: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        """The error for a bad ``key``."""
        return ConfigError(f"{self.source}: consumers.{self.consumer}.{key}", problem)

    def has(self, key: str) -> bool:
        return key in self._values

    def raw(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        return self._values.get(key, default)

    def _required(self, key: str) -> Any:
        self._read.add(key)
        if key not in self._values:
            raise self.error(key, "is required")
        return self._values[key]

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._required(key) if required else self.raw(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, not {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}, not {value}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self.raw(key, default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        value = self._required(key) if required else self.raw(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of strings, not {value!r}")
        return list(value)

    def table(self, key: str) -> dict[str, str]:
        value = self.raw(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, f"must be a table of strings, not {value!r}")
        return dict(value)

    def unread(self) -> list[str]:
        """The keys nobody has read, sorted."""
        return sorted(set(self._values) - self._read)

    def check_unused(self, type_name: str) -> None:
        """Raise for a key nobody read (a typo, or a key of another type)."""
        unknown = self.unread()
        if unknown:
            known = sorted(self._read - set(COMMON_KEYS))
            takes = f"; {type_name} takes: {', '.join(known)}" if known else ""
            raise self.error(unknown[0], f"unknown key{takes}")


def _python_factory(options: Options, context: HandlerContext) -> Handler:
    """``type = "python"``: ``handler = "package.module:function"``."""
    from herald.consumers.builtin import load_object  # noqa: PLC0415 - avoids a cycle

    target = options.string("handler", required=True)
    assert target is not None
    try:
        handler = load_object(target)
    except Exception as exc:  # noqa: BLE001 - any failure to import is the setting's fault
        raise options.error("handler", f"cannot load {target!r}: {exc}") from None
    if not callable(handler):
        raise options.error("handler", f"{target!r} is not callable")
    return handler  # type: ignore[no-any-return]


def consumer_types() -> dict[str, Factory]:
    """Consumer types by name: the built-in ones, then those of the entry-point group."""
    from herald.consumers.builtin import BUILTIN_TYPES  # noqa: PLC0415 - avoids a cycle

    types: dict[str, Factory] = {"python": _python_factory, **BUILTIN_TYPES}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        types.setdefault(entry_point.name, _LazyFactory(entry_point))
    return types


class _LazyFactory:
    """An entry point, loaded when a consumer of its type is configured."""

    def __init__(self, entry_point: metadata.EntryPoint) -> None:
        self.entry_point = entry_point

    def __call__(self, options: Options, context: HandlerContext) -> Handler:
        try:
            factory = self.entry_point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must name itself
            raise options.error(
                "type",
                f"the consumer type {self.entry_point.name!r} "
                f"({self.entry_point.value}) cannot be loaded: {exc}",
            ) from None
        handler = factory(options, context)
        if not callable(handler):
            raise options.error("type", f"{self.entry_point.value} did not return a handler")
        return handler  # type: ignore[no-any-return]


@dataclass(slots=True)
class Config:
    """What a configuration file says (an empty one when there is no file)."""

    path: Path | None = None
    consumers: list[Consumer] = field(default_factory=list)
    poll_interval: float = 1.0

    def consumer(self, name: str) -> Consumer | None:
        return next((c for c in self.consumers if c.name == name), None)

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.close()


def config_path(explicit: str | Path | None = None) -> tuple[Path, bool]:
    """The configuration file to read, and whether it was asked for (so must exist)."""
    if explicit is not None:
        return Path(explicit), True
    from_env = os.environ.get(CONFIG_SETTING)
    if from_env:
        return Path(from_env), True
    return Path(DEFAULT_CONFIG), False


def load_config(path: str | Path | None = None, *, build_handlers: bool = True) -> Config:
    """Read the configuration file (``path``, ``$HERALD_CONFIG`` or ``./herald.toml``).

    A file named explicitly or by ``HERALD_CONFIG`` must exist; ``./herald.toml``
    may be absent (no consumers are configured then).
    """
    file, required = config_path(path)
    if not file.exists():
        if required:
            setting = "--config" if path is not None else CONFIG_SETTING
            raise ConfigError(setting, f"{file}: no such file")
        return Config()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), f"cannot read it: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), f"not valid TOML: {exc}") from None
    return parse_config(data, str(file), path=file, build_handlers=build_handlers)


def parse_config(
    data: Mapping[str, Any],
    source: str,
    *,
    path: Path | None = None,
    build_handlers: bool = True,
) -> Config:
    """Build the configuration from parsed TOML; ``source`` names it in errors."""
    unknown = sorted(set(data) - {"daemon", "consumers"})
    if unknown:
        raise ConfigError(
            f"{source}: {unknown[0]}", "unknown section; use [daemon] and [consumers.NAME]"
        )
    config = Config(path=path)
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{source}: daemon", "must be a table ([daemon])")
    for key, value in daemon.items():
        if key != "poll_interval":
            raise ConfigError(
                f"{source}: daemon.{key}", "unknown key; [daemon] takes: poll_interval"
            )
        try:
            config.poll_interval = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: daemon.poll_interval", str(exc)) from None
    tables = data.get("consumers", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: consumers", "must be a table of consumers ([consumers.NAME])")
    types = consumer_types() if build_handlers else {}
    try:
        for name, table in tables.items():
            consumer = _consumer(source, name, table, types, build_handlers=build_handlers)
            if consumer is not None:
                config.consumers.append(consumer)
    except BaseException:
        config.close()
        raise
    return config


def _unbuilt(_entry: Any) -> None:
    raise HeraldError("this consumer was read without its handler")


def _build(factory: Factory, options: Options, type_name: str, timeout: float) -> Handler:
    try:
        return factory(options, HandlerContext(consumer=options.consumer, timeout=timeout))
    except ConfigError as exc:
        # A required key reported missing is often one written with a typo: name
        # the key as written.
        unknown = options.unread()
        if unknown and "is required" in str(exc):
            missing = exc.setting.rsplit(".", 1)[-1]
            problem = f"unknown key ({type_name} needs {missing!r})"
            raise options.error(unknown[0], problem) from None
        raise


def _consumer(
    source: str,
    name: str,
    table: object,
    types: Mapping[str, Factory],
    *,
    build_handlers: bool,
) -> Consumer | None:
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"{source}: consumers.{name}",
            "a consumer name is 1-100 letters, digits, '_', '.' or '-'",
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: consumers.{name}", "must be a table ([consumers.NAME])")
    options = Options(source, name, table)
    if not options.boolean("enabled", True):
        return None
    type_name = options.string("type", required=True)
    assert type_name is not None
    if build_handlers and type_name not in types:
        known = ", ".join(sorted(types))
        raise options.error("type", f"unknown consumer type {type_name!r}; one of {known}")
    topics = options.strings("topics", required=True)
    if not topics:
        raise options.error("topics", "is empty; name at least one topic or pattern")
    try:
        TopicFilter(topics)
    except UsageError as exc:
        raise options.error("topics", str(exc)) from None
    delivery = options.string("delivery", "auto")
    if delivery not in DELIVERY_POLICIES:
        raise options.error(
            "delivery", f"must be one of {', '.join(DELIVERY_POLICIES)}, not {delivery!r}"
        )
    timeout = options.duration("timeout", 30.0)
    settings: dict[str, Any] = {
        "concurrency": options.integer("concurrency", 1, minimum=1, maximum=256),
        "timeout": timeout,
        "max_attempts": options.integer("max_attempts", 5, minimum=1, maximum=1000),
        "retry_initial": options.duration("retry_initial", 0.5),
        "retry_max": options.duration("retry_max", 30.0),
        "staleness": options.duration("staleness", 300.0),
        "batch_size": options.integer("batch_size", 500, minimum=1, maximum=10_000),
    }
    if settings["retry_initial"] > settings["retry_max"]:
        raise options.error(
            "retry_initial",
            f"{settings['retry_initial']:g} s is longer than retry_max "
            f"({settings['retry_max']:g} s)",
        )
    handler: Any = _unbuilt
    if build_handlers:
        handler = _build(types[type_name], options, type_name, timeout)
        try:
            options.check_unused(type_name)
        except HeraldError:
            close = getattr(handler, "close", None)
            if callable(close):
                close()
            raise
    try:
        return Consumer(
            name=name,
            topics=topics,
            handler=handler,
            delivery=delivery,  # type: ignore[arg-type]
            type=type_name,
            **settings,
        )
    except UsageError as exc:
        # TopicFilter names the bad topic or pattern; say where it came from.
        raise options.error("topics", str(exc)) from None
