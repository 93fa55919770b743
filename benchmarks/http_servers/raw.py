"""The Run API routes of the HTTP benchmark written against the raw driver.

``uvicorn --factory benchmarks.http_servers.raw:create_app`` with ``DATABASE_URL``.

What a hand-written endpoint costs when it sends **the project's statements**:
the SQL text is read from ``docs/sql/<dialect>.sql`` (the golden files the
repositories' statements are checked against), bound the way the repositories
bind it (parameter values captured from a project request), and sent with
``sqlite3`` / ``psycopg`` on one connection per thread (``threading.local``),
configured like the engine's (``benchmarks.environment``). Endpoints are sync
``def``, as the project's are, so they run in the same Starlette threadpool.

The transactions are the project's: reads ``BEGIN DEFERRED`` (SQLite; psycopg
begins implicitly) and commit; writes ``BEGIN IMMEDIATE`` on SQLite, the run's
statement and its lifecycle event (on PostgreSQL one statement), committed
before the answer. Answers have the project's JSON shape and values (run,
event page, the one error shape), built from the row with the standard
library's ``json`` and Starlette's ``JSONResponse``; bodies are parsed by a
plain pydantic model. Nothing else of the project's request path is here: no
slot limiter, no Session, no response model, no error middleware.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from app.schemas import RunResponse
from app.schemas.event import EventResponse
from benchmarks.environment import raw_postgresql, raw_sqlite

SQL_FOLDER = Path(__file__).resolve().parents[2] / "docs" / "sql"
NOTIFY_CHANNEL = "session_events"
"""The channel the PostgreSQL statements notify (a bound value in the captured requests)."""

CREATE_OPTIONS = {"generate_now": False, "style_reference": None, "target_pages": []}
"""The options ``RunCreate`` stores for a body of only ``session_id`` and ``message``."""


def statements(dialect: str) -> dict[str, str]:
    """The labelled statements of ``docs/sql/<dialect>.sql``: ``{"RunRepository.by_id": sql}``."""
    found: dict[str, str] = {}
    label: str | None = None
    lines: list[str] = []
    for line in (SQL_FOLDER / f"{dialect}.sql").read_text().splitlines():
        if line.startswith("-- ") and not lines:
            label = line[3:].strip()
        elif line.strip() and label is not None:
            lines.append(line)
            if line.rstrip().endswith(";"):
                found[label] = "\n".join(lines).rstrip().rstrip(";")
                label, lines = None, []
    return found


def _sqlite_time(value: str | None) -> str | None:
    """Stored naive-UTC text ``YYYY-MM-DD HH:MM:SS.ffffff`` as pydantic writes the aware value."""
    if value is None:
        return None
    if value.endswith(".000000"):
        value = value[:-7]
    return f"{value[:10]}T{value[11:]}Z"


def _postgresql_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _sqlite_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _same(value: Any) -> Any:
    return value


Shape = list[tuple[str, int, Callable[[Any], Any]]]
"""How to build a JSON object from a row: (key, column index, converter) per key."""


def _fields(schema: type[BaseModel]) -> list[tuple[str, str, str]]:
    """(JSON key, column it is read from, kind) for each field of a response schema,
    in the schema's order: kind ``time``, ``json``, ``object`` (JSON, never null) or ``value``."""
    fields = []
    for name, info in schema.model_fields.items():
        column = info.validation_alias if isinstance(info.validation_alias, str) else name
        key = info.serialization_alias or name  # run_metadata is answered as "metadata"
        annotation = repr(info.annotation)
        if "datetime" in annotation:
            kind = "time"
        elif "dict" in annotation:
            kind = "json" if "None" in annotation else "object"
        else:
            kind = "value"
        fields.append((key, column, kind))
    return fields


RUN_FIELDS = _fields(RunResponse)
EVENT_FIELDS = _fields(EventResponse)


class Dialect:
    """How one backend reads values (timestamps, JSON columns) into the schemas' JSON.

    The keys and their order come from ``RunResponse`` / ``EventResponse``, the
    columns from the cursor's description: a field the project adds to its
    schemas (and its statements) is answered here too.
    """

    def __init__(self, time: Callable[[Any], str | None], json_value: Callable[[Any], Any]):
        self.time = time
        self.json = json_value
        self._shapes: dict[tuple[int, tuple[str, ...]], Shape] = {}

    def _shape(self, fields: list[tuple[str, str, str]], description: Any) -> Shape:
        columns = tuple(column[0] for column in description)
        key = (id(fields), columns)
        shape = self._shapes.get(key)
        if shape is None:
            converters = {"time": self.time, "json": self.json, "object": self._object}
            shape = self._shapes[key] = [
                (name, columns.index(column), converters.get(kind, _same))
                for name, column, kind in fields
            ]
        return shape

    def _object(self, value: Any) -> Any:
        loaded = self.json(value)
        return {} if loaded is None else loaded

    def run(self, row: Sequence[Any], description: Any) -> dict[str, Any]:
        """``RunResponse``'s JSON from a row of the repositories' run columns."""
        return {k: convert(row[i]) for k, i, convert in self._shape(RUN_FIELDS, description)}

    def events(self, rows: Sequence[Sequence[Any]], description: Any) -> list[dict[str, Any]]:
        """``EventResponse``'s JSON for each ``page_for_run`` row."""
        shape = self._shape(EVENT_FIELDS, description)
        return [{k: convert(row[i]) for k, i, convert in shape} for row in rows]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _run_not_found(run_id: str) -> JSONResponse:
    return _error(404, "run_not_found", f"run {run_id} not found")


TERMINAL = ("completed", "failed", "cancelled")


class SqliteStore:
    """The routes' database work on ``sqlite3``, one connection per thread."""

    dialect = Dialect(_sqlite_time, _sqlite_json)

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = threading.local()
        sql = statements("sqlite")
        self.by_id = sql["RunRepository.by_id"]
        self.page = sql["EventRepository.page_for_run"]
        self.create_sql = sql["RunRepository.create"]
        self.resume_sql = sql["RunRepository.transitions[resume]"]
        self.cancel_sql = sql["RunRepository.transitions[cancel]"]
        self.allocate = sql["EventRepository.allocate"]
        self.insert_event = sql["EventRepository.insert"]

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = raw_sqlite(self.url)
        return conn

    def get_run(self, run_id: str) -> JSONResponse:
        conn = self.connection()
        conn.execute("BEGIN DEFERRED")
        try:
            cursor = conn.execute(self.by_id, (run_id,))
            row = cursor.fetchone()
        finally:
            conn.commit()
        if row is None:
            return _run_not_found(run_id)
        return JSONResponse(self.dialect.run(row, cursor.description))

    def list_events(self, run_id: str, since_seq: int, limit: int) -> JSONResponse:
        conn = self.connection()
        conn.execute("BEGIN DEFERRED")
        try:
            cursor = conn.execute(self.page, (run_id, run_id, since_seq, limit, 0))
            rows = cursor.fetchall()
            missing = not rows and conn.execute(self.by_id, (run_id,)).fetchone() is None
        finally:
            conn.commit()
        if missing:
            return _run_not_found(run_id)
        return JSONResponse(_page(self.dialect.events(rows, cursor.description), since_seq))

    def _event(
        self,
        conn: sqlite3.Connection,
        session_id: str,
        run_id: str,
        kind: str,
        payload: dict[str, Any],
    ) -> None:
        seq = conn.execute(
            self.allocate,
            (
                session_id,
                0,
                1,
                session_id,
                1,
                session_id,
                run_id,
                run_id,
                session_id,
                session_id,
                None,
                0,
                1,
                session_id,
                1,
                1,
            ),
        ).fetchone()[0]
        conn.execute(
            self.insert_event,
            (session_id, seq, kind, json.dumps(payload), "session", run_id, None),
        ).fetchone()

    def create(self, session_id: str, message: str) -> JSONResponse:
        conn, run_id = self.connection(), uuid.uuid4().hex
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                self.create_sql,
                (
                    run_id,
                    session_id,
                    "queued",
                    "chat",
                    None,
                    message,
                    json.dumps(CREATE_OPTIONS),
                    f"{session_id}:{run_id}",
                    None,
                    "{}",  # run_metadata: none given
                    session_id,
                    session_id,
                    None,
                    None,
                    session_id,
                ),
            )
            row = cursor.fetchone()
            if row is None:
                conn.rollback()
                return _error(404, "session_not_found", f"session {session_id} not found")
            payload = {"trigger_source": "chat", "parent_run_id": None}
            self._event(conn, session_id, run_id, "run_created", payload)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return JSONResponse(self.dialect.run(row, cursor.description), status_code=201)

    def resume(self, run_id: str, resume: dict[str, Any]) -> JSONResponse:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                self.resume_sql,
                ("running", None, json.dumps(resume), None, None, "waiting_input", run_id),
            )
            row = cursor.fetchone()
            if row is None:
                current = conn.execute(self.by_id, (run_id,)).fetchone()
                conn.rollback()
                return _refused(run_id, current, "running")
            self._event(conn, row[0], run_id, "run_resumed", {"resume": resume})
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return JSONResponse(self.dialect.run(row, cursor.description), status_code=202)

    def cancel(self, run_id: str) -> JSONResponse:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                self.cancel_sql,
                ("cancelled", None, None, "queued", "running", "waiting_input", run_id),
            )
            row = cursor.fetchone()
            if row is None:
                lookup = conn.execute(self.by_id, (run_id,))
                current = lookup.fetchone()
                conn.commit()
                return _cancel_unchanged(run_id, current, lookup.description, self.dialect)
            self._event(conn, row[0], run_id, "run_cancelled", {})
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return JSONResponse(self.dialect.run(row, cursor.description), status_code=202)


def _page(items: list[dict[str, Any]], since_seq: int) -> dict[str, Any]:
    return {"items": items, "next_since_seq": items[-1]["seq"] if items else since_seq}


def _refused(run_id: str, current: Sequence[Any] | None, target: str) -> JSONResponse:
    if current is None:
        return _run_not_found(run_id)
    return _error(409, "invalid_transition", f"run {run_id} is {current[1]}; cannot go {target}")


def _cancel_unchanged(
    run_id: str, current: Sequence[Any] | None, description: Any, dialect: Dialect
) -> JSONResponse:
    if current is not None and current[1] in TERMINAL:
        return JSONResponse(dialect.run(current, description), status_code=200)
    return _refused(run_id, current, "cancelled")


def _event_parameters(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The bound values of the event part of the PostgreSQL ``*_with_event`` statements."""
    return {
        "next_seq_1": 1,
        "next_free_1": 1,
        "coalesce_1": 0,
        "coalesce_2": 1,
        "next_seq_2": 1,
        "event_type": kind,
        "event_payload": Jsonb(payload),
    }


class PostgresqlStore:
    """The routes' database work on ``psycopg``, one connection per thread."""

    dialect = Dialect(_postgresql_time, _same)

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = threading.local()
        sql = statements("postgresql")
        self.by_id = sql["RunRepository.by_id"]
        self.page = sql["EventRepository.page_for_run"]
        self.create_sql = sql["RunRepository.create_with_event"]
        self.resume_sql = sql["RunRepository.transitions_with_event[resume]"]
        self.cancel_sql = sql["RunRepository.transitions_with_event[cancel]"]

    def connection(self) -> psycopg.Connection:
        conn: psycopg.Connection | None = getattr(self.local, "conn", None)
        if conn is None or conn.closed:
            conn = self.local.conn = raw_postgresql(self.url)
        return conn

    def _transaction(self, work: Callable[[psycopg.Connection], JSONResponse]) -> JSONResponse:
        conn = self.connection()
        try:
            answer = work(conn)
            conn.commit()
            return answer
        except BaseException:
            conn.rollback()
            raise

    def get_run(self, run_id: str) -> JSONResponse:
        def work(conn: psycopg.Connection) -> JSONResponse:
            cursor = conn.execute(self.by_id, {"run_id": run_id})
            row = cursor.fetchone()
            if row is None:
                return _run_not_found(run_id)
            return JSONResponse(self.dialect.run(row, cursor.description))

        return self._transaction(work)

    def list_events(self, run_id: str, since_seq: int, limit: int) -> JSONResponse:
        def work(conn: psycopg.Connection) -> JSONResponse:
            params = {"run_id": run_id, "since_seq": since_seq, "limit": limit}
            cursor = conn.execute(self.page, params)
            rows = cursor.fetchall()
            if not rows and conn.execute(self.by_id, {"run_id": run_id}).fetchone() is None:
                return _run_not_found(run_id)
            return JSONResponse(_page(self.dialect.events(rows, cursor.description), since_seq))

        return self._transaction(work)

    def create(self, session_id: str, message: str) -> JSONResponse:
        run_id = uuid.uuid4().hex
        params = {
            "run_id": run_id,
            "session_id": session_id,
            "queued": "queued",
            "trigger_source": "chat",
            "parent_run_id": None,
            "input_message": message,
            "options": Jsonb(CREATE_OPTIONS),
            "checkpoint_thread": f"{session_id}:{run_id}",
            "checkpoint_ns": None,
            "run_metadata": Jsonb({}),
            "param_1": NOTIFY_CHANNEL,
            "param_2": "session",
            **_event_parameters("run_created", {"trigger_source": "chat", "parent_run_id": None}),
        }

        def work(conn: psycopg.Connection) -> JSONResponse:
            cursor = conn.execute(self.create_sql, params)
            row = cursor.fetchone()
            if row is None:
                return _error(404, "session_not_found", f"session {session_id} not found")
            return JSONResponse(self.dialect.run(row, cursor.description), status_code=201)

        return self._transaction(work)

    def resume(self, run_id: str, resume: dict[str, Any]) -> JSONResponse:
        params = {
            "param_1": "running",
            "param_2": None,
            "resume_payload": Jsonb(resume),
            "param_3": None,
            "param_4": None,
            "status_1": "waiting_input",
            "run_id": run_id,
            "param_5": NOTIFY_CHANNEL,
            "param_6": "session",
            **_event_parameters("run_resumed", {"resume": resume}),
        }

        def work(conn: psycopg.Connection) -> JSONResponse:
            cursor = conn.execute(self.resume_sql, params)
            row = cursor.fetchone()
            if row is None:
                current = conn.execute(self.by_id, {"run_id": run_id}).fetchone()
                conn.rollback()
                return _refused(run_id, current, "running")
            return JSONResponse(self.dialect.run(row, cursor.description), status_code=202)

        return self._transaction(work)

    def cancel(self, run_id: str) -> JSONResponse:
        params = {
            "param_1": "cancelled",
            "param_2": None,
            "param_3": None,
            "status_1": "queued",
            "status_2": "running",
            "status_3": "waiting_input",
            "run_id": run_id,
            "param_4": NOTIFY_CHANNEL,
            "param_5": "session",
            **_event_parameters("run_cancelled", {}),
        }

        def work(conn: psycopg.Connection) -> JSONResponse:
            cursor = conn.execute(self.cancel_sql, params)
            row = cursor.fetchone()
            if row is None:
                lookup = conn.execute(self.by_id, {"run_id": run_id})
                current = lookup.fetchone()
                return _cancel_unchanged(run_id, current, lookup.description, self.dialect)
            return JSONResponse(self.dialect.run(row, cursor.description), status_code=202)

        return self._transaction(work)


class CreateBody(BaseModel):
    session_id: str
    message: str


class ResumeBody(BaseModel):
    resume: dict[str, Any]


def create_app(url: str | None = None) -> FastAPI:
    """The raw-driver routes serving ``url`` (default ``DATABASE_URL``)."""
    url = url or os.environ["DATABASE_URL"]
    store: SqliteStore | PostgresqlStore = (
        SqliteStore(url) if make_url(url).get_backend_name() == "sqlite" else PostgresqlStore(url)
    )
    app = FastAPI(title="raw-driver Run API")

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str) -> JSONResponse:
        return store.get_run(run_id)

    @app.get("/api/runs/{run_id}/events")
    def list_run_events(
        run_id: str,
        since_seq: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
    ) -> JSONResponse:
        return store.list_events(run_id, since_seq, limit)

    @app.post("/api/runs", status_code=201)
    def create_run(body: CreateBody) -> JSONResponse:
        return store.create(body.session_id, body.message)

    @app.post("/api/runs/{run_id}/resume", status_code=202)
    def resume_run(run_id: str, body: ResumeBody) -> JSONResponse:
        return store.resume(run_id, body.resume)

    @app.post("/api/runs/{run_id}/cancel", status_code=202)
    def cancel_run(run_id: str) -> JSONResponse:
        return store.cancel(run_id)

    return app


__all__ = ["PostgresqlStore", "SqliteStore", "create_app", "statements"]
