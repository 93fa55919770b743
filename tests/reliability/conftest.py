"""The reliability suite: marked ``reliability``; prints its figures at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import figures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
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
