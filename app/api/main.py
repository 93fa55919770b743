"""A ready Run API application: ``uvicorn --factory app.api.main:create_app``.

It serves ``DATABASE_URL`` (``app.db``); the schema must be migrated first
(``python -m migrations upgrade``).
"""

from __future__ import annotations

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.limits import BodyLimit, max_body_bytes
from app.api.routes import router


def create_app() -> FastAPI:
    api = FastAPI(title="Run API", version="0.8")
    install_error_handlers(api)
    api.include_router(router)
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes())
    return api


__all__ = ["create_app"]
