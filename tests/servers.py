"""A real uvicorn serving one of the project's apps, for the tests that meet the Run API
as its clients do: over a socket, through the threadpool, the pool and the commit
before the answer, which ``TestClient`` hides.

    with uvicorn_server(database_url) as base_url:   # app.api.main:create_app, ready
        httpx.get(f"{base_url}/api/runs/...")

Everything on 127.0.0.1, on a free port; the server is stopped (terminated, killed
after 15 s) when the block ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CREATE_APP = "app.api.main:create_app"
READY_WITHIN_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def start_uvicorn(
    database_url: str,
    port: int,
    *,
    app: str = CREATE_APP,
    factory: bool = True,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    stderr: int | None = None,
    options: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``uvicorn [--factory] APP`` on ``port``, with ``DATABASE_URL`` and ``env`` (and
    uvicorn's ``options``); not waited for (``wait_until_ready``)."""
    command = [sys.executable, "-m", "uvicorn", *(["--factory"] if factory else []), app]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning", *options]
    if workers != 1:
        command += ["--workers", str(workers)]
    environment = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env={**environment, **(env or {})}, stderr=stderr)


def wait_until_ready(
    process: subprocess.Popen[bytes],
    base_url: str,
    *,
    ready: str = "/api/health",
    within: float = READY_WITHIN_S,
) -> None:
    """Until ``GET ready`` answers 200 (``/api/health`` reads the database; pass
    ``/openapi.json`` for a probe that touches none), at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        assert process.poll() is None, f"uvicorn exited with {process.returncode}"
        assert time.monotonic() < deadline, f"uvicorn not ready within {within:.0f} s"
        try:
            if httpx.get(f"{base_url}{ready}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def uvicorn_server(
    database_url: str,
    *,
    app: str = CREATE_APP,
    factory: bool = True,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready: str = "/api/health",
) -> Iterator[str]:
    """A ready uvicorn (``start_uvicorn``'s arguments) for the block: its base URL."""
    port = free_port()
    process = start_uvicorn(database_url, port, app=app, factory=factory, workers=workers, env=env)
    try:
        base_url = f"http://{HOST}:{port}"
        wait_until_ready(process, base_url, ready=ready)
        yield base_url
    finally:
        stop(process)


def app_on(engine: Engine) -> FastAPI:
    """``create_app()`` with its engine dependency overridden: the Run API on ``engine``."""
    from app.api.deps import get_db_engine
    from app.api.main import create_app

    api = create_app()
    api.dependency_overrides[get_db_engine] = lambda: engine
    return api


@contextmanager
def run_api_in_thread(engine: Engine) -> Iterator[str]:
    """The Run API on ``engine`` (``create_app`` with its engine dependency overridden)
    under uvicorn in a thread of this process, on a free port of 127.0.0.1: its base URL.
    For tests that patch the app's module settings (e.g. the SSE ping interval) or share
    the engine's feed with the test. The feed is closed when the block ends."""
    from app.feed import close_feed

    server = uvicorn.Server(uvicorn.Config(app_on(engine), host=HOST, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + READY_WITHIN_S
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        close_feed(engine)
