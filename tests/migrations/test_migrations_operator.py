"""The command lines facing an operator's mistakes: one line, exit 2 (usage) or 1 (database).

Every case runs the real command in a subprocess; none may print a traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from migrations import MIGRATIONS, upgrade

pytestmark = pytest.mark.slow  # every test starts Python processes

ROOT = Path(__file__).resolve().parents[2]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------
# Usage and configuration mistakes: exit 2


@pytest.mark.parametrize("command", ["upgrade", "status", "sql"])
def test_a_url_that_is_not_one(command: str) -> None:
    line = one_line_error(run("-m", "migrations", command, "--url", "not a url"), 2)
    assert line == (
        f"{command} failed: --url is not a database URL; expected e.g. "
        "postgresql://user:password@host:5432/dbname or sqlite:///path/to/runs.db"
    )


def test_an_unsupported_dialect() -> None:
    result = run("-m", "migrations", "status", "--url", "mysql://root:secret@db/app")
    line = one_line_error(result, 2)
    assert "unsupported database 'mysql'" in line and "expected sqlite or postgresql" in line
    assert "secret" not in line


def test_a_bad_url_from_the_environment_names_the_variable() -> None:
    line = one_line_error(run("-m", "migrations", "status", env={"DATABASE_URL": "nope"}), 2)
    assert line.startswith("status failed: DATABASE_URL is not a database URL")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lock-timeout", "nan"),
        ("--lock-timeout", "inf"),
        ("--lock-timeout", "-1"),
        ("--lock-timeout", "abc"),
        ("--statement-lock-timeout", "nan"),
        ("--statement-timeout", "inf"),
        ("--connect-timeout", "nan"),
    ],
)
def test_timeouts_must_be_finite_seconds(option: str, value: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    line = one_line_error(run("-m", "migrations", "upgrade", "--url", url, option, value), 2)
    assert line.startswith("python -m migrations upgrade: argument")
    assert "expected a finite number of seconds" in line and repr(value) in line
    assert not (tmp_path / "runs.db").exists()


def test_zero_lock_timeout_is_refused_but_zero_statement_timeout_means_none(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    one_line_error(run("-m", "migrations", "upgrade", "--url", url, "--lock-timeout", "0"), 2)
    ok = run("-m", "migrations", "upgrade", "--url", url, "--statement-timeout", "0")
    assert ok.returncode == 0, ok.stderr


def test_a_bad_number_in_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    result = run("-m", "migrations", "upgrade", "--url", url, env={"SQLITE_BUSY_TIMEOUT_MS": "abc"})
    line = one_line_error(result, 2)
    assert line == (
        "upgrade failed: configuration error: SQLITE_BUSY_TIMEOUT_MS must be an integer, got 'abc'"
    )


def test_an_unknown_command_is_one_line() -> None:
    line = one_line_error(run("-m", "migrations", "downgrade"), 2)
    assert "invalid choice: 'downgrade'" in line and "(see --help)" in line


# --------------------------------------------------------------------------
# Database problems: exit 1


@pytest.mark.parametrize("command", ["status", "sql"])
def test_status_and_sql_never_create_a_sqlite_database(command: str, tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    line = one_line_error(run("-m", "migrations", command, "--url", f"sqlite:///{path}"), 1)
    assert line == (
        f"{command} failed: no database at {path}; check --url "
        "(python -m migrations upgrade creates one)"
    )
    assert not path.exists()


def _writable(folder: Path) -> bool:
    try:
        (folder / ".run-layer-probe").touch()
    except OSError:
        return False
    (folder / ".run-layer-probe").unlink()
    return True


def test_a_location_that_cannot_be_written_says_so() -> None:
    folder = Path("/sys")  # sysfs: no new files, even for root
    if _writable(folder):
        pytest.skip("/sys is writable here")
    result = run("-m", "migrations", "upgrade", "--url", f"sqlite:///{folder / 'runs.db'}")
    line = one_line_error(result, 1)
    assert line.startswith(f"upgrade failed: cannot write the SQLite database {folder}/runs.db")
    assert f"the folder {folder} is not writable" in line
    assert "choose a writable location" in line


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_server_that_never_answers_times_out(silent_server: int, how: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_server}/app"
    option = ["--connect-timeout", "2"] if how == "option" else []
    env = {"DB_CONNECT_TIMEOUT": "2"} if how == "environment" else {}
    started = time.monotonic()
    result = run("-m", "migrations", "status", "--url", url, *option, env=env, timeout=60)
    elapsed = time.monotonic() - started
    line = one_line_error(result, 1)
    assert "timeout" in line.lower() and f"127.0.0.1:{silent_server}" in line
    assert elapsed < 20


# --------------------------------------------------------------------------
# python -m app.demo and scripts/ follow the same rules


def test_demo_with_a_bad_url_or_setting_is_a_usage_error(tmp_path: Path) -> None:
    line = one_line_error(run("-m", "app.demo", "--url", "nope"), 2)
    assert line.startswith("demo failed: --url is not a database URL")
    upgrade_first = run("-m", "migrations", "upgrade", "--url", f"sqlite:///{tmp_path / 'r.db'}")
    assert upgrade_first.returncode == 0, upgrade_first.stderr
    result = run(
        "-m",
        "app.demo",
        "--url",
        f"sqlite:///{tmp_path / 'r.db'}",
        env={"SQLITE_BUSY_TIMEOUT_MS": "abc"},
    )
    line = one_line_error(result, 2)
    assert line == (
        "demo failed: configuration error: SQLITE_BUSY_TIMEOUT_MS must be an integer, got 'abc'"
    )


def test_demo_never_creates_a_database(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    line = one_line_error(run("-m", "app.demo", "--url", f"sqlite:///{path}"), 1)
    assert line.startswith(f"demo failed: no database at {path}")
    assert not path.exists()


def test_demo_on_a_database_not_fully_migrated_says_to_migrate(
    database_url: str, empty_engine: Engine
) -> None:
    upgrade(empty_engine, migrations=MIGRATIONS[:3])
    line = one_line_error(run("-m", "app.demo", "--url", database_url), 1)
    assert line == (
        f"demo failed: the database is not migrated ({len(MIGRATIONS) - 3} migrations not "
        "applied); run: python -m migrations upgrade"
    )


def test_check_junit_usage_and_missing_file(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "check_junit.py")
    line = one_line_error(run(script), 2)
    assert line == "usage: scripts/check_junit.py JUNIT_XML"
    line = one_line_error(run(script, str(tmp_path / "missing.xml")), 1)
    assert line.startswith(f"ci: cannot read {tmp_path / 'missing.xml'}:")
