"""FastAPI dependencies: one database session per request, repositories on top of it.

The repositories share the request's session, so everything a handler does
commits or rolls back together when the request ends (``app.db.get_session``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Depends
from pydantic import ValidationError
from sqlmodel import Session as DbSession

from app.db import get_session
from app.errors import BadParameterError
from app.repositories import EventRepository, RunRepository
from app.schemas import RunResumeRequest

SessionDep = Annotated[DbSession, Depends(get_session)]


def get_run_repository(session: SessionDep) -> RunRepository:
    return RunRepository(session)


def get_event_repository(session: SessionDep) -> EventRepository:
    return EventRepository(session)


def get_resume_request(body: Annotated[Any, Body()]) -> RunResumeRequest:
    """The resume body, validated; a bad one is a 400 (spec 8: "bad resume payload")."""
    try:
        return RunResumeRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise BadParameterError("resume", f'expected {{"resume": {{...}}}}: {problems}') from None


RunRepositoryDep = Annotated[RunRepository, Depends(get_run_repository)]
EventRepositoryDep = Annotated[EventRepository, Depends(get_event_repository)]
ResumeRequestDep = Annotated[RunResumeRequest, Depends(get_resume_request)]

__all__ = [
    "EventRepositoryDep",
    "ResumeRequestDep",
    "RunRepositoryDep",
    "SessionDep",
    "get_event_repository",
    "get_resume_request",
    "get_run_repository",
]
