"""A ready Run API application: ``uvicorn --factory app.api.main:create_app``.

It serves ``DATABASE_URL`` (``app.db``; tests override ``get_db_engine``). The
schema must be migrated first (``python -m migrations upgrade``): at start-up
(the ASGI lifespan) the app checks that the database can be reached and that
every migration of this code is applied (``migrations.status``), and refuses
to start otherwise with one line naming the problem and what to do. It never
creates a database: a SQLite file that does not exist stops it, and its engine
opens an existing file only (``app.db.get_engine``). It also checks its own
settings (``RUN_API_MAX_BODY_BYTES``, ``RUN_IDEMPOTENCY_WINDOW_SECONDS``, the
engine's) there.

Request bodies over ``RUN_API_MAX_BODY_BYTES`` are refused unread
(``app.api.limits``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import anyio
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import get_db_engine
from app.api.errors import database_cause, install_error_handlers
from app.api.health import health_router
from app.api.limits import BODY_ENVELOPE_BYTES, BodyLimit, max_body_bytes
from app.api.routes import router
from app.api.sessions import sessions_router
from app.db import create_db_engine
from app.input_limits import max_json_bytes
from app.replicas import ConsistencyTokens
from app.repositories import idempotency_window
from migrations import status

NOT_STARTED = "Run API not started"
UPGRADE = "python -m migrations upgrade"


def create_app() -> FastAPI:
    api = FastAPI(title="Run API", version="0.8")
    install_error_handlers(api)
    api.include_router(router)
    api.include_router(sessions_router)
    api.include_router(health_router)
    settings_problem = None
    try:
        limit = max_body_bytes()
    except ValueError as exc:  # reported at start-up, in one line
        settings_problem, limit = str(exc), max_json_bytes() + BODY_ENVELOPE_BYTES
    try:
        idempotency_window()  # read by keyed requests: a bad value is found now, not then
    except ValueError as exc:
        settings_problem = settings_problem or str(exc)
    api.add_middleware(BodyLimit, max_bytes=limit)
    api.add_middleware(ConsistencyTokens)  # read replicas: read-your-writes (app.replicas)
    api.add_middleware(StartupCheck, api=api, settings_problem=settings_problem)
    return api


def schema_problem(engine: Engine) -> str | None:
    """What keeps ``engine``'s database from being served, in one line; None if nothing.

    Reads through an engine of its own without a pool (nothing stays open), which
    opens a SQLite file only if it exists.
    """
    url = engine.url.render_as_string(hide_password=True)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        path = Path(engine.url.database).expanduser().absolute()
        if not path.exists():
            return f"no database at {path} (DATABASE_URL); create it with: {UPGRADE}"
    probe = create_db_engine(engine.url, must_exist=True, poolclass=NullPool)
    try:
        states = status(probe)
    except SQLAlchemyError as exc:
        return f"cannot reach the database {url} ({database_cause(exc)})"
    finally:
        probe.dispose()
    pending = [f"{s.version:04d}_{s.name}" for s in states if s.state == "pending"]
    changed = [f"{s.version:04d}_{s.name}" for s in states if s.state == "changed"]
    unknown = [f"{s.version:04d}_{s.name}" for s in states if s.state == "unknown"]
    if not (pending or changed or unknown):
        return None
    found = []
    if pending:
        shown = pending[0] if len(pending) == 1 else f"{pending[0]} ... {pending[-1]}"
        found.append(f"{len(pending)} of {len(states)} migrations not applied ({shown})")
    if changed:
        found.append(f"changed since they were applied: {', '.join(changed)}")
    if unknown:
        found.append(f"applied by a newer version of this code: {', '.join(unknown)}")
    todo = f"run: {UPGRADE}" if not (changed or unknown) else "see: python -m migrations status"
    return f"the database {url} is not at this code's schema version ({'; '.join(found)}); {todo}"


class StartupRefused(RuntimeError):
    """The app refused to start (the lifespan's ``startup.failed`` message)."""


class StartupCheck:
    """Pure ASGI: at lifespan start-up, refuse to start (``lifespan.startup.failed``
    with one line, which the server logs before exiting) when a setting is wrong or
    ``schema_problem`` finds one; every other scope passes through."""

    def __init__(self, app: ASGIApp, api: FastAPI, settings_problem: str | None = None) -> None:
        self.app = app
        self.api = api
        self.settings_problem = settings_problem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        first = await receive()
        if first["type"] == "lifespan.startup":
            problem = self.settings_problem or await self._problem()
            if problem is not None:
                message = f"{NOT_STARTED}: {problem}"
                await send({"type": "lifespan.startup.failed", "message": message})
                # Raised as Starlette's router raises after a failed start-up: a server
                # (uvicorn) has the message and exits; an in-process client (TestClient)
                # learns it here, instead of serving and then waiting at shutdown for a
                # lifespan that has ended.
                raise StartupRefused(message)
        replayed = False

        async def receive_again() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, receive_again, send)

    async def _problem(self) -> str | None:
        engine_of = self.api.dependency_overrides.get(get_db_engine, get_db_engine)
        try:
            engine = engine_of()  # get_db_engine is async; an override may be a function
            if inspect.isawaitable(engine):
                engine = await engine
        except (ValueError, ArgumentError) as exc:  # a bad URL or setting in the environment
            return f"configuration error: {exc}"
        return await anyio.to_thread.run_sync(schema_problem, engine)


__all__ = ["StartupCheck", "StartupRefused", "create_app", "schema_problem"]
