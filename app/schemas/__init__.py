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
from app.schemas.session import RunPage, SessionCreate, SessionResponse

__all__ = [
    "ErrorDetail",
    "ErrorResponse",
    "EventPage",
    "EventResponse",
    "MultitaskStrategy",
    "RunCreate",
    "RunPage",
    "RunResponse",
    "RunResumeRequest",
    "RunStatus",
    "SessionCreate",
    "SessionResponse",
    "TriggerSource",
]
