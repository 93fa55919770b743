"""The one error body of the Run API (``app.api.errors``)."""

from __future__ import annotations

from sqlmodel import SQLModel


class ErrorDetail(SQLModel):
    code: str
    message: str


class ErrorResponse(SQLModel):
    """``{"error": {"code": "run_not_found", "message": "run 'x' not found"}}``."""

    error: ErrorDetail


__all__ = ["ErrorDetail", "ErrorResponse"]
