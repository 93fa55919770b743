"""Repositories: the Run Service's way into the database.

They execute and flush inside the caller's transaction and never commit: the
caller owns the unit of work (docs/unit-of-work.md).
"""

from app.repositories.events import EventRepository
from app.repositories.runs import RunRepository

__all__ = ["EventRepository", "RunRepository"]
