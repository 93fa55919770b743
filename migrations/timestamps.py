"""Timestamps written by migrations, in the form each backend's columns hold."""

from __future__ import annotations

from datetime import datetime

from app.types import utc_now


def storage_now(dialect: str) -> datetime | str:
    """Now, as the model's ``UTCDateTime`` stores it: aware on PostgreSQL, naive-UTC text on SQLite.

    Raw SQL on SQLite bypasses the column type, so the text must match what
    SQLAlchemy writes (``YYYY-MM-DD HH:MM:SS.ffffff``) to sort and read alike.
    """
    now = utc_now()
    if dialect == "sqlite":
        return now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return now
