"""The README's Python examples, and the ones moved from it into the docs, run as
written, on both backends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

pytestmark = pytest.mark.slow  # the examples run in Python processes

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
QUEUE = ROOT / "docs" / "queue.md"

CHECK_API = "\nfrom fastapi.testclient import TestClient\n" + (
    "print(TestClient(app).post('/api/runs/nope/start').json()['error']['code'])\n"
)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def the_block(blocks: list[str], marker: str) -> str:
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} examples contain {marker!r}"
    return found[0]


def run_example(source: str, database_url: str) -> str:
    env = {**os.environ, "DATABASE_URL": database_url}
    finished = subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished.stdout


def test_the_readme_examples_run(engine: Engine, database_url: str) -> None:
    blocks = python_blocks(README)
    life = the_block(blocks, 'ChatSession(title="deck about tides")')
    api = the_block(blocks, "app.include_router(")
    expected = {
        life: ['"status":"completed"', "6 run_completed"],
        api + CHECK_API: ["run_not_found"],
    }
    # Any other example the README gains runs too, and must at least exit 0.
    expected.update({block: [] for block in blocks if block not in (life, api)})
    for source, lines in expected.items():
        stdout = run_example(source, database_url)
        for line in lines:
            assert line in stdout


def test_the_queue_example_in_the_docs_runs(engine: Engine, database_url: str) -> None:
    worker = the_block(python_blocks(QUEUE), 'ChatSession(title="double texting")')
    stdout = run_example(worker, database_url)
    assert "a deck completed\nmake it blue completed" in stdout
