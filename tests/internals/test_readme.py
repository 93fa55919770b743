"""The README's Python examples run as written, on both backends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

pytestmark = pytest.mark.slow  # the examples run in Python processes

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_examples_run(engine: Engine, database_url: str) -> None:
    blocks = python_blocks()
    assert len(blocks) == 3
    life, api, worker = blocks
    check_api = "\nfrom fastapi.testclient import TestClient\n" + (
        "print(TestClient(app).post('/api/runs/nope/start').json()['error']['code'])\n"
    )
    env = {**os.environ, "DATABASE_URL": database_url}
    expected = {
        life: ['"status":"completed"', "6 run_completed"],
        api + check_api: ["run_not_found"],
        worker: ["a deck completed\nmake it blue completed"],
    }
    for source, lines in expected.items():
        finished = subprocess.run(
            [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=60
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
        for line in lines:
            assert line in finished.stdout
