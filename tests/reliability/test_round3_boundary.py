"""Reliability round 3 (issue 22), the engine, the unit of work and the HTTP boundary:

* a refused commit never sends its connection back to the pool inside the aborted
  transaction (PostgreSQL);
* bodies over the limit are refused with 413 ``too_large`` before they are read whole
  (a real uvicorn on 127.0.0.1);
* JSON bodies nested too deep for the parser are the documented 400 / 422;
* a database that cannot be reached is a 503 ``database_unavailable``, a database
  that is missing or not migrated stops the server at start-up with one line, and
  the server never creates a SQLite file (a real uvicorn on 127.0.0.1).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app.api.deps import SessionDep
from app.api.limits import BODY_ENVELOPE_BYTES
from app.db import create_db_engine, unit_of_work
from app.errors import ActiveRunExistsError, TransactionAbortedError
from app.input_limits import DEFAULT_MAX_JSON_BYTES
from app.models import RunStatus
from app.repositories import RunRepository
from migrations import MIGRATIONS, upgrade
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.reliability.figures import record
from tests.servers import HOST, ROOT, app_on, free_port, start_uvicorn, stop

# --------------------------------------------------------------------------
# 1. A refused commit and the pool (PostgreSQL)


def _two_queued_runs_of_one_session(engine: Engine) -> tuple[str, str]:
    def make(_db: DbSession) -> tuple[str, str]:
        chat = SessionFactory()
        return SessionRunFactory(session=chat).id, SessionRunFactory(session=chat).id

    return seed(engine, make)


def _lock_waiters(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT COUNT(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()


def _lose_a_start_race(engine: Engine, pool_of_one: Engine, *, close_by: str) -> list[str]:
    """Start two runs of one session at once; the start on ``pool_of_one`` loses (the
    one-running index refuses it after the winner commits), its caller commits anyway,
    gets ``TransactionAbortedError`` and closes the session without a rollback."""
    winner_id, loser_id = _two_queued_runs_of_one_session(engine)
    seen: list[str] = []

    def loser() -> None:
        if close_by == "with block":
            with DbSession(pool_of_one) as db:
                try:
                    RunRepository(db).start(loser_id)
                except ActiveRunExistsError:
                    seen.append("lost")
                try:
                    db.commit()
                except TransactionAbortedError:
                    seen.append("commit refused")
        else:  # commit, then close
            db = DbSession(pool_of_one)
            try:
                RunRepository(db).start(loser_id)
            except ActiveRunExistsError:
                seen.append("lost")
            try:
                db.commit()
            except TransactionAbortedError:
                seen.append("commit refused")
            db.close()

    with DbSession(engine) as db:
        RunRepository(db).start(winner_id)
        thread = threading.Thread(target=loser)
        thread.start()
        deadline = time.monotonic() + 10
        while _lock_waiters(engine) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        db.commit()
    thread.join(15)
    assert not thread.is_alive()
    return seen


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("close_by", ["with block", "commit then close"])
def test_a_refused_commit_leaves_no_aborted_transaction_in_the_pool(
    engine: Engine, database_url: str, backend: str, close_by: str
) -> None:
    """Pool of one connection: the next, unrelated unit of work surely gets the loser's
    connection, and must find it idle, not inside the aborted transaction
    (``InFailedSqlTransaction`` before the fix)."""
    pool_of_one = create_db_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        assert _lose_a_start_race(engine, pool_of_one, close_by=close_by) == [
            "lost",
            "commit refused",
        ]
        with unit_of_work(pool_of_one) as db:
            status = db.connection().connection.dbapi_connection.info.transaction_status.name
            chat = SessionFactory.build()
            db.add(chat)
        assert status == "IDLE"  # as handed out by the pool: not INERROR
        with unit_of_work(pool_of_one, readonly=True) as db:
            running = db.execute(
                text("SELECT COUNT(*) FROM session_runs WHERE status = 'running'")
            ).scalar_one()
            stored = db.execute(
                text("SELECT COUNT(*) FROM sessions WHERE id = :id"), {"id": chat.id}
            ).scalar_one()
        assert (running, stored) == (1, 1)
    finally:
        pool_of_one.dispose()
    record("faults survived", 1, backend)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_failed_statement_then_commit_and_close_leaves_the_pooled_connection_idle(
    engine: Engine, database_url: str, backend: str
) -> None:
    """The same without a race: any failed statement aborts the transaction; the refused
    commit rolls the connection back, so the pool gets it back idle."""
    pool_of_one = create_db_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        db = DbSession(pool_of_one)
        db.add(SessionFactory.build(id="never-stored"))
        db.flush()
        with pytest.raises(Exception, match="division by zero"):
            db.execute(text("SELECT 1 / 0"))
        with pytest.raises(TransactionAbortedError):
            db.commit()
        db.close()
        with pool_of_one.connect() as conn:
            status = conn.connection.dbapi_connection.info.transaction_status.name
            assert status == "IDLE"
            assert conn.execute(text("SELECT COUNT(*) FROM sessions")).scalar_one() == 0
    finally:
        pool_of_one.dispose()
    record("faults survived", 1, backend)


# --------------------------------------------------------------------------
# 5. JSON bodies nested deeper than the parser goes


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(app_on(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def _nested(shape: str, depth: int) -> str:
    """JSON ``depth`` containers deep: arrays, or objects with the key ``a``."""
    if shape == "arrays":
        return "[" * depth + "]" * depth
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def _post_json(client: TestClient, path: str, body: str) -> Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


DEPTHS = [1_000, 5_000, 100_000]  # all past the parser's recursion limit; 100,000 is 200 kB


def _says_nested_once(message: str) -> bool:
    return message.count("nested") == 1 and "64 levels" in message


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", ["arrays", "objects"])
def test_a_resume_body_nested_past_the_parser_is_a_400_bad_parameter(
    client: TestClient,
    engine: Engine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    shape: str,
    depth: int,
) -> None:
    """``json.loads`` raised RecursionError: a 500 with a logged traceback."""
    run_id = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    caplog.set_level(logging.WARNING)
    for body in ('{"resume": {"x": ' + _nested(shape, depth) + "}}", _nested(shape, depth)):
        response = _post_json(client, f"/api/runs/{run_id}/resume", body)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "bad_parameter"
        assert error["message"].startswith("resume: ") and _says_nested_once(error["message"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "waiting_input"
    record("bad inputs tried", 2, backend)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", ["arrays", "objects"])
def test_a_create_body_nested_past_the_parser_is_a_422_validation_failed(
    client: TestClient,
    engine: Engine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    shape: str,
    depth: int,
) -> None:
    """FastAPI's parse of the body raised RecursionError: a 400 ``http_error``
    "There was an error parsing the body"."""
    session_id = seed(engine, lambda db: SessionFactory().id)
    caplog.set_level(logging.WARNING)
    nested = _nested(shape, depth)
    bodies = [
        f'{{"session_id": "{session_id}", "message": "m", "style_reference": {{"x": {nested}}}}}',
        nested,
    ]
    for body in bodies:
        response = _post_json(client, "/api/runs", body)
        assert response.status_code == 422, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "validation_failed"
        assert error["message"].startswith("invalid body: ") and _says_nested_once(error["message"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM session_runs")).scalar_one() == 0
    record("bad inputs tried", 2, backend)


@pytest.mark.parametrize("where", ["resume", "create"])
def test_a_body_nested_too_deep_for_the_limit_is_named_once_in_words(
    client: TestClient, engine: Engine, where: str
) -> None:
    """Within the parser's reach (65 levels) the limit's own message, without
    pydantic's "Value error," and without naming the field twice."""
    run_id = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    nested = _nested("objects", 65)
    if where == "resume":
        response = _post_json(client, f"/api/runs/{run_id}/resume", f'{{"resume": {nested}}}')
        assert response.status_code == 400
    else:
        body = f'{{"session_id": "s", "message": "m", "style_reference": {nested}}}'
        response = _post_json(client, "/api/runs", body)
        assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "Value error" not in message and _says_nested_once(message), message
    field = "resume" if where == "resume" else "style_reference"
    assert message.count(f"{field}.a") == 1 and message.count(f"{field}:") == (
        1 if where == "resume" else 0
    ), message


# --------------------------------------------------------------------------
# A real uvicorn on 127.0.0.1


def _uvicorn(
    port: int, database_url: str, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """The Run API's uvicorn on ``port``, its stderr appended to ``log``."""
    with log.open("ab") as stderr:
        return start_uvicorn(database_url, port, env=env, stderr=stderr.fileno())


@contextmanager
def serving(
    database_url: str, tmp_path: Path, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``uvicorn --factory app.api.main:create_app`` (one process) on a free port, ready:
    its base URL, its process and the file its stderr goes to. The readiness probe
    (``/openapi.json``) touches no database."""
    port, log = free_port(), tmp_path / f"uvicorn-{uuid.uuid4().hex[:6]}.log"
    process = _uvicorn(port, database_url, log, env)
    base_url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"uvicorn exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "uvicorn not ready within 30 s"
            try:
                if httpx.get(f"{base_url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base_url, process, log
    finally:
        stop(process)


def _port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def _send_head(base_url: str, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection((HOST, _port_of(base_url)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the response on ``sock``; ``TimeoutError`` if none
    comes within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return int(status_line.split()[1]), json.loads(body[:length])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------
# 4. Bodies over the limit


@pytest.fixture
def waiting_run(engine: Engine) -> str:
    return seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )


def _route(which: str, run_id: str) -> str:
    return "/api/runs" if which == "create" else f"/api/runs/{run_id}/resume"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["create", "resume"])
def test_a_declared_body_over_the_limit_is_a_413_while_the_client_is_still_sending(
    engine: Engine,
    database_url: str,
    tmp_path: Path,
    waiting_run: str,
    backend: str,
    which: str,
) -> None:
    """17 MB declared, 64 KiB sent: the answer comes from the headers, before the rest
    is sent (before the fix the server waited for all of it, then parsed it for
    seconds), and the server answers others meanwhile."""
    declared = 17_000_000
    with serving(database_url, tmp_path) as (base_url, _process, _log):
        sock = _send_head(base_url, _route(which, waiting_run), {"Content-Length": str(declared)})
        try:
            sock.sendall(b'{"resume": {"x": "' + b"y" * 65_536)
            status, body = _read_answer(sock, timeout=5)
            other = httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=5)
        finally:
            sock.close()
    assert status == 413, body
    limit = DEFAULT_MAX_JSON_BYTES + BODY_ENVELOPE_BYTES
    assert body == {
        "error": {
            "code": "too_large",
            "message": f"the request body is {declared:,} bytes, over the limit of "
            f"{limit:,} bytes (set by RUN_API_MAX_BODY_BYTES)",
        }
    }
    assert other.status_code == 200 and other.json()["status"] == "waiting_input"
    record("bad inputs tried", 1, backend)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["create", "resume"])
def test_a_chunked_body_is_a_413_once_it_passes_the_limit(
    engine: Engine,
    database_url: str,
    tmp_path: Path,
    waiting_run: str,
    backend: str,
    which: str,
) -> None:
    """No Content-Length: the bytes are counted as they arrive. 128 KiB sent of a body
    that never ends, limit 100,000: the 413 comes at once (before the fix the server
    waited for the end of the body)."""
    with serving(database_url, tmp_path, RUN_API_MAX_BODY_BYTES="100000") as (base_url, *_):
        sock = _send_head(base_url, _route(which, waiting_run), {"Transfer-Encoding": "chunked"})
        try:
            sock.sendall(_chunk(b'{"resume": {"x": "'))
            for _ in range(8):
                sock.sendall(_chunk(b"y" * 16_384))
            status, body = _read_answer(sock, timeout=5)
        finally:
            sock.close()
        within = httpx.post(
            f"{base_url}{_route(which, waiting_run)}",
            content=iter([b'{"resume": {"x": "', b"y" * 90_000, b'"}}']),  # chunked
            headers={"content-type": "application/json"},
            timeout=10,
        )
    assert status == 413, body
    assert body["error"] == {
        "code": "too_large",
        "message": "the request body is over the limit of 100,000 bytes "
        "(set by RUN_API_MAX_BODY_BYTES)",
    }
    # Within the limit the body is read and judged as before: 202 for the resume,
    # 422 for the create (a resume body is no create body).
    assert within.status_code == (202 if which == "resume" else 422), within.text
    record("bad inputs tried", 1, backend)


@pytest.mark.slow
def test_a_17_mb_resume_body_leaves_the_server_memory_flat(
    engine: Engine, database_url: str, tmp_path: Path, waiting_run: str, backend: str
) -> None:
    """Sent in full: before the fix the server held and parsed it (162 -> 516 MB in
    the issue); now it is refused from its headers and the bytes are dropped."""
    items = b",".join([b'{"a": 1}'] * 2_000_000)  # 17 MB of small objects
    body = b'{"resume": {"x": [' + items + b"]}}"
    with serving(database_url, tmp_path) as (base_url, process, _log):
        before = _rss_kib(process.pid)
        answer = httpx.post(
            f"{base_url}/api/runs/{waiting_run}/resume",
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        time.sleep(0.2)
        after = _rss_kib(process.pid)
        still = httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=5)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large"
    assert after - before < 32 * 1024, f"RSS grew from {before} to {after} KiB"
    assert still.json()["status"] == "waiting_input"
    record("bad inputs tried", 1, backend)


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_the_body_limit_is_exact_and_configurable(
    engine: Engine, waiting_run: str, monkeypatch: pytest.MonkeyPatch, transfer: str
) -> None:
    """``RUN_API_MAX_BODY_BYTES`` bytes pass, one more is a 413; by default the limit
    is ``RUN_DATA_MAX_JSON_BYTES`` plus the envelope."""
    path = f"/api/runs/{waiting_run}/resume"

    def post(client: TestClient, size: int) -> Response:
        body = b'{"resume": {"x": "' + b"y" * (size - 21) + b'"}}'
        assert len(body) == size
        content = iter([body[:10], body[10:]]) if transfer == "chunked" else body
        return client.post(path, content=content, headers={"content-type": "application/json"})

    monkeypatch.setenv("RUN_DATA_MAX_JSON_BYTES", "2000")
    for setting, limit in (("5000", 5000), ("", 2000 + BODY_ENVELOPE_BYTES)):
        monkeypatch.setenv("RUN_API_MAX_BODY_BYTES", setting)
        with TestClient(app_on(engine), raise_server_exceptions=False) as test_client:
            over = post(test_client, limit + 1)
            at = post(test_client, limit)
        assert over.status_code == 413 and over.json()["error"]["code"] == "too_large"
        assert f"{limit:,} bytes" in over.json()["error"]["message"]
        # At the limit the body is read: the resume's own JSON limit refuses it.
        assert at.status_code == 400 and at.json()["error"]["code"] == "bad_parameter", at.text


# --------------------------------------------------------------------------
# 11. A database that is missing, not migrated, or gone


def _refused_start(database_url: str, tmp_path: Path, **env: str) -> str:
    """Start the server and expect it to stop at start-up: its stderr. Before the fix
    it started and answered 500s, so waiting for its exit timed out."""
    port, log = free_port(), tmp_path / "refused.log"
    process = _uvicorn(port, database_url, log, env)
    try:
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = log.read_text()
    assert code == 3, stderr  # uvicorn's "startup failed"
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if "Run API not started" in line]
    return line


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_server_refuses_to_start_without_its_sqlite_file_and_creates_none(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "never-made.db"
    line = _refused_start(f"sqlite:///{path}", tmp_path)
    assert f"no database at {path}" in line and "python -m migrations upgrade" in line
    assert not path.exists() and not list(tmp_path.glob("never-made.db*"))
    record("faults survived", 1, backend)


@pytest.mark.slow  # a Python process each
@pytest.mark.parametrize("migrated", ["none", "all but the last"])
def test_an_in_process_client_of_an_app_that_refuses_to_start_gets_the_line_at_once(
    make_database_url: Callable[[], str],
    backend: str,
    migrated: str,
) -> None:
    """``TestClient(create_app())`` on a database not at the code's version raises the
    start-up line. Before, the client served (503 for every request) and then waited at
    exit, forever, for a lifespan that had already ended."""
    url = make_database_url()
    if backend == "sqlite":
        sqlite3.connect(make_url(url).database).close()
    if migrated != "none":
        setup = create_db_engine(url, poolclass=NullPool)
        try:
            upgrade(setup, migrations=MIGRATIONS[:-1])
        finally:
            setup.dispose()
    # In a process of its own: on the old code its exit would wait forever.
    script = (
        "from fastapi.testclient import TestClient\n"
        "from app.api.main import StartupRefused, create_app\n"
        "try:\n"
        "    with TestClient(create_app()):\n"
        "        print('started')\n"
        "except StartupRefused as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("refused: Run API not started: "), line
    assert "python -m migrations upgrade" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("migrated", ["none", "all but the last"])
def test_the_server_refuses_to_start_on_a_database_not_at_the_code_version(
    make_database_url: Callable[[], str], tmp_path: Path, backend: str, migrated: str
) -> None:
    url = make_database_url()
    migrations = MIGRATIONS[:-1] if migrated == "all but the last" else []
    if backend == "sqlite":  # the empty file of a database never migrated
        sqlite3.connect(make_url(url).database).close()
    setup = create_db_engine(url, poolclass=NullPool)
    try:
        if migrations:
            upgrade(setup, migrations=migrations)
    finally:
        setup.dispose()
    line = _refused_start(url, tmp_path)
    missing = len(MIGRATIONS) - len(migrations)
    assert "is not at this code's schema version" in line, line
    assert f"{missing} of {len(MIGRATIONS)} migrations not applied" in line, line
    assert MIGRATIONS[-1].label in line and "run: python -m migrations upgrade" in line, line
    record("faults survived", 1, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_server_refuses_to_start_when_postgresql_cannot_be_reached(
    tmp_path: Path, backend: str
) -> None:
    closed = free_port()  # bound a moment ago and released: nothing listens there
    line = _refused_start(f"postgresql://postgres@{HOST}:{closed}/test", tmp_path)
    assert f"cannot reach the database postgresql+psycopg://postgres@{HOST}:{closed}/test" in line
    assert "Connection refused" in line, line
    record("faults survived", 1, backend)


@pytest.mark.slow
def test_the_server_refuses_to_start_with_a_bad_body_limit(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    line = _refused_start(database_url, tmp_path, RUN_API_MAX_BODY_BYTES="1e6")
    assert "RUN_API_MAX_BODY_BYTES must be a positive whole number of bytes" in line


@pytest.mark.slow
def test_the_server_refuses_to_start_with_a_bad_idempotency_window(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """Read only by requests that carry an Idempotency-Key: without the start-up check,
    a bad value is a 500 on the first keyed request instead."""
    line = _refused_start(database_url, tmp_path, RUN_IDEMPOTENCY_WINDOW_SECONDS="abc")
    assert "RUN_IDEMPOTENCY_WINDOW_SECONDS" in line and "abc" not in line


class TcpProxy:
    """127.0.0.1:``port`` forwarded to 127.0.0.1:``target``: the database's port as the
    server sees it. ``stop`` closes the listener and cuts every connection, so the
    database is gone for the server: pooled connections break, new ones are refused."""

    def __init__(self, target: int, port: int = 0) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection((HOST, self.target), timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (Linux)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()


MARKER = "payload-marker-9f1c"


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": {
            "code": "database_unavailable",
            "message": "the database cannot be reached; retry later",
        }
    }
    assert response.headers["Retry-After"] == "5"


def _unavailable_logged(log: Path, cause: str) -> None:
    text = log.read_text()
    lines = [line for line in text.splitlines() if "database unavailable in" in line]
    assert lines and all(cause in line for line in lines), text[-3000:]
    assert "Traceback" not in text and MARKER not in text, text[-3000:]


def _create(base_url: str, session_id: str) -> httpx.Response:
    body = {"session_id": session_id, "message": MARKER, "style_reference": {"k": MARKER}}
    return httpx.post(f"{base_url}/api/runs", json=body, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_gone_after_start_up_is_a_503_database_unavailable(
    engine: Engine, database_url: str, tmp_path: Path, waiting_run: str, backend: str
) -> None:
    """The server's database port stops answering after start-up (connections cut,
    then refused): every request is a 503 ``database_unavailable`` with
    ``Retry-After``, the cause is logged without data, and the server recovers when
    the database is back. Before the fix: 500 ``internal_error``, no cause logged."""
    target = make_url(database_url)
    proxy = TcpProxy(target.port or 5432)
    via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
    session_id = seed(engine, lambda db: SessionFactory().id)
    try:
        with serving(via_proxy, tmp_path) as (base_url, _process, log):
            assert httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=10).status_code == 200
            proxy.stop()
            started = time.monotonic()
            _assert_unavailable(httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=30))
            _assert_unavailable(_create(base_url, session_id))
            _assert_unavailable(httpx.get(f"{base_url}/api/runs/{waiting_run}/events", timeout=30))
            assert time.monotonic() - started < 10  # refused at once, no connect timeout
            _unavailable_logged(log, "psycopg.OperationalError")
            assert "Connection refused" in log.read_text()

            proxy = TcpProxy(target.port or 5432, port=proxy.port)  # the database is back
            back = httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=30)
            assert back.status_code == 200, back.text
    finally:
        proxy.stop()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM session_runs")).scalar_one() == 1
    record("faults survived", 1, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_sqlite_file_gone_after_start_up_is_a_503_and_is_not_recreated(
    engine: Engine, database_url: str, tmp_path: Path, waiting_run: str, backend: str
) -> None:
    """The file is moved away after start-up: a 503 ``database_unavailable``, and the
    server does not make a new, empty file in its place. Before the fix: an empty
    runs.db was created and every request was a 500 ("no such table")."""
    path = Path(make_url(database_url).database)
    session_id = seed(engine, lambda db: SessionFactory().id)
    engine.dispose()
    with serving(database_url, tmp_path) as (base_url, _process, log):
        moved = path.rename(path.with_name("moved.db"))
        _assert_unavailable(httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=30))
        _assert_unavailable(_create(base_url, session_id))
        assert not path.exists()
        _unavailable_logged(log, "sqlite3.OperationalError [SQLITE_CANTOPEN]")
        moved.rename(path)  # back
        back = httpx.get(f"{base_url}/api/runs/{waiting_run}", timeout=30)
        assert back.status_code == 200, back.text
    record("faults survived", 1, backend)


def test_an_unexpected_database_error_is_a_500_whose_log_names_the_cause_without_data(
    engine: Engine, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    """A driver error no repository translates (here a duplicate primary key written
    by a route of the app's own): 500 ``internal_error``, and the log names the
    driver's error, its code and the stack frames, never the statement's parameters.
    Before the fix the log said only ``unhandled IntegrityError in POST /faulty``."""
    api = app_on(engine)

    @api.post("/faulty")
    def faulty(db: SessionDep) -> None:
        insert = text("INSERT INTO sessions (id, title) VALUES (:id, :title)")
        db.execute(insert, {"id": MARKER, "title": MARKER})
        db.execute(insert, {"id": MARKER, "title": MARKER})

    caplog.set_level(logging.WARNING)
    with TestClient(api, raise_server_exceptions=False) as test_client:
        response = test_client.post("/faulty")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "app.api"]
    expected = {
        "sqlite": "sqlite3.IntegrityError [SQLITE_CONSTRAINT_PRIMARYKEY]: "
        "UNIQUE constraint failed: sessions.id",
        "postgresql": "psycopg.errors.UniqueViolation [23505]: "
        'duplicate key value violates unique constraint "sessions_pkey"',
    }[backend]
    assert logged.startswith(f"unhandled IntegrityError in POST /faulty: {expected}\n"), logged
    assert "Traceback (most recent call last)" in logged and "in faulty" in logged
    assert MARKER not in caplog.text
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM sessions")).scalar_one() == 0
