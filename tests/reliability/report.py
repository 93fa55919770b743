"""The reliability figures' table at the end of a run (a plugin of the root conftest).

With pytest-xdist each worker collects its own figures; it hands them to the
controller when it finishes (``workeroutput``), which adds them up and prints
the one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.reliability import figures

_KEY = "reliability_figures"


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_KEY] = [[name, backend, n] for (name, backend), n in figures.FIGURES.items()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    for name, backend, amount in getattr(node, "workeroutput", {}).get(_KEY, []):
        figures.record(name, amount, backend)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if hasattr(terminalreporter.config, "workerinput"):
        return
    rows = figures.table()
    if not rows:
        return
    seen = {backend for _, values in rows for backend in values}
    backends = [b for b in ("sqlite", "postgresql") if b in seen] + sorted(
        seen - {"sqlite", "postgresql"}
    )
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(f"{'figure':<24}" + "".join(f"{b:>12}" for b in backends))
    for name, values in rows:
        terminalreporter.write_line(
            f"{name:<24}" + "".join(f"{values.get(b, 0):>12}" for b in backends)
        )
    figures.write_json(Path(str(terminalreporter.config.rootpath)) / "reports" / "reliability.json")
