"""Request and response bodies of the Run API (spec section 8).

The schemas inherit their fields from the field sets in ``app.models`` where the
API and the table agree, so a field is declared once. Input enters the layer
through these classes: they validate, table models do not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    AliasChoices,
    ConfigDict,
    Strict,
    StringConstraints,
    ValidationInfo,
    model_validator,
)
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from app.input_limits import ensure_json_object, ensure_storable_text
from app.models import MultitaskStrategy, RunOptions, RunState, RunStatus, TriggerSource


def _json_object(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    return ensure_json_object(value, info.field_name or "value")


JSONObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
"""A JSON object that both backends store verbatim, within the limits of
``app.input_limits.ensure_json_object`` (depth, 64-bit integers, size; no NUL, no NaN)."""


StorableText = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1),
    AfterValidator(lambda v: ensure_storable_text(v, "the text")),
]
"""Text given as ``str`` (bytes are refused, not decoded) that both backends store
verbatim (no NUL, no lone surrogate), not empty, within the size limit. Errors carry
the field's name in their location."""

MetadataObject = Annotated[
    dict[str, Any], AfterValidator(lambda value: ensure_json_object(value, "metadata"))
]
"""A run's ``metadata``: a JSON object within the JSON limits, named ``metadata`` in errors."""

METADATA_DESCRIPTION = (
    "the caller's JSON object, stored with the run and returned as given; listings "
    "filter on it (docs/run-api.md)"
)

NO_INPUT_IN_ERRORS = ConfigDict(hide_input_in_errors=True)
"""``str(ValidationError)`` names fields and problems, never the input (user content)."""


class RunCreate(RunOptions):
    """Body of ``POST /api/runs``. Unknown fields are rejected; the options together
    (stored as one JSON column) must fit the JSON limits."""

    model_config = ConfigDict(  # type: ignore[assignment]
        extra="forbid", serialize_by_alias=True, **NO_INPUT_IN_ERRORS
    )

    session_id: StorableText
    message: StorableText
    style_reference: JSONObject | None = None
    target_pages: list[StorableText] = Field(default_factory=list)
    multitask_strategy: MultitaskStrategy = Field(
        default=MultitaskStrategy.ENQUEUE,
        description="when the session already has an active run: enqueue behind it, "
        "reject (409), or interrupt (cancel the active runs)",
    )
    # ``metadata`` is SQLModel's table registry: the field is ``run_metadata`` and its
    # JSON key ``metadata``.
    run_metadata: MetadataObject = Field(
        default_factory=dict, alias="metadata", description=METADATA_DESCRIPTION
    )

    @model_validator(mode="after")
    def _options_fit(self) -> Self:
        ensure_json_object(self.model_dump(include=set(RunOptions.model_fields)), "options")
        return self


class RunResponse(RunState):
    """Body of ``GET /api/runs/{run_id}``; build it with ``RunResponse.model_validate(run)``.

    ``run_id`` is read from the row's ``id`` (or from ``run_id`` in a dict).
    """

    model_config = ConfigDict(  # type: ignore[assignment]
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        json_schema_serialization_defaults_required=True,  # always present in an answer
    )

    run_id: str = Field(validation_alias="id")
    attempt: int = Field(
        default=0,
        description="claims of the run's current execution by workers (docs/worker.md)",
    )
    parent_run_id: str | None = Field(
        default=None, description="the run this one continues or retries, if any"
    )
    trigger_source: TriggerSource = TriggerSource.CHAT
    input_message: str | None = Field(default=None, description="the message that made the run")
    options: dict[str, Any] | None = Field(
        default=None,
        description="the create options as stored (generate_now, style_reference, target_pages)",
    )
    created_at: datetime
    updated_at: datetime
    # Read from the column ``run_metadata`` (``app.models``), written as ``metadata``.
    run_metadata: dict[str, Any] = PydanticField(  # sqlmodel's Field takes no AliasChoices
        default_factory=dict,
        validation_alias=AliasChoices("run_metadata", "metadata"),
        serialization_alias="metadata",
        description=METADATA_DESCRIPTION,
    )


class RunResumeRequest(SQLModel):
    """Body of ``POST /api/runs/{run_id}/resume``: ``{"resume": {...}}``."""

    model_config = ConfigDict(extra="forbid", **NO_INPUT_IN_ERRORS)  # type: ignore[assignment]

    resume: JSONObject


__all__ = [
    "MultitaskStrategy",
    "RunCreate",
    "RunResponse",
    "RunResumeRequest",
    "RunStatus",
    "TriggerSource",
]
