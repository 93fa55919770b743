"""The reduced stream run: 50 SSE followers on one uvicorn worker on 127.0.0.1 while 4 writers
append, a tenth of the followers reconnecting mid-stream with Last-Event-ID.

The full run (200 followers) is ``python -m tests.load.followers``; figures in docs/events.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_follower_gets_every_event_once_in_order_on_a_few_connections(
    database_url: str,
) -> None:
    command = [sys.executable, "-m", "tests.load.followers", "--reduced", "--json"]
    command += ["--url", database_url, "--deadline", "60"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert finished.stdout.strip(), finished.stderr[-3000:]
    (figures,) = json.loads(finished.stdout.strip().splitlines()[-1]).values()

    assert figures["failed_followers"] == 0, figures["problems"]
    assert figures["deliveries"] == 50 * 11
    assert figures["reconnections"] == figures["reconnecting_followers"] == 5
    # the followers share a handful of connections, not one each
    for phase in ("idle", "writing"):
        assert figures["connections"][phase]["max_open"] <= 5, figures["connections"]
    assert finished.returncode == 0, finished.stderr[-3000:]
