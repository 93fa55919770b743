"""API schemas of the Run data layer."""

from app.schemas.run import RunCreate, RunResponse, RunResumeRequest, RunStatus, TriggerSource

__all__ = ["RunCreate", "RunResponse", "RunResumeRequest", "RunStatus", "TriggerSource"]
