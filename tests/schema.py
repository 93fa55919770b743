"""How the test suite builds the schema of a fresh database: through the migrations.

Every test that uses the ``engine`` fixture thereby runs the same path as an
adopted v0.7 database (baseline, then each migration), and
``tests/test_schema_drift.py`` proves that path ends at what ``app.models``
declares.
"""

from __future__ import annotations

from sqlalchemy import Engine

from migrations import upgrade


def build_schema(engine: Engine) -> None:
    upgrade(engine)
