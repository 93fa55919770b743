"""``python -m app.demo`` on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from app.demo import main


def test_demo_walks_a_run_to_completed(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", database_url]) == 0
    out = capsys.readouterr().out
    assert "status completed" in out
    types = [line.split()[1] for line in out.splitlines() if line.startswith("    ")]
    assert types == [
        "run_created",
        "run_started",
        "verify_pass",
        "run_waiting_input",
        "run_resumed",
        "run_completed",
    ]


def test_demo_on_an_empty_database_says_to_migrate(
    empty_engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", database_url]) == 1
    assert "python -m migrations upgrade" in capsys.readouterr().err
