"""No SQL statement in the layer is built from values by string formatting (ruff S608).

Identifiers may come from constants (the migrations' DDL does that, marked
where it happens); values must be bound parameters. ``.ci/run`` lints the same
rule over the whole tree; this test keeps it part of the reliability figures'
promise even when someone runs only this suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ruff_s608(*targets: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "S608", "--no-cache", *targets],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_finds_no_sql_built_by_string_formatting() -> None:
    result = _ruff_s608("app", "migrations")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All checks passed" in result.stdout


def test_ruff_would_see_one() -> None:
    """The check is not blind: the same command flags a formatted query."""
    probe = "def q(name):\n    return f\"SELECT * FROM sessions WHERE id = '{name}'\"\n"
    result = _ruff_s608("--stdin-filename", "probe.py", "-", stdin=probe)
    assert result.returncode == 1 and "S608" in result.stdout, result.stdout + result.stderr
