"""Request and response bodies of the Run API (spec section 8).

The schemas inherit their fields from the field sets in ``app.models`` where the
API and the table agree, so a field is declared once. Input enters the layer
through these classes: they validate, table models do not.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Strict, StringConstraints
from sqlmodel import Field, SQLModel

from app.models import RunOptions, RunState, RunStatus, TriggerSource
from app.types import ensure_json_object, ensure_storable_text

JSONObject = Annotated[dict[str, Any], AfterValidator(lambda v: ensure_json_object(v, "value"))]
"""A JSON object that both backends store verbatim (no NUL, no NaN)."""


StorableText = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1),
    AfterValidator(lambda v: ensure_storable_text(v, "the text")),
]
"""Text given as ``str`` (bytes are refused, not decoded) that both backends store
verbatim (no NUL, no lone surrogate), not empty. Errors carry the field's name in
their location."""


class RunCreate(RunOptions):
    """Body of ``POST /api/runs``. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    session_id: StorableText
    message: StorableText
    style_reference: JSONObject | None = None
    target_pages: list[StorableText] = Field(default_factory=list)


class RunResponse(RunState):
    """Body of ``GET /api/runs/{run_id}``; build it with ``RunResponse.model_validate(run)``.

    ``run_id`` is read from the row's ``id`` (or from ``run_id`` in a dict).
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)  # type: ignore[assignment]

    run_id: str = Field(validation_alias="id")


class RunResumeRequest(SQLModel):
    """Body of ``POST /api/runs/{run_id}/resume``: ``{"resume": {...}}``."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    resume: JSONObject


__all__ = ["RunCreate", "RunResponse", "RunResumeRequest", "RunStatus", "TriggerSource"]
