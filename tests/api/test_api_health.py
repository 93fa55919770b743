"""``GET /api/health``: 200 when the database answers at this code's schema, else 503."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.api.deps import get_db_engine
from app.api.health import health_router
from app.api.main import create_app
from app.db import create_db_engine
from migrations import MIGRATIONS


def client_on(engine: Engine, *, checked_at_start: bool = True) -> TestClient:
    """``create_app``; or, for a database that changed after start-up (``create_app``
    refuses to start on it), an app with only the health route mounted."""
    api = create_app() if checked_at_start else FastAPI()
    if not checked_at_start:
        api.include_router(health_router)
    api.dependency_overrides[get_db_engine] = lambda: engine
    return TestClient(api, raise_server_exceptions=False)


def test_health_is_ok_at_the_code_schema_version(engine: Engine) -> None:
    with client_on(engine) as client:
        answer = client.get("/api/health")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ok", "schema_version": MIGRATIONS[-1].version}


def test_health_is_a_503_when_a_migration_is_not_applied(engine: Engine) -> None:
    last = MIGRATIONS[-1].version
    select = text("SELECT * FROM schema_migrations WHERE version = :v")
    with engine.begin() as connection:
        row = connection.execute(select, {"v": last}).mappings().one()
        connection.execute(text("DELETE FROM schema_migrations WHERE version = :v"), {"v": last})
    try:
        with client_on(engine, checked_at_start=False) as client:
            answer = client.get("/api/health")
    finally:
        columns = ", ".join(row.keys())
        values = ", ".join(f":{name}" for name in row.keys())
        with engine.begin() as connection:
            insert = f"INSERT INTO schema_migrations ({columns}) VALUES ({values})"  # noqa: S608
            connection.execute(text(insert), dict(row))
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "schema_not_current"
    assert f"{last:04d}_{MIGRATIONS[-1].name} (pending)" in error["message"]
    assert answer.headers["retry-after"] == "5"


def test_health_is_a_503_database_unavailable_when_the_database_is_gone(
    engine: Engine, database_url: str
) -> None:
    """A PostgreSQL port where nothing listens, or a SQLite file that is not there."""
    if engine.dialect.name == "sqlite":
        gone = create_db_engine(f"{database_url}-missing", must_exist=True)
    else:
        gone = create_db_engine(engine.url.set(port=1, host="127.0.0.1"), connect_args={})
    try:
        with client_on(gone, checked_at_start=False) as client:
            answer = client.get("/api/health")
    finally:
        gone.dispose()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "database_unavailable"
    assert answer.headers["retry-after"] == "5"
