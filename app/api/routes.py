"""The Run API of spec section 8, ready to mount: ``app.include_router(router)``.

Every endpoint is one unit of work (``app.api.deps``): it has committed before
its answer leaves. Reads use read-only sessions. Errors come in the one shape
of ``app.api.errors``, which ``install_error_handlers`` (or ``create_app``)
installs; the statuses each endpoint can answer are listed in its OpenAPI.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from app.api.deps import (
    EventReaderDep,
    ResumeRequestDep,
    RunReaderDep,
    RunRepositoryDep,
)
from app.repositories.params import MAX_PAGE_SIZE, MAX_SEQ
from app.schemas import (
    ErrorResponse,
    EventPage,
    RunCreate,
    RunResponse,
    RunResumeRequest,
)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Bad parameter (query, path or resume body)",
        404: "Run or session not found",
        409: "State conflict",
        422: "Request body failed validation",
        503: "Database busy; retry after Retry-After seconds",
    }
    return {
        status: {"model": ErrorResponse, "description": described[status]} for status in statuses
    }


router = APIRouter(prefix="/api/runs", tags=["runs"], responses=_errors(503))

SinceSeq = Annotated[int, Query(ge=0, le=MAX_SEQ, description="exclusive; 0 = from the start")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


@router.post("", status_code=201, responses=_errors(404, 422))
def create_run(body: RunCreate, runs: RunRepositoryDep) -> RunResponse:
    """Create a queued run in an existing chat session."""
    return RunResponse.model_validate(runs.create(body))


@router.get("/{run_id}", responses=_errors(404))
def get_run(run_id: str, runs: RunReaderDep) -> RunResponse:
    return RunResponse.model_validate(runs.get(run_id))


@router.post(
    "/{run_id}/resume",
    status_code=202,
    responses=_errors(400, 404, 409),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RunResumeRequest.model_json_schema()}},
        }
    },
)
def resume_run(run_id: str, body: ResumeRequestDep, runs: RunRepositoryDep) -> RunResponse:
    """Resume a run that waits for input; the same run goes back to running."""
    return RunResponse.model_validate(runs.resume(run_id, body))


@router.post(
    "/{run_id}/cancel",
    status_code=202,
    responses={200: {"model": RunResponse, "description": "Already finished; unchanged"}}
    | _errors(404),
)
def cancel_run(run_id: str, response: Response, runs: RunRepositoryDep) -> RunResponse:
    """Cancel, idempotently: 202 when accepted, 200 when the run had already finished."""
    run, changed = runs.cancel(run_id)
    if not changed:
        response.status_code = 200
    return RunResponse.model_validate(run)


@router.get("/{run_id}/events", responses=_errors(400, 404))
def list_run_events(
    run_id: str, events: EventReaderDep, since_seq: SinceSeq = 0, limit: Limit = 100
) -> EventPage:
    """The run's events with ``seq > since_seq``, in seq order (session seqs)."""
    return EventPage.of(events.list_for_run(run_id, since_seq=since_seq, limit=limit), since_seq)


__all__ = ["router"]
