"""Bodies of the sessions router and of run listings (``app.api.sessions``).

``SessionResponse.model_validate(session)`` reads a ``ChatSession`` (``session_id`` is
its ``id``). A ``RunPage`` is one keyset page of runs, newest first; its
``next_cursor`` is opaque (``app.repositories._listings``).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict
from sqlmodel import Field, SQLModel

from app.schemas.run import NO_INPUT_IN_ERRORS, RunResponse, StorableText

DEFAULT_TITLE = "New chat"


class SessionCreate(SQLModel):
    """Body of ``POST /api/sessions``; ``{}`` makes a session titled ``New chat``."""

    model_config = ConfigDict(extra="forbid", **NO_INPUT_IN_ERRORS)  # type: ignore[assignment]

    title: StorableText = Field(default=DEFAULT_TITLE, description="shown to the user")


class SessionResponse(SQLModel):
    """A chat session (``GET /api/sessions/{session_id}``)."""

    model_config = ConfigDict(  # type: ignore[assignment]
        from_attributes=True,
        validate_by_name=True,
        validate_by_alias=True,
        json_schema_serialization_defaults_required=True,  # always present in an answer
    )

    session_id: str = Field(validation_alias="id")
    title: str
    created_at: datetime | None = None
    updated_at: datetime | None = None


class RunPage(SQLModel):
    """A page of runs, newest first (``created_at``, then ``run_id``, descending).

    ``next_cursor`` is the ``cursor`` of the next page's request with the same
    filters, or null when this page is the last. Runs created after the first page
    was read come before it in this order, so later pages never show them: paging
    to the end lists every run that existed at the start, each once.
    """

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # type: ignore[assignment]

    items: list[RunResponse]
    next_cursor: str | None = None


__all__ = ["DEFAULT_TITLE", "RunPage", "SessionCreate", "SessionResponse"]
