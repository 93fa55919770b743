"""A host app with ``async def`` routes on the layer's async API (``app.aio``).

    DATABASE_URL=... uvicorn --workers 2 --factory examples.async_route:create_app
    DATABASE_URL=... uvicorn --workers 2 --factory examples.async_route:create_run_api

Each route is one async unit of work (``app.api.async_deps``): committed before
the answer is sent, rolled back when the route raises. The database work runs on
one worker thread per request, never in the event loop, so a slow query in one
request does not hold up the others of the same worker. The Run API's routes
are mounted beside them (they share the engine's slots), and its error handlers
answer the layer's errors in the one error shape (404 ``run_not_found``, ...).

``create_run_api`` is the Run API's five endpoints written that way, as a host
would: what ``benchmarks/async_paths.py`` and its 1,000-request burst measure.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response

from app.api.async_deps import (
    AsyncDbDep,
    AsyncEventReadsDep,
    AsyncRunReaderDep,
    AsyncRunReadsDep,
    AsyncRunRepositoryDep,
)
from app.api.errors import install_error_handlers
from app.api.routes import router as run_api
from app.schemas import RunCreate, RunResponse, RunResumeRequest


def create_app() -> FastAPI:
    app = FastAPI(title="async host")
    install_error_handlers(app)
    app.include_router(run_api)

    @app.post("/chats/{chat_id}/runs", status_code=201)
    async def start_chat_run(chat_id: str, body: dict[str, Any], db: AsyncDbDep) -> RunResponse:
        """A run and a note event in one transaction."""
        run = await db.runs.create({"session_id": chat_id, "message": body["message"]})
        await db.events.append(chat_id, "note", {"text": "queued by the host"}, run_id=run.id)
        return RunResponse.model_validate(run)

    @app.get("/runs/{run_id}")
    async def get_run(run_id: str, reads: AsyncRunReadsDep) -> RunResponse:
        """The read path outside the ORM Session: one slot, one thread hop."""
        return await reads.get(run_id)

    @app.get("/runs/{run_id}/orm")
    async def get_run_orm(run_id: str, runs: AsyncRunReaderDep) -> RunResponse:
        """The same through a read-only unit of work and ``RunRepository.get``."""
        return RunResponse.model_validate(await runs.get(run_id))

    return app


def _json(model: Any, status_code: int = 200, **headers: str) -> Response:
    body = model.__pydantic_serializer__.to_json(model)
    return Response(body, status_code, headers, media_type="application/json")


def create_run_api() -> FastAPI:
    """``POST /api/runs``, ``GET /api/runs/{id}``, ``GET /api/runs/{id}/events``,
    ``POST /api/runs/{id}/resume`` and ``/cancel`` on the async dependencies."""
    app = FastAPI(title="Run API on app.aio")
    install_error_handlers(app)

    @app.post("/api/runs", status_code=201)
    async def create_run(
        body: RunCreate, request: Request, runs: AsyncRunRepositoryDep
    ) -> Response:
        run = RunResponse.model_validate(await runs.create(body))
        location = request.url_for("get_run", run_id=run.run_id).path
        return _json(run, 201, Location=location)

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str, reads: AsyncRunReadsDep) -> Response:
        return _json(await reads.get(run_id))

    @app.get("/api/runs/{run_id}/events")
    async def list_run_events(
        run_id: str, reads: AsyncEventReadsDep, since_seq: int = 0, limit: int = 100
    ) -> Response:
        return _json(await reads.page_for_run(run_id, since_seq=since_seq, limit=limit))

    @app.post("/api/runs/{run_id}/resume", status_code=202)
    async def resume_run(
        run_id: str, body: RunResumeRequest, runs: AsyncRunRepositoryDep
    ) -> Response:
        return _json(RunResponse.model_validate(await runs.resume(run_id, body)), 202)

    @app.post("/api/runs/{run_id}/cancel", status_code=202)
    async def cancel_run(run_id: str, runs: AsyncRunRepositoryDep) -> Response:
        run, changed = await runs.cancel(run_id)
        return _json(RunResponse.model_validate(run), 202 if changed else 200)

    return app
