"""The built-in consumer types: ``jsonl``, ``webhook`` and ``command``.

Each type is a factory ``factory(options, context) -> handler`` (see
:mod:`herald.consumers.config`): it reads and checks its keys when the
configuration is loaded, so a bad key is reported before the daemon starts,
and returns a thread-safe handler that delivers one
:class:`~herald.outbox.LogEntry` per call. Every handler stops its own work
at 0.9 × the consumer's ``timeout`` and fails cleanly
(:class:`~herald.consumers.model.DeliveryFailed`), so the daemon never has to
abandon a call.

``jsonl`` — append each event as one JSON line to a file or a FIFO::

    path = "/var/log/herald/events.jsonl"   # required; the directory must exist
    fsync = false                            # fsync every line (slow, survives power loss)

``webhook`` — POST each event as JSON::

    url = "https://ci.example.org/hooks/herald"   # required; http or https
    secret_env = "HOOK_SECRET"   # or secret = "..."; signs the body (Herald-Signature)
    headers = { Authorization = "Bearer ..." }     # extra request headers

It sends ``Herald-Event-Id`` (the event's position: stable when it is
delivered again or replayed), ``Herald-Seq``, ``Herald-Topic`` and, with a
secret, ``Herald-Signature: sha256=<hex HMAC-SHA256 of the body>`` (GitHub's
convention). 2xx is delivered; 5xx, 408, 429, a timeout or a connection
error is retried; any other answer (4xx, 3xx: redirects are not followed)
cannot be mended by another attempt.

``command`` — run a program per event (no shell), the event on stdin and in
``HERALD_EVENT``::

    command = ["/usr/local/bin/notify", "--fast"]  # or one string, split like a shell would
    env = { SLACK_CHANNEL = "#ci" }                 # added to the daemon's environment
    cwd = "/srv/notify"                             # the working directory

``HERALD_TOPIC``, ``HERALD_SEQ`` and ``HERALD_CONSUMER`` are set too. Exit 0
is delivered; another exit code, a signal or the timeout (the command and
everything it started are killed) is retried; a program that cannot be run
is not.

The event's JSON form is :meth:`LogEntry.to_json`, compact, keys sorted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.client
import importlib
import json
import os
import re
import selectors
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import herald
from herald.consumers.model import Delivered, DeliveryFailed, HandlerContext

if TYPE_CHECKING:
    from herald.consumers.config import Factory, Options
    from herald.outbox import LogEntry

__all__ = [
    "BUILTIN_TYPES",
    "CommandHandler",
    "JsonlHandler",
    "WebhookHandler",
    "event_json",
    "load_object",
]

#: The share of the consumer's timeout a handler allows itself: it must fail
#: on its own, cleanly, before the daemon gives up on the call.
TIMEOUT_SHARE: Final = 0.9
#: The longest a handler waits for one event, whatever the timeout (a day).
MAX_BUDGET: Final = 86_400.0

#: How much of a failed command's stderr / a failed response's body is kept.
STDERR_KEEP: Final = 500
BODY_SNIPPET: Final = 200


def load_object(target: str) -> Any:
    """The object named ``"package.module:attr.sub"``, imported."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name.strip() or not qualname.strip():
        raise ValueError(f"{target!r} is not of the form 'package.module:name'")
    obj: Any = importlib.import_module(module_name.strip())
    for part in qualname.strip().split("."):
        obj = getattr(obj, part)
    return obj


def event_json(entry: LogEntry) -> str:
    """The event as handlers send it: compact JSON with sorted keys."""
    # ASCII-only (\u escapes): the bytes are the same whatever the locale, and a
    # string the database let through can always be encoded.
    return json.dumps(entry.to_json(), separators=(",", ":"), sort_keys=True)


def _budget(context: HandlerContext) -> float:
    # Capped: lock, socket and select timeouts overflow on absurd values (inf).
    return min(context.timeout * TIMEOUT_SHARE, MAX_BUDGET)


def _version() -> str:
    # Looked up when a handler is built: herald/__init__ has finished by then.
    version = getattr(herald, "__version__", None)
    return f"herald/{version}" if isinstance(version, str) else "herald"


# --------------------------------------------------------------------------- jsonl


class JsonlHandler:
    """Appends one JSON line per event to ``path`` (a regular file or a FIFO).

    The fd is opened once with ``O_APPEND`` and kept; every call checks (one
    ``stat``) that ``path`` still names the opened file, and reopens it after
    a rotation or a removal. A line is written with one ``os.write`` under a
    lock, so lines of concurrent calls never interleave; a write cut short
    (a full disk, a full FIFO at the deadline) leaves its rest pending, and
    the next call finishes that line before writing its own, so the stream
    stays one JSON object a line.
    """

    def __init__(self, path: str, *, budget: float, fsync: bool = False) -> None:
        self.path = path
        self.budget = budget
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._fifo = False
        #: the unwritten end of a line cut short on the current fd (b"": none)
        self._pending = b""

    def __repr__(self) -> str:
        return f"JsonlHandler(path={self.path!r}, fsync={self.fsync})"

    def __call__(self, entry: LogEntry) -> Delivered:
        line = (event_json(entry) + "\n").encode()
        deadline = time.monotonic() + self.budget
        if not self._lock.acquire(timeout=self.budget):
            raise DeliveryFailed(f"timed out waiting for the other writers of {self.path}")
        try:
            fd = self._current_fd()
            try:
                # The rest of a line cut short first: the stream stays whole lines.
                done = self._write(fd, self._pending, deadline) and self._write(fd, line, deadline)
            except BrokenPipeError:
                # The FIFO's reader went away: what it did not read is lost
                # with it. Start afresh with the next reader.
                self._close_fd()
                raise DeliveryFailed(f"the reader of FIFO {self.path} went away") from None
            except OSError as exc:
                raise DeliveryFailed(f"cannot write to {self.path}: {exc.strerror}") from None
            if not done:
                raise DeliveryFailed(
                    f"timed out writing to {self.path} after {self.budget:g}s (the FIFO is full)",
                    detail={"timed_out": True},
                )
            if self.fsync and not self._fifo:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise DeliveryFailed(f"cannot fsync {self.path}: {exc.strerror}") from None
        finally:
            self._lock.release()
        return Delivered()

    def _current_fd(self) -> int:
        """The open fd for ``path``, reopened if the file was rotated or removed."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise DeliveryFailed(f"cannot stat {self.path}: {exc.strerror}") from None
            if st is not None and (st.st_dev, st.st_ino) == self._identity:
                return self._fd
            if st is None and self._fifo:
                # Recreating the path would make a regular file where the
                # reader expects its FIFO (its mkfifo would then fail).
                self._close_fd()
                raise DeliveryFailed(f"FIFO {self.path} no longer exists")
            self._close_fd()
        return self._open()

    def _open(self) -> int:
        # O_NONBLOCK: opening a FIFO for writing would block until a reader
        # comes; non-blocking, it fails with ENXIO at once instead.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            parent = os.path.dirname(os.path.abspath(self.path))
            raise DeliveryFailed(
                f"cannot open {self.path}: the directory {parent} does not exist"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise DeliveryFailed(f"no reader on FIFO {self.path}") from None
            raise DeliveryFailed(f"cannot open {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        self._fifo = stat.S_ISFIFO(st.st_mode)
        if not self._fifo:
            # A regular file never blocks; a FIFO keeps O_NONBLOCK so that a
            # full one is waited for with a deadline (select) rather than forever.
            os.set_blocking(fd, True)
        self._fd, self._identity, self._pending = fd, (st.st_dev, st.st_ino), b""
        return fd

    def _write(self, fd: int, data: bytes, deadline: float) -> bool:
        """Write ``data`` by the deadline; whether it was all written.

        When only part of it was written (a full FIFO at the deadline, a full
        disk), the rest becomes the pending part, written first next time.
        """
        view = memoryview(data)
        try:
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    written = 0
                view = view[written:]
                remaining = deadline - time.monotonic()
                if view and remaining <= 0:
                    return False
                if view and written == 0:
                    # A full FIFO: wait until the reader makes room.
                    with selectors.DefaultSelector() as selector:
                        selector.register(fd, selectors.EVENT_WRITE)
                        selector.select(min(remaining, 0.05))
            return True
        finally:
            if len(view) < len(data):
                self._pending = bytes(view)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity, self._pending = self._fd, None, None, b""
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def jsonl_factory(options: Options, context: HandlerContext) -> JsonlHandler:
    """``type = "jsonl"``: ``path`` (required), ``fsync`` (default false).

    The file is opened at the first event, not here: a FIFO may have no
    reader yet, and ``herald consumers`` reads the configuration too.
    """
    path = options.string("path", required=True)
    assert path is not None
    if "\0" in path:
        raise options.error("path", "must not contain a NUL character")
    fsync = options.boolean("fsync", False)
    return JsonlHandler(path, budget=_budget(context), fsync=fsync)


# --------------------------------------------------------------------------- webhook

# RFC 9110 field names; values must not break the header block.
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RESERVED_HEADERS: Final = frozenset({"content-length", "host", "transfer-encoding", "connection"})
_RETRYABLE_4XX: Final = frozenset({408, 429})


class WebhookHandler:
    """POSTs each event as JSON to ``url``; signs the body when a secret is set.

    One connection per call (nothing shared between threads but the TLS
    context, which is thread-safe). Redirects are not followed: a 3xx is a
    failure that another attempt cannot mend. The secret and the headers are
    kept out of every message and of the repr.
    """

    def __init__(
        self,
        url: str,
        *,
        budget: float,
        secret: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self.budget = budget
        self._secret = secret
        self._headers = dict(headers or {})
        self._user_agent = _version()
        self._tls = ssl.create_default_context() if self.https else None

    def __repr__(self) -> str:
        # The path and query may carry a token (Slack-style URLs): host only.
        scheme = "https" if self.https else "http"
        return (
            f"WebhookHandler(url='{scheme}://{self.host}:{self.port}/...', "
            f"signed={self._secret is not None})"
        )

    def headers_for(self, entry: LogEntry, body: bytes) -> dict[str, str]:
        """The request's headers for ``entry`` and its ``body``."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            **self._headers,
            # The event's identity: stable when it is delivered again or replayed.
            "Herald-Event-Id": str(entry.position),
            "Herald-Seq": str(entry.seq),
            "Herald-Topic": entry.topic,
        }
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers["Herald-Signature"] = f"sha256={digest}"
        return headers

    def __call__(self, entry: LogEntry) -> Delivered:
        body = event_json(entry).encode()
        headers = self.headers_for(entry, body)
        start = time.monotonic()
        deadline = start + self.budget
        connection: http.client.HTTPConnection
        if self._tls is not None:
            connection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.budget, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.budget)
        try:
            connection.connect()
            self._limit(connection, deadline)
            connection.request("POST", self.target, body=body, headers=headers)
            self._limit(connection, deadline)
            response = connection.getresponse()
            status = response.status
            if 200 <= status < 300:
                return Delivered(
                    http_status=status,
                    detail={"duration_ms": round((time.monotonic() - start) * 1000)},
                )
            self._limit(connection, deadline)
            snippet = _snippet(response.read(4 * BODY_SNIPPET))
            retry_after = response.getheader("Retry-After")
        except TimeoutError:
            raise DeliveryFailed(
                f"timed out after {self.budget:g}s", detail={"timed_out": True}
            ) from None
        except ConnectionRefusedError:
            raise DeliveryFailed(f"connection refused by {self.host}:{self.port}") from None
        except socket.gaierror as exc:
            raise DeliveryFailed(f"cannot resolve {self.host}: {exc.strerror}") from None
        except ssl.SSLError as exc:
            raise DeliveryFailed(f"TLS error with {self.host}: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryFailed(
                f"request to {self.host}:{self.port} failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            connection.close()
        retry = status >= 500 or status in _RETRYABLE_4XX
        detail: dict[str, Any] = {"body": snippet}
        if retry_after is not None:
            detail["retry_after"] = retry_after[:100]
        reason = http.client.responses.get(status, "")
        message = f"HTTP {status} {reason}".rstrip()
        raise DeliveryFailed(
            f"{message}: {snippet}" if snippet else message,
            retry=retry,
            http_status=status,
            detail=detail,
        )

    @staticmethod
    def _limit(connection: http.client.HTTPConnection, deadline: float) -> None:
        # http.client's timeout is per socket operation; shrink it as the
        # deadline nears so that the whole request ends by the deadline (a
        # server dripping its answer byte by byte can still stretch one stage).
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if connection.sock is not None:
            connection.sock.settimeout(remaining)


def _snippet(data: bytes) -> str:
    text = " ".join(data.decode("utf-8", errors="replace").split())
    return text if len(text) <= BODY_SNIPPET else text[: BODY_SNIPPET - 1] + "…"


def _webhook_secret(options: Options) -> bytes | None:
    """The signing secret from ``secret`` or ``secret_env``; never echoed in an error."""
    # Read raw: Options.string would quote a bad value in its error.
    value = options.raw("secret")
    if options.has("secret") and options.has("secret_env"):
        raise options.error("secret", "give secret or secret_env, not both")
    if options.has("secret"):
        if not isinstance(value, str) or not value:
            raise options.error("secret", "must be a non-empty string")
        return value.encode()
    variable = options.string("secret_env")
    if variable is None:
        return None
    value = os.environ.get(variable, "")
    if not value:
        raise options.error(
            "secret_env", f"the environment variable {variable} is not set or empty"
        )
    return value.encode()


def webhook_factory(options: Options, context: HandlerContext) -> WebhookHandler:
    """``type = "webhook"``: ``url`` (required), ``secret`` or ``secret_env``, ``headers``."""
    url = options.string("url", required=True)
    assert url is not None
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        raise options.error("url", "must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise options.error("url", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = url if parts.password is None else "the URL given"
        raise options.error("url", f"must be an http:// or https:// URL, not {shown!r}")
    if parts.username is not None or parts.password is not None:
        raise options.error(
            "url", "must not carry credentials; send them in headers (Authorization)"
        )
    if parts.fragment:
        raise options.error("url", "must not have a #fragment")
    secret = _webhook_secret(options)
    # Read raw: Options.table would quote the whole table (tokens and all) in
    # its error; values are never shown here.
    table = options.raw("headers", {})
    if not isinstance(table, dict):
        raise options.error("headers", 'must be a table of strings (headers = { Name = "value" })')
    headers: dict[str, str] = {}
    for name, value in table.items():
        if not isinstance(value, str):
            raise options.error(f"headers.{name}", "must be a string")
        if not _HEADER_NAME.match(name):
            raise options.error(f"headers.{name}", "is not a valid header name")
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith("herald-"):
            raise options.error(f"headers.{name}", "is set by herald itself")
        if any(c in value for c in "\r\n\0"):
            raise options.error(f"headers.{name}", "must not contain a line break or NUL")
        headers[name] = value
    return WebhookHandler(url, budget=_budget(context), secret=secret, headers=headers)


# --------------------------------------------------------------------------- command

# Linux refuses one environment string longer than 32 pages (MAX_ARG_STRLEN).
_ENV_STRING_MAX: Final = 32 * 4096 - len("HERALD_EVENT=") - 1


class CommandHandler:
    """Runs ``argv`` once per event: the event on stdin and in ``HERALD_EVENT``.

    The command runs in a session of its own, so that a timeout kills it and
    everything it started (``killpg``) rather than the direct child only.
    stdout is discarded; the end of stderr is kept for the record. An event
    too large for one environment variable (128 KiB) is given on stdin only.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        budget: float,
        consumer: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.budget = budget
        self.consumer = consumer
        self.env = dict(env or {})
        self.cwd = cwd

    def __repr__(self) -> str:
        return f"CommandHandler(argv={self.argv!r}, cwd={self.cwd!r})"

    def __call__(self, entry: LogEntry) -> Delivered:
        text = event_json(entry)
        body = text.encode()
        env = {**os.environ, **self.env}
        env.update(
            HERALD_TOPIC=entry.topic, HERALD_SEQ=str(entry.seq), HERALD_CONSUMER=self.consumer
        )
        if len(body) <= _ENV_STRING_MAX:
            env["HERALD_EVENT"] = text
        else:
            env.pop("HERALD_EVENT", None)
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise self._cannot_run(exc) from None
        try:
            stderr, timed_out = _converse(process, body, start + self.budget)
        finally:
            if process.returncode is None:
                # Timed out, or interrupted: the whole group goes.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        duration_ms = round((time.monotonic() - start) * 1000)
        tail = stderr.decode("utf-8", errors="replace")[-STDERR_KEEP:]
        code = process.returncode
        if timed_out:
            raise DeliveryFailed(
                f"timed out after {self.budget:g}s; the command was killed",
                detail={"timed_out": True, "duration_ms": duration_ms, "stderr": tail},
            )
        if code == 0:
            return Delivered(detail={"exit_code": 0, "duration_ms": duration_ms})
        if code < 0:
            name = _signal_name(-code)
            raise DeliveryFailed(
                f"killed by signal {name}",
                detail={
                    "signal": -code,
                    "signal_name": name,
                    "duration_ms": duration_ms,
                    "stderr": tail,
                },
            )
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        message = (
            f"exit code {code}: {last.strip()[:BODY_SNIPPET]}" if last else f"exit code {code}"
        )
        raise DeliveryFailed(
            message, detail={"exit_code": code, "duration_ms": duration_ms, "stderr": tail}
        )

    def _cannot_run(self, exc: OSError) -> DeliveryFailed:
        program = self.argv[0]
        if self.cwd is not None and exc.filename == self.cwd:
            # The directory may appear (a mount): worth another attempt.
            return DeliveryFailed(f"cannot change to directory {self.cwd}: {exc.strerror}")
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError) or (
            exc.errno in (errno.ENOEXEC, errno.ENOTDIR)
        ):
            return DeliveryFailed(f"cannot run {program}: {exc.strerror}", retry=False)
        return DeliveryFailed(f"cannot run {program}: {exc.strerror or exc}")


def _converse(process: subprocess.Popen[bytes], body: bytes, deadline: float) -> tuple[bytes, bool]:
    """Feed ``body`` to stdin and collect stderr until the process ends or the deadline.

    Returns the end of stderr and whether the deadline passed. Unlike
    ``communicate``, stderr is kept bounded and a background child that
    keeps stderr open does not hold the call once the command has exited.
    """
    assert process.stdin is not None
    assert process.stderr is not None
    stdin, stderr = process.stdin, process.stderr
    tail = bytearray()
    view = memoryview(body)
    with selectors.DefaultSelector() as selector:
        if view:
            os.set_blocking(stdin.fileno(), False)
            selector.register(stdin, selectors.EVENT_WRITE)
        else:
            stdin.close()
        os.set_blocking(stderr.fileno(), False)
        selector.register(stderr, selectors.EVENT_READ)
        try:
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(tail), True
                for key, _ in selector.select(min(remaining, 0.05)):
                    if key.fileobj is stdin:
                        view = _feed(stdin.fileno(), view)
                        if not view:
                            selector.unregister(stdin)
                            stdin.close()
                    elif not _read_into(stderr.fileno(), tail):
                        selector.unregister(stderr)
                if process.poll() is not None and stdin not in _files(selector):
                    # Exited; whatever still holds stderr open is its own business.
                    _read_into(stderr.fileno(), tail)
                    break
        finally:
            view.release()
            for pipe in (stdin, stderr):
                pipe.close()
    remaining = deadline - time.monotonic()
    try:
        process.wait(timeout=max(remaining, 0.0))
    except subprocess.TimeoutExpired:
        return bytes(tail), True
    return bytes(tail), False


def _feed(fd: int, view: memoryview) -> memoryview:
    """Write what the pipe takes of ``view``; the rest (empty once all is written)."""
    try:
        return view[os.write(fd, view[:65536]) :]
    except BlockingIOError:
        return view
    except BrokenPipeError:
        return view[:0]  # the command does not read its stdin: its business


def _files(selector: selectors.BaseSelector) -> list[object]:
    return [key.fileobj for key in selector.get_map().values()]


def _read_into(fd: int, tail: bytearray) -> bool:
    """Read what is there into ``tail`` (its last 4 KiB kept); False at end of file."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        tail += chunk
        del tail[:-4096]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def command_factory(options: Options, context: HandlerContext) -> CommandHandler:
    """``type = "command"``: ``command`` (required), ``env``, ``cwd``.

    ``command`` is a list of arguments, or one string split as a shell would
    split it (quotes, no expansion: no shell runs); ``env`` a table of strings.
    """
    value = options.raw("command")
    if isinstance(value, str):
        line = options.string("command", required=True)
        assert line is not None
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise options.error("command", f"cannot be split into words: {exc}") from None
    else:
        argv = options.strings("command", required=True)
    if not argv:
        raise options.error("command", "is empty; give the program and its arguments")
    if any("\0" in arg for arg in argv):
        raise options.error("command", "must not contain a NUL character")
    env = options.table("env")
    for name, text in env.items():
        if not name or "=" in name or "\0" in name or "\0" in text:
            raise options.error(f"env.{name}", "is not a valid environment variable")
    cwd = options.string("cwd")
    return CommandHandler(
        argv, budget=_budget(context), consumer=context.consumer, env=env, cwd=cwd
    )


BUILTIN_TYPES: Final[dict[str, Factory]] = {
    "jsonl": jsonl_factory,
    "webhook": webhook_factory,
    "command": command_factory,
}
