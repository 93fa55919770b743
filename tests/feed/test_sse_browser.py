"""The browser client of the event stream (``examples/browser/stream.html``) in a real
headless Chromium, on both backends.

The host application of ``examples/browser/app.py`` (its own route, the Run API
mounted, the page beside it: same origin) runs under uvicorn on 127.0.0.1 in a
process of its own, so the test can kill it and start it again on the same port.
Chromium is Debian's package (``scripts/ensure-chromium``), driven over the
DevTools protocol: ``Runtime.evaluate`` on the page reads what it shows. Missing
Chromium skips these tests, except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from websockets.sync.client import connect as websocket_connect

from app.db import unit_of_work
from app.repositories import EventRepository, RunRepository
from app.repositories.reads import EventReads
from tests.concurrency import seed
from tests.factories import SessionFactory

pytestmark = pytest.mark.slow  # a uvicorn process (started twice) and a browser per backend

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
WAIT_SECONDS = 30.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "Chromium is not installed; install it with scripts/ensure-chromium"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(reason + " (CI=true: a missing browser is a failure)")
    pytest.skip(reason)


def wait_until(what: str, check: Callable[[], Any], seconds: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


class HostApp:
    """``uvicorn examples.browser.app:app`` on one port, which survives a restart."""

    def __init__(self, database_url: str) -> None:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "uvicorn", "examples.browser.app:app"]
        command += ["--host", HOST, "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env)
        process = self.process

        def ready() -> bool:
            assert process.poll() is None, f"uvicorn exited with {process.returncode}"
            try:
                return httpx.get(f"{self.url}/hello", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until("the host app answers", ready)

    def kill(self) -> None:
        """SIGKILL: the open streams break without a last message, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class Page:
    """One Chromium showing ``url``, read over the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path, url: str) -> None:
        profile.mkdir()
        self.closing = ExitStack()
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes go with it (close)
        )
        try:
            active = profile / "DevToolsActivePort"  # Chromium writes its port there

            def port() -> str | None:
                assert self.process.poll() is None, f"chromium exited {self.process.returncode}"
                lines = active.read_text().split() if active.exists() else []
                return lines[0] if len(lines) >= 2 else None

            devtools = f"http://{HOST}:{wait_until('chromium listens', port)}"

            def page_target() -> str | None:
                with urllib.request.urlopen(f"{devtools}/json/list", timeout=5) as answer:
                    targets = json.load(answer)
                pages = [t for t in targets if t["type"] == "page" and t["url"] == url]
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            target = wait_until("the page's target", page_target)
            self.socket = self.closing.enter_context(
                websocket_connect(target, max_size=None, open_timeout=10)
            )
        except BaseException:
            self.close()
            raise
        self.calls = 0

    def evaluate(self, expression: str) -> Any:
        self.calls += 1
        call = {"expression": expression, "returnByValue": True}
        self.socket.send(
            json.dumps({"id": self.calls, "method": "Runtime.evaluate", "params": call})
        )
        while True:  # no domain is enabled: only answers come, but skip anything else
            answer = json.loads(self.socket.recv(timeout=10))
            if answer.get("id") == self.calls:
                break
        result = answer["result"]
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def state(self) -> dict[str, Any]:
        """What the page shows: its status line and the events, as [seq, type]."""
        return self.evaluate(
            """({
              status: document.getElementById("status")?.textContent ?? "",
              events: [...document.querySelectorAll("#events li")]
                .map((li) => [Number(li.dataset.seq), li.dataset.type]),
            })"""
        )

    def close(self) -> None:
        self.closing.close()
        try:  # the browser and its helpers; a throwaway profile needs no clean shutdown
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


@pytest.fixture
def host_app(engine: Engine, database_url: str) -> Iterator[HostApp]:
    server = HostApp(database_url)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def open_page(tmp_path: Path) -> Iterator[Callable[[str], Page]]:
    chromium = chromium_path()
    pages: list[Page] = []

    def open_(url: str) -> Page:
        pages.append(Page(chromium, tmp_path / f"profile-{len(pages)}", url))
        return pages[-1]

    try:
        yield open_
    finally:
        for page in pages:
            page.close()


def running_run(engine: Engine) -> tuple[str, str]:
    session_id = seed(engine, lambda db: SessionFactory().id)
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "watch me"})
        runs.start(run.id)
    return session_id, run.id


def append(engine: Engine, session_id: str, run_id: str, *types: str) -> None:
    for n, type_ in enumerate(types):
        with unit_of_work(engine) as db:  # one commit each: the page gets them one by one
            EventRepository(db).append(session_id, type_, {"n": n}, run_id=run_id)


def shown_seqs(page: Page) -> list[int]:
    return [seq for seq, _type in page.state()["events"]]


def test_the_page_follows_a_live_run_and_resumes_after_the_server_restarts(
    engine: Engine, host_app: HostApp, open_page: Callable[[str], Page]
) -> None:
    session_id, run_id = running_run(engine)  # seq 1 run_created, 2 run_started
    page = open_page(f"{host_app.url}/stream.html?run={run_id}")
    wait_until(
        "the first events",
        lambda: (
            page.state() == {"status": "open", "events": [[1, "run_created"], [2, "run_started"]]}
        ),
    )

    # While the page is open: listened types, one sent unnamed (its type is `end`,
    # the stream's own last message), and one type the page has no listener for.
    append(engine, session_id, run_id, "tool_call", "tool_result", "end", "not_listened")
    wait_until("the live events", lambda: shown_seqs(page) == [1, 2, 3, 4, 5])
    assert page.state()["status"] == "open"  # the `end`-typed event did not end it

    # The server dies mid-stream; events commit while it is down.
    host_app.kill()
    wait_until("the page notices", lambda: page.state()["status"] == "reconnecting")
    append(engine, session_id, run_id, "tool_call", "tool_result")  # seqs 7, 8
    host_app.start()
    wait_until("the resumed events", lambda: shown_seqs(page) == [1, 2, 3, 4, 5, 7, 8])

    append(engine, session_id, run_id, "tool_call")  # seq 9
    with unit_of_work(engine) as db:
        RunRepository(db).complete(run_id, {"tokens": 5})  # seq 10
    wait_until("the end", lambda: page.state()["status"] == "ended at seq 10")

    stored = EventReads.of(engine).page_for_run(run_id, since_seq=0, limit=100).items
    expected = [[e.seq, e.type] for e in stored if e.type != "not_listened"]
    assert page.state()["events"] == expected  # each once, in order: no duplicate, no gap
    assert [seq for seq, _ in expected] == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert page.evaluate("source.readyState") == 2  # CLOSED: it will not reconnect


def test_the_page_stops_on_the_streams_error_message(
    engine: Engine, host_app: HostApp, open_page: Callable[[str], Page]
) -> None:
    """A run deleted while followed: ``event: error`` reaches the page's ``error``
    listener as a message with data (unlike the browser's own connection errors)."""
    _session_id, run_id = running_run(engine)
    page = open_page(f"{host_app.url}/stream.html?run={run_id}")
    wait_until("the first events", lambda: shown_seqs(page) == [1, 2])
    with unit_of_work(engine) as db:
        RunRepository(db).delete(run_id)  # noticed at the stream's next check of the run
    wait_until("the error", lambda: page.state()["status"] == "failed: run_not_found")
    assert page.evaluate("source.readyState") == 2
    assert shown_seqs(page) == [1, 2]
