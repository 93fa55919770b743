"""Fails when any PostgreSQL test was skipped (CI must run them), and prints the counts."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    try:
        cases = ET.parse(path).getroot().iter("testcase")
    except (OSError, ET.ParseError) as exc:
        print(f"ci: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    counts = {"postgresql": 0, "sqlite": 0}
    skipped_pg: list[str] = []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        for backend in counts:
            if f"[{backend}" in name or f"-{backend}" in name:
                counts[backend] += 1
                if backend == "postgresql" and case.find("skipped") is not None:
                    skipped_pg.append(name)
    print(f"ci: {counts['sqlite']} SQLite and {counts['postgresql']} PostgreSQL test cases")
    if counts["postgresql"] == 0:
        print("ci: no PostgreSQL test ran", file=sys.stderr)
        return 1
    if skipped_pg:
        print(f"ci: {len(skipped_pg)} PostgreSQL tests were skipped:", file=sys.stderr)
        for name in skipped_pg[:20]:
            print(f"  {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: scripts/check_junit.py JUNIT_XML", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
