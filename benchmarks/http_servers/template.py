"""``GET /api/runs/{run_id}`` as the full-stack FastAPI template writes a read route.

``uvicorn --factory benchmarks.http_servers.template:create_app`` with ``DATABASE_URL``.

The template's pattern (backend/app/api/deps.py and routes/items.py): an
engine from ``sqlmodel.create_engine`` with its defaults, a ``Session`` from a
``yield`` dependency, ``session.get`` on a plain SQLModel table model
(``benchmarks.peers.NaiveRun``, the same ``session_runs`` table), and a
response model declared with ``response_model=`` that FastAPI validates and
serializes. No transaction rules, no limiter: what the usual code costs.
SQLite hands the plain model naive datetimes, so its timestamps come without
the ``Z`` the project writes; the fields and other values are the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlmodel import Field, Session, SQLModel, create_engine

from app.db import resolve_database_url
from benchmarks.peers import NaiveRun


class RunPublic(SQLModel):
    session_id: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    latest_error: dict[str, Any] | None
    metrics: dict[str, Any] | None
    checkpoint_thread: str | None
    checkpoint_ns: str | None
    waiting_reason: str | None
    parent_run_id: str | None
    trigger_source: str
    input_message: str | None
    options: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    run_id: str = Field(validation_alias="id")
    run_metadata: dict[str, Any] = Field(serialization_alias="metadata")


_engines: list[Engine] = []  # the template's module-level engine, made by create_app


def get_db() -> Iterator[Session]:
    with Session(_engines[-1]) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def create_app(url: str | None = None) -> FastAPI:
    """The template-style service serving ``url`` (default ``DATABASE_URL``)."""
    resolved = resolve_database_url(url or os.environ["DATABASE_URL"])
    connect_args = {"check_same_thread": False} if resolved.get_backend_name() == "sqlite" else {}
    _engines.append(create_engine(make_url(resolved), connect_args=connect_args))
    app = FastAPI(title="template-style Run API")

    @app.get("/api/runs/{run_id}", response_model=RunPublic)
    def read_run(session: SessionDep, run_id: str) -> Any:
        run = session.get(NaiveRun, run_id)
        if not run:
            raise HTTPException(status_code=404, detail="Run not found")
        return run

    return app


__all__ = ["RunPublic", "create_app"]
