"""How the test suite builds the schema of a fresh database: one place to change."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables)


def build_schema(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)
