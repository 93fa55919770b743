"""Repositories: the Run Service's way into the database.

They execute and flush inside the caller's transaction and never commit: the
caller owns the unit of work (docs/unit-of-work.md). ``RunReads`` / ``EventReads``
read runs and event pages outside the ORM Session, into the API's response
schemas (docs/read-path.md). ``idempotency_window()`` is the window of
``Idempotency-Key`` replays (``RUN_IDEMPOTENCY_WINDOW_SECONDS``, else 24 hours).
``EVENTS_CHANNEL`` is the PostgreSQL ``NOTIFY`` channel each committed event is
announced on (``app.feed_listener`` listens to it). ``set_fast_paths(False)`` sends
every statement through SQLAlchemy's own execution (``RUN_LAYER_FAST_PATHS=0`` at
start-up; docs/design.md).
"""

from app.repositories._driver import fast_paths, set_fast_paths
from app.repositories._idempotency import window_from_environment as idempotency_window
from app.repositories._sql import EVENTS_CHANNEL
from app.repositories.events import EventRepository
from app.repositories.reads import EventReads, RunReads
from app.repositories.runs import RunRepository

__all__ = [
    "EVENTS_CHANNEL",
    "EventReads",
    "EventRepository",
    "RunReads",
    "RunRepository",
    "fast_paths",
    "idempotency_window",
    "set_fast_paths",
]
