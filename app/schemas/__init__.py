"""API schemas of the Run data layer."""

from app.schemas.error import ErrorDetail, ErrorResponse
from app.schemas.event import EventPage, EventResponse
from app.schemas.run import (
    MultitaskStrategy,
    RunCreate,
    RunResponse,
    RunResumeRequest,
    RunStatus,
    TriggerSource,
)

__all__ = [
    "ErrorDetail",
    "ErrorResponse",
    "EventPage",
    "EventResponse",
    "MultitaskStrategy",
    "RunCreate",
    "RunResponse",
    "RunResumeRequest",
    "RunStatus",
    "TriggerSource",
]
