"""Repositories: the Run Service's way into the database.

They execute and flush inside the caller's transaction and never commit: the
caller owns the unit of work (docs/unit-of-work.md). ``RunReads`` / ``EventReads``
read runs and event pages outside the ORM Session, into the API's response
schemas (docs/read-path.md). ``idempotency_window()`` is the window of
``Idempotency-Key`` replays (``RUN_IDEMPOTENCY_WINDOW_SECONDS``, else 24 hours).
"""

from app.repositories._idempotency import window_from_environment as idempotency_window
from app.repositories.events import EventRepository
from app.repositories.reads import EventReads, RunReads
from app.repositories.runs import RunRepository

__all__ = ["EventReads", "EventRepository", "RunReads", "RunRepository", "idempotency_window"]
