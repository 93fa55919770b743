"""Where the benchmarks run: scratch databases, raw driver connections, machine facts.

Every database a benchmark uses is created for this process (SQLite files in
a temporary folder, PostgreSQL databases named ``bench_<pid>_<label>``) and
removed at the end, so a run never touches the application's own data.

Raw connections are configured like ``app.db.create_db_engine`` configures
the engine's, so that the raw side of a comparison pays for the same
durability: on SQLite WAL, ``synchronous = NORMAL``, foreign keys and the busy
timeout, transactions started by hand; on PostgreSQL ``TIME ZONE 'UTC'``.
"""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psycopg
import sqlalchemy
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from app.db import create_db_engine, resolve_database_url

T = TypeVar("T")

DEFAULT_POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SQLITE_BUSY_TIMEOUT_MS = 5000


def postgresql_server_url() -> str:
    """The server to create scratch databases on: ``BENCH_DATABASE_URL``, else the tests' one."""
    return (
        os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or DEFAULT_POSTGRESQL_URL
    )


@dataclass
class ScratchDatabases:
    """Factory of throwaway databases for one benchmark run; ``close`` removes them all."""

    postgresql_url: str | None
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench_")))
    _created: list[str] = field(default_factory=list)

    def url(self, backend: str, label: str) -> str:
        """A new, empty database of ``backend``, as a URL string."""
        if backend == "sqlite":
            return f"sqlite:///{self.folder / f'{label}.db'}"
        if self.postgresql_url is None:
            raise RuntimeError("PostgreSQL is not available for this run")
        name = f"bench_{os.getpid()}_{label}"
        with self._admin() as admin, admin.connect() as conn:
            _drop_database(conn, name)
            conn.execute(text(f"CREATE DATABASE {_quoted(conn, name)}"))
        self._created.append(name)
        return (
            resolve_database_url(self.postgresql_url)
            .set(database=name)
            .render_as_string(hide_password=False)
        )

    def drop(self, url: str) -> None:
        """Remove one database before the end of the run (big ones take disk space)."""
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{parsed.database}{suffix}").unlink(missing_ok=True)
            return
        if parsed.database not in self._created:
            raise ValueError(f"{parsed.database} is no database of this run")
        with self._admin() as admin, admin.connect() as conn:
            _drop_database(conn, parsed.database)
        self._created.remove(parsed.database)

    def close(self) -> None:
        if self._created:
            with self._admin() as admin, admin.connect() as conn:
                for name in self._created:
                    _drop_database(conn, name)
            self._created.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def _admin(self) -> Iterator[Engine]:
        assert self.postgresql_url is not None
        admin = create_db_engine(
            self.postgresql_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            yield admin
        finally:
            admin.dispose()


def postgresql_reachable(url: str) -> str | None:
    """None when ``url`` answers, else the reason it does not (shown in the report)."""
    engine = create_db_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # any failure means "not available"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    finally:
        engine.dispose()


def on_each_backend(
    backends: Iterable[str], label: str, measure: Callable[[str], T]
) -> dict[str, T]:
    """``measure(url)`` on a scratch database of each backend, removed afterwards.

    PostgreSQL is skipped, with the reason on stderr, when its server does not answer.
    """
    server_url = postgresql_server_url()
    results: dict[str, T] = {}
    with scratch_databases(server_url) as databases:
        for backend in backends:
            if backend == "postgresql" and (reason := postgresql_reachable(server_url)):
                print(f"postgresql skipped: {reason}", file=sys.stderr)
                continue
            results[backend] = measure(databases.url(backend, label))
    return results


@contextmanager
def scratch_databases(postgresql_url: str | None) -> Iterator[ScratchDatabases]:
    databases = ScratchDatabases(postgresql_url)
    try:
        yield databases
    finally:
        databases.close()


# --------------------------------------------------------------------------
# Raw driver connections, configured like the engine's


def raw_sqlite(url: str) -> sqlite3.Connection:
    """A ``sqlite3`` connection with ``app.db``'s pragmas; the caller sends BEGIN IMMEDIATE."""
    conn = sqlite3.connect(make_url(url).database or "", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def psycopg_conninfo(url: str | URL) -> str:
    return (
        resolve_database_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def raw_postgresql(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """A ``psycopg`` connection in UTC, like the engine's; transactions begin implicitly."""
    conn = psycopg.connect(psycopg_conninfo(url), autocommit=True)
    conn.execute("SET TIME ZONE 'UTC'")
    conn.autocommit = autocommit
    return conn


# --------------------------------------------------------------------------
# Machine facts for the report


def machine_facts(postgresql_url: str | None) -> dict[str, str]:
    """Date, cores and versions, as the figures in docs/benchmarks.md need them."""
    facts = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "cpu": _cpu_model(),
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "SQLAlchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
    }
    try:
        import sqlmodel

        facts["SQLModel"] = sqlmodel.__version__
    except ImportError:  # pragma: no cover - a dependency of the project
        pass
    if postgresql_url is not None:
        with raw_postgresql(postgresql_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        facts["PostgreSQL"] = str(row[0]) if row else "?"
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _quoted(conn: Connection, name: str) -> str:
    """``name`` as a PostgreSQL identifier (names are made here: ``bench_<pid>_<label>``)."""
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _drop_database(conn: Connection, name: str) -> None:
    conn.execute(text(f"DROP DATABASE IF EXISTS {_quoted(conn, name)} WITH (FORCE)"))


# --------------------------------------------------------------------------
# Where the client and the PostgreSQL server run

PLACEMENTS = ("apart", "together", "free")
"""``apart``: this process on the first CPU, the server processes of its PostgreSQL
connections on the others (as when the database has cores, or a machine, of its own);
``together``: all on the first CPU; ``free``: wherever the kernel puts them."""


@dataclass
class Placement:
    """Pins this process and the server process of each PostgreSQL connection it opens.

    On a virtual machine a round trip between two processes costs several times more
    when they run on different CPUs than on one (a wake-up across CPUs): here 80 µs
    against 18 µs for ``SELECT 1``. Left to the kernel, the two sides of one comparison
    land either way from round to round, and a median picks whichever came up more often.
    Pinning makes every side pay the same round trip. Only on this machine's own server
    (a backend's pid is a local process) and where it may be pinned; otherwise, and with
    one CPU, the placement is ``free`` and ``described`` says why.
    """

    asked: str
    described: str = ""
    _client: set[int] = field(default_factory=set)
    _server: set[int] = field(default_factory=set)
    _before: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._before = set(cpus)
        if self.asked == "free" or len(cpus) < 2:
            why = "" if self.asked == "free" else f" ({len(cpus)} CPU)"
            self.asked, self.described = "free", f"free: processes where the kernel puts them{why}"
            return
        self._client = {cpus[0]}
        self._server = {cpus[0]} if self.asked == "together" else set(cpus[1:])
        server = "the same CPU" if self.asked == "together" else f"CPUs {sorted(self._server)}"
        self.described = (
            f"{self.asked}: the client on CPU {cpus[0]}, "
            f"its PostgreSQL server processes on {server}"
        )

    def pin_client(self) -> None:
        if self._client:
            os.sched_setaffinity(0, self._client)

    def release_client(self) -> None:
        if self._client:
            os.sched_setaffinity(0, self._before)

    def pin_server_of(self, engine: Engine) -> None:
        """Pin the server process of every connection ``engine`` opens from now on."""
        if not self._server or engine.dialect.name != "postgresql":
            return

        @event.listens_for(engine, "connect")
        def _pin(dbapi_connection: psycopg.Connection, _record: object) -> None:
            self.pin_server(dbapi_connection)

    def pin_server(self, connection: psycopg.Connection) -> None:
        if not self._server:
            return
        host = connection.info.host
        if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            self._unpinned(f"the server is not local ({host})")
            return
        try:
            os.sched_setaffinity(connection.info.backend_pid, self._server)
        except OSError as exc:
            self._unpinned(f"could not pin a server process: {exc.strerror}")

    def _unpinned(self, why: str) -> None:
        self.release_client()
        self._client, self._server = set(), set()
        self.asked, self.described = "free", f"free: {why}"
