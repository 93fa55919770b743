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

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from app.api.deps import EngineDep, run_in_slot
from app.api.errors import ErrorShapeRoute
from app.api.openapi import operation_id, raises
from app.errors import DataLayerError
from migrations import status

health_router = APIRouter(
    prefix="/api",
    tags=["health"],
    route_class=ErrorShapeRoute,
    generate_unique_id_function=operation_id,
)


class SchemaNotCurrentError(DataLayerError):
    """The database answers, but a migration of this code is pending, changed, or from a
    newer version of the code: 503, with ``Retry-After`` as every 503."""

    status_code = 503
    code = "schema_not_current"


def _schema_state(engine: Engine) -> tuple[int, list[str]]:
    """The highest applied version, and the migrations that are not as this code has them."""
    states = status(engine)
    applied = [s.version for s in states if s.state == "applied"]
    off = [f"{s.version:04d}_{s.name} ({s.state})" for s in states if s.state != "applied"]
    return max(applied, default=0), off


class HealthResponse(BaseModel):
    """``{"status": "ok", "schema_version": 15}``: the database answers at this code's schema."""

    status: Literal["ok"]
    schema_version: int = Field(description="the newest migration applied")


@health_router.get(
    "/health",
    response_model=HealthResponse,
    response_description="The database answers and its schema is this code's",
)
@raises(SchemaNotCurrentError)
async def get_health(engine: EngineDep) -> JSONResponse:
    """200 when the database answers at this code's schema version, else 503."""
    version, off = await run_in_slot(engine, True, _schema_state, engine)
    if off:
        shown = ", ".join(off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
        raise SchemaNotCurrentError(
            f"the database is not at this code's schema version: {shown}; "
            "run python -m migrations upgrade"
        )
    return JSONResponse({"status": "ok", "schema_version": version})


__all__ = ["HealthResponse", "SchemaNotCurrentError", "health_router"]
