"""Issue 22, item 9: every bad number given to a command line is one line on stderr,
naming the option (or environment variable) and its range, with exit code 2.

The real command lines run as subprocesses against a migrated database of each
backend, so a number that slipped through would reach it (and exit 1, or 0).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import Engine, func, select
from sqlmodel import Session as DbSession

from app.maintenance import main as maintenance_main
from app.models import RunStatus, SessionRun
from migrations.__main__ import main as migrations_main
from tests.concurrency import ROOT, seed
from tests.factories import SessionRunFactory

USAGE = 2


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


# (module, arguments before --url, what stderr must name, the range's upper bound as printed)
BAD_NUMBERS: dict[str, tuple[str, list[str], str, str]] = {
    "fail-stale --older-than 1e300 (overflow)": (
        "app.maintenance",
        ["fail-stale", "--older-than", "1e300"],
        "--older-than",
        "315360000",
    ),
    "fail-stale --older-than 99999999999 (before year 1)": (
        "app.maintenance",
        ["fail-stale", "--older-than", "99999999999"],
        "--older-than",
        "315360000",
    ),
    "fail-stale --older-than 1e-300 (rounds to 0)": (
        "app.maintenance",
        ["fail-stale", "--older-than", "1e-300"],
        "--older-than",
        "315360000",
    ),
    "fail-stale --older-than inf": (
        "app.maintenance",
        ["fail-stale", "--older-than", "inf"],
        "--older-than",
        "315360000",
    ),
    "purge-keys --connect-timeout 1e300": (
        "app.maintenance",
        ["purge-keys", "--connect-timeout", "1e300"],
        "--connect-timeout",
        "3600",
    ),
    "upgrade --statement-timeout 1e300": (
        "migrations",
        ["upgrade", "--statement-timeout", "1e300"],
        "--statement-timeout",
        "2147483",
    ),
    "upgrade --statement-timeout 0.0004 (rounds to 0 ms: no limit)": (
        "migrations",
        ["upgrade", "--statement-timeout", "0.0004"],
        "--statement-timeout",
        "2147483",
    ),
    "upgrade --lock-timeout 1e300": (
        "migrations",
        ["upgrade", "--lock-timeout", "1e300"],
        "--lock-timeout",
        "2147483",
    ),
    "upgrade --statement-lock-timeout 0.0001": (
        "migrations",
        ["upgrade", "--statement-lock-timeout", "0.0001"],
        "--statement-lock-timeout",
        "2147483",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_a_bad_number_is_one_line_naming_the_option_and_its_range(
    engine: Engine, database_url: str, backend: str, case: str
) -> None:
    module, args, option, upper = BAD_NUMBERS[case]
    running = seed(engine, lambda db: SessionRunFactory(status=RunStatus.RUNNING).id)
    done = command("-m", module, *args, "--url", database_url)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (USAGE, 1), (done.returncode, done.stderr)
    assert option in lines[0] and upper in lines[0], lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    with DbSession(engine) as db:  # nothing was done
        assert db.get(SessionRun, running).status is RunStatus.RUNNING


@pytest.mark.slow
@pytest.mark.parametrize("value", ["abc", "1e300", "1e-300", "nan"])
def test_a_bad_idempotency_window_variable_is_one_line_for_purge_keys(
    engine: Engine, database_url: str, backend: str, value: str
) -> None:
    done = command(
        "-m",
        "app.maintenance",
        "purge-keys",
        "--url",
        database_url,
        env={"RUN_IDEMPOTENCY_WINDOW_SECONDS": value},
    )
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (USAGE, 1), (done.returncode, done.stderr)
    assert "RUN_IDEMPOTENCY_WINDOW_SECONDS" in lines[0] and "315360000" in lines[0], lines[0]


@pytest.mark.slow
def test_numbers_in_range_still_work(engine: Engine, database_url: str, backend: str) -> None:
    done = command(
        "-m", "app.maintenance", "fail-stale", "--older-than", "315360000", "--url", database_url
    )
    assert (done.returncode, done.stdout.strip()) == (0, "failed 0 stale runs"), done.stderr
    done = command(
        "-m",
        "app.maintenance",
        "purge-keys",
        "--url",
        database_url,
        env={"RUN_IDEMPOTENCY_WINDOW_SECONDS": "0.5"},
    )
    assert done.returncode == 0, done.stderr
    done = command(
        "-m", "migrations", "upgrade", "--statement-timeout", "60", "--url", database_url
    )
    assert done.returncode == 0, done.stderr
    with DbSession(engine) as db:
        assert db.scalar(select(func.count()).select_from(SessionRun)) == 0


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_the_same_refusals_in_process(
    engine: Engine,
    database_url: str,
    backend: str,
    case: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast loop's version: each command line's ``main`` called in this process."""
    module, args, option, upper = BAD_NUMBERS[case]
    main = migrations_main if module == "migrations" else maintenance_main
    with pytest.raises(SystemExit) as exited:
        main([*args, "--url", database_url])
    lines = capsys.readouterr().err.strip().splitlines()
    assert (exited.value.code, len(lines)) == (USAGE, 1), lines
    assert option in lines[0] and upper in lines[0], lines[0]
    monkeypatch.setenv("RUN_IDEMPOTENCY_WINDOW_SECONDS", "abc")
    assert maintenance_main(["purge-keys", "--url", database_url]) == USAGE
    line = capsys.readouterr().err.strip()
    assert "RUN_IDEMPOTENCY_WINDOW_SECONDS" in line and "\n" not in line
