"""A host app with ``async def`` routes on the layer's async API (``app.aio``).

    DATABASE_URL=... uvicorn --workers 2 --factory examples.async_route:create_app

Each route is one async unit of work (``app.api.async_deps``): committed before
the answer is sent, rolled back when the route raises. The database work runs on
one worker thread per request, never in the event loop, so a slow query in one
request does not hold up the others of the same worker. The Run API's routes
are mounted beside them (they share the engine's slots), and its error handlers
answer the layer's errors in the one error shape (404 ``run_not_found``, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.async_deps import AsyncDbDep, AsyncRunReaderDep, AsyncRunReadsDep
from app.api.errors import install_error_handlers
from app.api.routes import router as run_api
from app.schemas import RunResponse


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
