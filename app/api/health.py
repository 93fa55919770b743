"""``GET /api/health``: for load balancers and orchestrators.

200 ``{"status": "ok", "schema_version": N}`` when the database answers and every
migration of this code is applied (``migrations.status``, read on a pooled connection
of the request's engine); otherwise 503 in the one error shape, with ``Retry-After``:
``database_unavailable`` when the database cannot be reached, ``schema_not_current``
when a migration is pending, changed, or from a newer version of the code. It reads
two small tables and writes nothing.

``create_app`` mounts it; a host app adds ``app.include_router(health_router)``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import Engine

from app.api.deps import EngineDep, run_in_slot
from app.api.errors import UNAVAILABLE_RETRY_AFTER, ErrorShapeRoute, error_response
from app.schemas import ErrorResponse
from migrations import status

health_router = APIRouter(prefix="/api", tags=["health"], route_class=ErrorShapeRoute)


def _schema_state(engine: Engine) -> tuple[int, list[str]]:
    """The highest applied version, and the migrations that are not as this code has them."""
    states = status(engine)
    applied = [s.version for s in states if s.state == "applied"]
    off = [f"{s.version:04d}_{s.name} ({s.state})" for s in states if s.state != "applied"]
    return max(applied, default=0), off


@health_router.get(
    "/health",
    responses={
        200: {
            "description": "The database answers and its schema is this code's",
            "content": {
                "application/json": {
                    "example": {"status": "ok", "schema_version": 15},
                }
            },
        },
        503: {
            "model": ErrorResponse,
            "description": "database_unavailable, or schema_not_current; see Retry-After",
        },
    },
)
async def health(engine: EngineDep) -> JSONResponse:
    version, off = await run_in_slot(engine, True, _schema_state, engine)
    if off:
        shown = ", ".join(off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
        return error_response(
            503,
            "schema_not_current",
            f"the database is not at this code's schema version: {shown}; "
            "run python -m migrations upgrade",
            **{"Retry-After": UNAVAILABLE_RETRY_AFTER},
        )
    return JSONResponse({"status": "ok", "schema_version": version})


__all__ = ["health_router"]
