"""The built-in consumer types against real files, FIFOs, subprocesses and an HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import os
import resource
import select
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import herald
from herald.consumers.builtin import (
    BUILTIN_TYPES,
    CommandHandler,
    JsonlHandler,
    WebhookHandler,
    event_json,
    load_object,
)
from herald.consumers.config import Options
from herald.consumers.model import Delivered, DeliveryFailed, HandlerContext
from herald.errors import ConfigError
from herald.outbox import LogEntry

SECRET = "s3cr3t-hook-value"
WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def entry(seq: int = 1, topic: str = "build_finished", **payload: Any) -> LogEntry:
    return LogEntry(
        seq=seq,
        position=1000 + seq,
        topic=topic,
        payload={"build_id": seq, "dependent_ids": [], **payload},
        delivery="at_least_once",
        dedupe_key=None,
        aggregate_id=None,
        aggregate_version=None,
        trace_id="trace-1",
        occurred_at=WHEN,
        recorded_at=WHEN,
    )


Build = Callable[..., Any]


@pytest.fixture
def build() -> Iterator[Build]:
    """Builds a handler through its factory, as the configuration does; closes it after."""
    handlers: list[Any] = []

    def make(type_name: str, *, timeout: float = 5.0, **values: Any) -> Any:
        options = Options("test.toml", "c1", values)
        handler = BUILTIN_TYPES[type_name](options, HandlerContext(consumer="c1", timeout=timeout))
        handlers.append(handler)
        options.check_unused(type_name)
        return handler

    yield make
    for handler in handlers:
        close = getattr(handler, "close", None)
        if callable(close):
            close()


def config_error(type_name: str, **values: Any) -> ConfigError:
    options = Options("test.toml", "c1", values)
    with pytest.raises(ConfigError) as caught:
        handler = BUILTIN_TYPES[type_name](options, HandlerContext(consumer="c1", timeout=5.0))
        options.check_unused(type_name)
        getattr(handler, "close", lambda: None)()
    return caught.value


# --------------------------------------------------------------------------- load_object


def test_load_object_imports_module_and_attribute_path() -> None:
    assert load_object("json:dumps") is json.dumps
    assert load_object("os:path.join") is os.path.join
    with pytest.raises(ValueError, match=r"package\.module:name"):
        load_object("json.dumps")
    with pytest.raises(ValueError, match=r"package\.module:name"):
        load_object("json:")
    with pytest.raises(AttributeError):
        load_object("json:no_such_function")
    with pytest.raises(ImportError):
        load_object("no_such_module_for_herald:f")


def test_event_json_is_compact_sorted_and_ascii() -> None:
    event = entry(7, note="café")
    text = event_json(event)
    assert text == json.dumps(event.to_json(), separators=(",", ":"), sort_keys=True)
    assert text.isascii()
    assert json.loads(text) == event.to_json()


# --------------------------------------------------------------------------- jsonl


def read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_jsonl_appends_one_line_per_event(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"seq":0}\n')  # appended to, never truncated
    handler = build("jsonl", path=str(path))
    assert isinstance(handler, JsonlHandler)
    events = [entry(seq) for seq in (1, 2, 3)]
    for event in events:
        assert isinstance(handler(event), Delivered)
        # flushed to the OS before the call returns: readable at once
        assert path.read_text().splitlines()[-1] == event_json(event)
    assert read_lines(path) == [{"seq": 0}] + [event.to_json() for event in events]


def test_jsonl_concurrent_writers_never_interleave(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    handler = build("jsonl", path=str(path))
    threads, per_thread = 8, 150
    padding = "x" * 20_000  # lines much longer than PIPE_BUF

    def write(start: int) -> None:
        for seq in range(start, start + per_thread):
            handler(entry(seq, padding=padding))

    workers = [threading.Thread(target=write, args=(t * per_thread,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    lines = read_lines(path)
    assert sorted(line["seq"] for line in lines) == list(range(threads * per_thread))
    assert all(line["payload"]["padding"] == padding for line in lines)


def test_jsonl_reopens_a_rotated_or_removed_file(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    handler = build("jsonl", path=str(path), fsync=True)
    handler(entry(1))
    path.rename(tmp_path / "events.jsonl.1")  # logrotate
    handler(entry(2))
    path.unlink()  # removed
    handler(entry(3))
    handler(entry(4))
    assert [line["seq"] for line in read_lines(tmp_path / "events.jsonl.1")] == [1]
    assert [line["seq"] for line in read_lines(path)] == [3, 4]


def test_jsonl_finishes_a_line_cut_short_before_the_next(build: Build, tmp_path: Path) -> None:
    # A file size limit makes the kernel write part of a line, then refuse (EFBIG),
    # as a full disk would.
    path = tmp_path / "events.jsonl"
    handler = build("jsonl", path=str(path))
    handler(entry(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
        with pytest.raises(DeliveryFailed, match=r"cannot write to .*: File too large") as caught:
            handler(entry(2, padding="q" * 1000))
        assert caught.value.retry
        with pytest.raises(DeliveryFailed, match="File too large"):
            handler(entry(3))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    handler(entry(4))
    assert [line["seq"] for line in read_lines(path)] == [1, 2, 4]


def test_jsonl_missing_directory_fails_clearly(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "events.jsonl"
    handler = build("jsonl", path=str(path))
    with pytest.raises(DeliveryFailed, match=r"directory .*nowhere does not exist") as caught:
        handler(entry(1))
    assert caught.value.retry
    assert not path.parent.exists()  # not created behind the operator's back
    path.parent.mkdir()
    handler(entry(2))
    assert [line["seq"] for line in read_lines(path)] == [2]


class FifoReader:
    """Reads lines from a FIFO in a thread until told to stop."""

    def __init__(self, path: Path) -> None:
        # Non-blocking open: the reader exists from now on, without a writer.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.02)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    self.data += os.read(self.fd, 65536)

    def lines(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while self.data.count(b"\n") < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return [json.loads(line) for line in bytes(self.data).splitlines()]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.fd)


def test_jsonl_into_a_fifo_with_a_reader(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    handler = build("jsonl", path=str(path), timeout=2.0)
    reader = FifoReader(path)
    try:
        # 40 lines of 20 kB: more than the pipe holds, so the writer waits for the reader.
        for seq in range(40):
            handler(entry(seq, padding="y" * 20_000))
        lines = reader.lines(40)
    finally:
        reader.close()
    assert [line["seq"] for line in lines] == list(range(40))


def test_jsonl_fifo_without_reader_is_retryable(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    handler = build("jsonl", path=str(path))
    with pytest.raises(DeliveryFailed, match="no reader on FIFO") as caught:
        handler(entry(1))
    assert caught.value.retry
    reader = FifoReader(path)
    try:
        handler(entry(2))
        assert [line["seq"] for line in reader.lines(1)] == [2]
    finally:
        reader.close()
    # The reader went away: the write fails (EPIPE), the next reader gets whole lines.
    with pytest.raises(DeliveryFailed) as caught:
        handler(entry(3))
    assert caught.value.retry
    reader = FifoReader(path)
    try:
        handler(entry(4))
        assert [line["seq"] for line in reader.lines(1)] == [4]
    finally:
        reader.close()


def test_jsonl_full_fifo_times_out_then_finishes_the_cut_line(build: Build, tmp_path: Path) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    handler = build("jsonl", path=str(path), timeout=0.3)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader that reads nothing yet
    try:
        delivered = 0
        start = time.monotonic()
        with pytest.raises(DeliveryFailed, match="timed out") as caught:
            for seq in range(100):
                handler(entry(seq, padding="z" * 30_000))
                delivered += 1
        assert caught.value.retry
        assert caught.value.detail == {"timed_out": True}
        assert time.monotonic() - start < 0.3 * (delivered + 1)
        # The reader catches up; the next event comes after the rest of the cut line.
        data = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                data += chunk
        handler(entry(1000))
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                data += chunk
    finally:
        os.close(fd)
    seqs = [json.loads(line)["seq"] for line in bytes(data).splitlines()]
    assert seqs == [*range(delivered + 1), 1000]  # the timed-out one, whole, then the next


def test_jsonl_config_errors() -> None:
    assert "consumers.c1.path: is required" in str(config_error("jsonl"))
    assert "consumers.c1.path: must be a non-empty string" in str(config_error("jsonl", path=""))
    assert "consumers.c1.fsync" in str(config_error("jsonl", path="/tmp/x", fsync="yes"))
    assert "consumers.c1.pth: unknown key; jsonl takes: fsync, path" in str(
        config_error("jsonl", path="/tmp/x", pth="/tmp/y")
    )


# --------------------------------------------------------------------------- command


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


REPORT = """
import json, os, sys
json.dump({
    "stdin": sys.stdin.read(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("HERALD_", "EXTRA"))},
    "cwd": os.getcwd(),
}, open(sys.argv[1], "w"))
"""


def test_command_gets_the_event_on_stdin_and_in_env(build: Build, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    handler = build(
        "command", command=python(REPORT, str(report)), env={"EXTRA_ONE": "1"}, cwd=str(tmp_path)
    )
    assert isinstance(handler, CommandHandler)
    event = entry(42, topic="build_started")
    result = handler(event)
    assert isinstance(result, Delivered)
    assert result.detail is not None
    assert result.detail["exit_code"] == 0
    assert result.detail["duration_ms"] >= 0
    seen = json.loads(report.read_text())
    assert json.loads(seen["stdin"]) == event.to_json()
    assert seen["stdin"] == seen["env"]["HERALD_EVENT"] == event_json(event)
    assert seen["env"]["HERALD_TOPIC"] == "build_started"
    assert seen["env"]["HERALD_SEQ"] == "42"
    assert seen["env"]["HERALD_CONSUMER"] == "c1"
    assert seen["env"]["EXTRA_ONE"] == "1"
    assert Path(seen["cwd"]) == tmp_path


def test_command_as_a_string_is_split_without_a_shell(build: Build, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    line = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {out} '$HOME; echo hi'"
    handler = build("command", command=line)
    handler(entry(1))
    assert out.read_text() == "$HOME; echo hi"


def test_command_exit_code_fails_with_the_last_stderr_line(build: Build) -> None:
    code = "import sys; sys.stderr.write('first\\nit broke\\n'); sys.exit(3)"
    handler = build("command", command=python(code))
    with pytest.raises(DeliveryFailed, match=r"^exit code 3: it broke$") as caught:
        handler(entry(1))
    assert caught.value.retry
    assert caught.value.detail is not None
    assert caught.value.detail["exit_code"] == 3
    assert caught.value.detail["stderr"] == "first\nit broke\n"


def test_command_stderr_kept_is_bounded(build: Build) -> None:
    code = "import sys; sys.stderr.write('e' * 3_000_000 + '\\nlast'); sys.exit(1)"
    handler = build("command", command=python(code))
    with pytest.raises(DeliveryFailed, match=r"^exit code 1: last$") as caught:
        handler(entry(1))
    assert caught.value.detail is not None
    assert len(caught.value.detail["stderr"]) == 500


def test_command_timeout_kills_the_whole_process_group(build: Build, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "30"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(30)
"""
    handler = build("command", command=python(code, str(pids)), timeout=1.0)
    start = time.monotonic()
    with pytest.raises(DeliveryFailed, match=r"timed out after 0\.9s") as caught:
        handler(entry(1))
    assert 0.85 < time.monotonic() - start < 1.0
    assert caught.value.retry
    assert caught.value.detail is not None
    assert caught.value.detail["timed_out"] is True
    command_pid, sleep_pid = map(int, pids.read_text().split())
    assert not alive(command_pid)
    deadline = time.monotonic() + 2
    while alive(sleep_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(sleep_pid)


def test_command_background_child_holding_stderr_does_not_hold_the_call(
    build: Build, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    code = """
import subprocess, sys
child = subprocess.Popen(["sleep", "30"])  # inherits stderr, outlives the command
open(sys.argv[1], "w").write(str(child.pid))
"""
    handler = build("command", command=python(code, str(pid_file)), timeout=10.0)
    start = time.monotonic()
    try:
        assert isinstance(handler(entry(1)), Delivered)
        assert time.monotonic() - start < 2.0
    finally:
        os.kill(int(pid_file.read_text()), 9)


def test_command_killed_by_a_signal(build: Build) -> None:
    handler = build("command", command=python("import os, signal; os.kill(os.getpid(), 15)"))
    with pytest.raises(DeliveryFailed, match=r"^killed by signal SIGTERM$") as caught:
        handler(entry(1))
    assert caught.value.detail is not None
    assert caught.value.detail["signal"] == 15
    assert caught.value.detail["signal_name"] == "SIGTERM"


def test_command_missing_program_is_not_retryable(build: Build, tmp_path: Path) -> None:
    handler = build("command", command=[str(tmp_path / "no-such-program"), "x"])
    with pytest.raises(
        DeliveryFailed, match=r"cannot run .*no-such-program: No such file"
    ) as caught:
        handler(entry(1))
    assert not caught.value.retry
    missing_cwd = build("command", command=python("pass"), cwd=str(tmp_path / "gone"))
    with pytest.raises(DeliveryFailed, match="cannot change to directory") as caught:
        missing_cwd(entry(1))
    assert caught.value.retry


def test_command_large_event_goes_on_stdin_only(build: Build, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    handler = build("command", command=python(REPORT, str(report)))
    event = entry(1, padding="p" * 400_000)  # over one environment string's limit
    handler(event)
    seen = json.loads(report.read_text())
    assert seen["stdin"] == event_json(event)
    assert "HERALD_EVENT" not in seen["env"]
    # A command that ignores its stdin is fine too.
    quiet = build("command", command=python("pass"))
    assert isinstance(quiet(event), Delivered)


def test_command_runs_concurrently(build: Build) -> None:
    handler = build("command", command=python("import sys, json; json.load(sys.stdin)"))
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(handler(entry(s)))) for s in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(isinstance(result, Delivered) for result in results)


def test_command_config_errors() -> None:
    assert "consumers.c1.command: is required" in str(config_error("command"))
    assert "consumers.c1.command: is empty" in str(config_error("command", command=[]))
    assert "consumers.c1.command: must be a non-empty string" in str(
        config_error("command", command="  ")
    )
    assert "cannot be split" in str(config_error("command", command="echo 'unclosed"))
    assert "consumers.c1.command: must be a list of strings" in str(
        config_error("command", command=["echo", 1])
    )
    assert "consumers.c1.env" in str(config_error("command", command="true", env={"A": 1}))
    assert "consumers.c1.cwd" in str(config_error("command", command="true", cwd=""))


# --------------------------------------------------------------------------- webhook


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the request threads
    request_queue_size = 64  # 8 clients at once: no SYN dropped (and retried after 1 s)
    requests: list[tuple[str, dict[str, str], bytes]]
    stop: threading.Event


class Hook(http.server.BaseHTTPRequestHandler):
    """``/status/N`` answers N; ``/sleep`` answers after 3 s (or when the test ends)."""

    server: Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, dict(self.headers.items()), body))
        status = 200
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2])
        elif self.path == "/sleep":
            self.server.stop.wait(3)
        self.send_response(status)
        if status in (301, 302):
            self.send_header("Location", "/status/200")
        if status in (429, 503):
            self.send_header("Retry-After", "120")
        answer = b"" if status == 204 else f"no luck ({status})\n{'.' * 500}".encode()
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Hook)
    httpd.requests = []
    httpd.stop = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_webhook_posts_the_event_signed(build: Build, server: Server) -> None:
    handler = build(
        "webhook", url=url(server, "/hook?team=ci"), secret=SECRET, headers={"X-Token": "abc"}
    )
    assert isinstance(handler, WebhookHandler)
    event = entry(5, topic="build_started")
    result = handler(event)
    assert isinstance(result, Delivered)
    assert result.http_status == 200
    [(path, headers, body)] = server.requests
    assert path == "/hook?team=ci"
    assert json.loads(body) == event.to_json()
    assert body == event_json(event).encode()
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"herald/{herald.__version__}"
    assert headers["Herald-Event-Id"] == str(event.position) == "1005"
    assert headers["Herald-Seq"] == "5"
    assert headers["Herald-Topic"] == "build_started"
    assert headers["X-Token"] == "abc"
    algorithm, _, signature = headers["Herald-Signature"].partition("=")
    assert algorithm == "sha256"
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected)
    forged = hmac.new(b"another secret", body, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(signature, forged)


def test_webhook_secret_from_the_environment(
    build: Build, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERALD_TEST_HOOK_SECRET", "from-env")
    handler = build("webhook", url=url(server, "/"), secret_env="HERALD_TEST_HOOK_SECRET")
    handler(entry(1))
    unsigned = build("webhook", url=url(server, "/"))
    unsigned(entry(2))
    (_, signed_headers, body), (_, unsigned_headers, _) = server.requests
    digest = hmac.new(b"from-env", body, hashlib.sha256).hexdigest()
    assert signed_headers["Herald-Signature"] == f"sha256={digest}"
    assert "Herald-Signature" not in unsigned_headers


@pytest.mark.parametrize("status", [200, 201, 204])
def test_webhook_2xx_is_delivered(build: Build, server: Server, status: int) -> None:
    handler = build("webhook", url=url(server, f"/status/{status}"))
    result = handler(entry(1))
    assert isinstance(result, Delivered)
    assert result.http_status == status
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (500, True),
        (503, True),
        (408, True),
        (429, True),
        (400, False),
        (404, False),
        (410, False),
        (302, False),
    ],
)
def test_webhook_failures_say_whether_to_retry(
    build: Build, server: Server, status: int, retry: bool
) -> None:
    handler = build("webhook", url=url(server, f"/status/{status}"), secret=SECRET)
    with pytest.raises(
        DeliveryFailed, match=rf"^HTTP {status} \w.*: no luck \({status}\)"
    ) as caught:
        handler(entry(1))
    failure = caught.value
    assert failure.retry is retry
    assert failure.http_status == status
    assert failure.detail is not None
    assert len(failure.detail["body"]) <= 200
    assert len(str(failure)) < 260
    if status in (429, 503):
        assert failure.detail["retry_after"] == "120"
    assert len(server.requests) == 1  # a redirect is not followed
    assert SECRET not in str(failure)
    assert SECRET not in repr(failure.detail)
    assert SECRET not in repr(handler)


def test_webhook_timeout_is_retryable(build: Build, server: Server) -> None:
    handler = build("webhook", url=url(server, "/sleep"), timeout=0.5, secret=SECRET)
    start = time.monotonic()
    with pytest.raises(DeliveryFailed, match=r"timed out after 0\.45s") as caught:
        handler(entry(1))
    assert time.monotonic() - start < 0.5
    assert caught.value.retry
    assert caught.value.http_status is None
    assert SECRET not in str(caught.value)


def test_webhook_connection_refused_is_retryable(build: Build) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handler = build("webhook", url=f"http://127.0.0.1:{port}/hook", secret=SECRET)
    with pytest.raises(DeliveryFailed, match="connection refused") as caught:
        handler(entry(1))
    assert caught.value.retry
    assert caught.value.http_status is None
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(handler)
    assert str(port) in repr(handler)


def test_webhook_concurrent_posts(build: Build, server: Server) -> None:
    handler = build("webhook", url=url(server, "/"), secret=SECRET)
    threads = [
        threading.Thread(target=lambda t=t: [handler(entry(t * 10 + i)) for i in range(10)])
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(h["Herald-Seq"]) for _, h, _ in server.requests) == list(range(80))
    for _, headers, body in server.requests:
        digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["Herald-Signature"] == f"sha256={digest}"


def test_webhook_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERALD_TEST_UNSET", raising=False)
    monkeypatch.setenv("HERALD_TEST_EMPTY", "")
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "consumers.c1.url: is required"),
        ({"url": "ftp://example.org/x"}, "consumers.c1.url: must be an http:// or https:// URL"),
        ({"url": "example.org/hook"}, "consumers.c1.url: must be an http:// or https:// URL"),
        ({"url": "http://"}, "consumers.c1.url: must be an http:// or https:// URL"),
        ({"url": "http://h/a b"}, "consumers.c1.url: must not contain spaces or control"),
        ({"url": "http://host:99999/"}, "consumers.c1.url: is not a valid URL"),
        ({"url": f"https://u:{SECRET}@host/"}, "consumers.c1.url: must not carry credentials"),
        ({"url": "http://h/", "secret": SECRET, "secret_env": "X"}, "not both"),
        ({"url": "http://h/", "secret": 12345}, "consumers.c1.secret: must be a non-empty string"),
        (
            {"url": "http://h/", "secret_env": "HERALD_TEST_UNSET"},
            "consumers.c1.secret_env: the environment variable HERALD_TEST_UNSET is not set",
        ),
        ({"url": "http://h/", "secret_env": "HERALD_TEST_EMPTY"}, "HERALD_TEST_EMPTY is not set"),
        ({"url": "http://h/", "headers": {"X-A": f"{SECRET}\r\nX-B: 1"}}, "headers.X-A: must not"),
        ({"url": "http://h/", "headers": {"Herald-Seq": "1"}}, "headers.Herald-Seq: is set by"),
        ({"url": "http://h/", "headers": {"Bad Name": "1"}}, "not a valid header name"),
        ({"url": "http://h/", "headers": "Authorization: x"}, "consumers.c1.headers: must be"),
        ({"url": "http://h/", "urll": "http://h/"}, "consumers.c1.urll: unknown key; webhook"),
    ]
    for values, message in cases:
        error = str(config_error("webhook", **values))
        assert message in error, (values, error)
        assert SECRET not in error
        assert "12345" not in error
