"""Plain-SQL migrations for the Run data layer, tracked in ``schema_migrations``.

Public API::

    from migrations import upgrade, status, pending_sql, MIGRATIONS

    upgrade(engine)   # apply what is pending; returns [AppliedMigration] with notes
    status(engine)    # [MigrationStatus]: applied / pending / changed / unknown
    pending_sql(engine)  # the SQL upgrade would run, for review

Command line: ``python -m migrations upgrade|status|sql [--url URL]``.
See ``migrations.runner`` for transactions and concurrent starts, and each
``mNNNN_*`` module for what its migration does.
"""

from migrations.runner import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    MIGRATIONS,
    AppliedMigration,
    ChangedMigrationError,
    MigrationConnectionLostError,
    MigrationLockTimeoutError,
    MigrationStatus,
    Waits,
    pending_sql,
    status,
    upgrade,
)
from migrations.steps import Migration, MigrationError, StatementFailedError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_STATEMENT_LOCK_TIMEOUT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "MIGRATIONS",
    "AppliedMigration",
    "ChangedMigrationError",
    "Migration",
    "MigrationConnectionLostError",
    "MigrationError",
    "MigrationLockTimeoutError",
    "MigrationStatus",
    "StatementFailedError",
    "Waits",
    "pending_sql",
    "status",
    "upgrade",
]
