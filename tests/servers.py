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
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

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
) -> subprocess.Popen[bytes]:
    """``uvicorn [--factory] APP`` on ``port``, with ``DATABASE_URL`` and ``env``; not
    waited for (``wait_until_ready``)."""
    command = [sys.executable, "-m", "uvicorn", *(["--factory"] if factory else []), app]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    if workers != 1:
        command += ["--workers", str(workers)]
    environment = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env={**environment, **(env or {})}, stderr=stderr)


def wait_until_ready(
    process: subprocess.Popen[bytes], base_url: str, *, ready: str = "/api/health"
) -> None:
    """Until ``GET ready`` answers 200 (``/api/health`` reads the database; pass
    ``/openapi.json`` for a probe that touches none), at most ``READY_WITHIN_S``."""
    deadline = time.monotonic() + READY_WITHIN_S
    while True:
        assert process.poll() is None, f"uvicorn exited with {process.returncode}"
        assert time.monotonic() < deadline, f"uvicorn not ready within {READY_WITHIN_S:.0f} s"
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
