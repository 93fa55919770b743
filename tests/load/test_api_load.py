"""The reduced load run: the Run API under ``uvicorn --workers 2`` on 127.0.0.1,
200 create-then-GET pairs and 200 mixed requests, each burst sent at once.

The full run (1,000 per burst) is ``python -m tests.load.burst``; its figures
are in docs/load.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_no_5xx_and_every_created_run_is_visible_at_once(database_url: str) -> None:
    command = [sys.executable, "-m", "tests.load.burst", "--reduced", "--json"]
    command += ["--url", database_url, "--deadline", "120"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    assert finished.stdout.strip(), finished.stderr[-3000:]
    (results,) = json.loads(finished.stdout).values()
    pairs, mixed = results["pairs"], results["mixed"]

    assert pairs["pairs"] == 200 and pairs["pairs_missed"] == 0, pairs
    for burst in (pairs, mixed):
        assert burst["server_errors"] == 0, burst
        assert burst["transport_errors"] == {}, burst
    statuses = {kind: {int(s) for s in f["statuses"]} for kind, f in mixed["kinds"].items()}
    assert statuses["create"] == {201}
    assert statuses["get"] == statuses["events"] == {200}
    assert statuses["resume"] <= {202, 409} and 202 in statuses["resume"]
    assert statuses["cancel"] <= {200, 202}
    assert finished.returncode == 0, finished.stderr[-3000:]
