"""What the command lines share: one-line errors and exit codes, never a traceback.

Exit codes: 2 for a usage or configuration mistake (bad option, bad URL, bad
environment variable), 1 for a database problem (unreachable, missing, not
writable, a failed or refused migration). Each message is one line naming
the problem and what to do.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from app.db import create_db_engine, resolve_database_url
from migrations.runner import MAX_TIMEOUT, MIN_TIMEOUT, positive_seconds, timeout_range

USAGE = 2
DATABASE = 1


class OperatorError(Exception):
    """A mistake or a problem the operator can fix; ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see --help)\n")


MAX_CONNECT_TIMEOUT = 3600.0


def add_connect_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect-timeout",
        type=seconds_between(1, MAX_CONNECT_TIMEOUT),
        default=None,
        help="PostgreSQL: seconds to wait for a connection, "
        f"1 to {MAX_CONNECT_TIMEOUT:g} (default: $DB_CONNECT_TIMEOUT, else 10)",
    )


def seconds_between(
    low: float, high: float, *, zero_allowed: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from ``low`` to ``high`` (or 0 if
    allowed). A bad one is one line naming the option and the range (exit 2)."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not positive_seconds(value, zero_allowed=zero_allowed, low=low, high=high):
            given = repr(raw) if len(raw) <= _QUOTED_MAX else f"a text of {len(raw)} characters"
            raise argparse.ArgumentTypeError(
                "expected a finite number of seconds "
                f"{timeout_range(zero_allowed=zero_allowed, low=low, high=high)}; got {given}"
            )
        return value

    parse.__name__ = "seconds"
    return parse


_QUOTED_MAX = 40
"""An option's value is quoted back (the operator typed it) up to this length."""

seconds = seconds_between(MIN_TIMEOUT, MAX_TIMEOUT)
"""A database timeout in seconds (``migrations.runner.positive_seconds``)."""
seconds_or_zero = seconds_between(MIN_TIMEOUT, MAX_TIMEOUT, zero_allowed=True)
"""``seconds``, or 0 for no limit."""


def open_engine(
    url: str | None, *, must_exist: bool, connect_timeout: float | None = None
) -> Engine:
    """The engine for ``--url`` / ``DATABASE_URL``; refuses what cannot work, in one line.

    ``must_exist``: a SQLite file that does not exist is an error instead of
    being created (``status`` and ``sql`` never create a database).
    """
    source = "--url" if url is not None else "DATABASE_URL"
    try:
        resolved = resolve_database_url(url)
    except ArgumentError:
        raise OperatorError(
            f"{source} is not a database URL; expected e.g. "
            "postgresql://user:password@host:5432/dbname or sqlite:///path/to/runs.db",
            USAGE,
        ) from None
    except ValueError as exc:
        raise OperatorError(f"{source}: {exc}", USAGE) from None
    path = sqlite_path(resolved)
    if must_exist and path is not None and not path.exists():
        raise OperatorError(
            f"no database at {path}; check {source} (python -m migrations upgrade creates one)",
            DATABASE,
        )
    kwargs: dict[str, Any] = {}
    if connect_timeout is not None and resolved.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout))}
    try:
        return create_db_engine(resolved, **kwargs)
    except ValueError as exc:  # a bad setting in the environment
        raise OperatorError(f"configuration error: {exc}", USAGE) from None
    except (ArgumentError, ImportError) as exc:
        raise OperatorError(f"{source}: {first_line(exc)}", USAGE) from None


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL; ``None`` for PostgreSQL and in-memory databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).expanduser().absolute()


def database_problem(exc: SQLAlchemyError, engine: Engine) -> str:
    """One line for a database error, saying when a SQLite location cannot be written."""
    detail = first_line(getattr(exc, "orig", None) or exc)
    path = sqlite_path(engine.url)
    if path is not None and ("unable to open" in detail or "readonly" in detail):
        unwritable = _unwritable(path)
        if unwritable:
            return f"cannot write the SQLite database {path}: {unwritable}; " + (
                "choose a writable location with --url or DATABASE_URL, or fix the permissions"
            )
    if engine.dialect.name == "postgresql" and (
        "timeout" in detail.lower() or "connection" in detail.lower()
    ):
        url = engine.url.render_as_string(hide_password=True)
        return f"{detail} ({url}); check the URL, the server and the network"
    return detail


def _unwritable(path: Path) -> str | None:
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is read-only"
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return f"{folder} is on a read-only file system"
        return f"the folder {folder} is not writable ({exc.strerror})"
    return None


def first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
