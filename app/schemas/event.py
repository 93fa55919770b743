"""Event bodies of the Run API: one event as the envelope of spec section 7, and a page.

``EventResponse.model_validate(event)`` reads a ``SessionEvent`` (``timestamp``
is its ``created_at``; ``payload`` is always an object).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ConfigDict, field_validator
from sqlmodel import Field, SQLModel

from app.models import EventSource, SessionEvent


class EventResponse(SQLModel):
    model_config = ConfigDict(  # type: ignore[assignment]
        from_attributes=True,
        validate_by_name=True,
        validate_by_alias=True,
        json_schema_serialization_defaults_required=True,  # always present in an answer
    )

    session_id: str
    seq: int
    type: str
    source: EventSource
    run_id: str | None
    event_id: str | None
    payload: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime = Field(validation_alias="created_at")

    @field_validator("payload", mode="before")
    @classmethod
    def _always_an_object(cls, value: Any) -> Any:
        return {} if value is None else value


class EventPage(SQLModel):
    """A page of events in ``seq`` order.

    ``next_since_seq`` is the ``since_seq`` of the next request: the last
    event's seq, or the request's own ``since_seq`` when the page is empty.
    """

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # type: ignore[assignment]

    items: list[EventResponse]
    next_since_seq: int

    @classmethod
    def of(cls, events: list[SessionEvent], since_seq: int) -> EventPage:
        return cls(
            items=[EventResponse.model_validate(event) for event in events],
            next_since_seq=events[-1].seq if events else since_seq,
        )


__all__ = ["EventPage", "EventResponse"]
