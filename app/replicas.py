"""Read replicas: reads of runs and events served by a streaming replica, with
read-your-writes.

    router = attach_replica(engine, "postgresql://replica-host/db")   # or DATABASE_READ_URL
    RunReads.of(engine).get(run_id)      # on the replica when it has replayed far enough

What goes to the replica: the reads of ``app.repositories.reads`` (``RunReads`` and
``EventReads`` of an engine with a replica attached: ``GET /api/runs/{id}``, event
pages, the run lookup of a stream's start) and the catch-up of ``app.feed`` (the
backlog a follower reads before it follows live, whose rest comes from the primary).
Everything that writes, claims or locks stays on the primary.

**Read-your-writes.** After a request that may have written (a non-GET through
``app.api.deps.run_in_slot`` or the request session), the primary's WAL position,
``pg_current_wal_lsn()`` read right after the commit, goes back to the client as the
``Consistency-Token`` header and a ``consistency_token`` cookie (``ConsistencyTokens``,
the ASGI middleware ``app.api.main`` installs). A read that carries the token (header
or cookie) goes to the replica only once the replica's ``pg_last_wal_replay_lsn()``
has reached it: known already (the router remembers the highest replay position it
saw), or polled for at most ``DB_READ_WAIT_MS`` (200 ms); else it goes to the
primary. A read with no token goes to the replica as it is. A read made outside an
HTTP request (Python callers in this process) counts the process's last write
position as its token: ``note_write(engine)`` records one (the API's writes do it).
A replica that answers "not found" is asked nothing more: the primary answers (a run
made a moment ago through another process is never a 404 because of lag).

**Failures.** A replica that fails (cannot connect, drops a connection, cancels a
query) costs the client nothing: the read runs on the primary, one warning goes to
the log for the outage, and the replica is tried again after ``DB_READ_RETRY_SECONDS``
(5 s); when it answers again, one info line says so.

**SQLite** has no replicas: ``DATABASE_READ_URL`` is ignored there (a warning says so
once). Reference: docs/replicas.md.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy import Engine

from app.errors import BadParameterError, NotFoundError

T = TypeVar("T")

log = logging.getLogger("app.replicas")

READ_URL_ENV = "DATABASE_READ_URL"
CONSISTENCY_HEADER = "Consistency-Token"
CONSISTENCY_COOKIE = "consistency_token"
COOKIE_MAX_AGE = 300
"""Seconds a browser keeps the token: far longer than any replica lag worth waiting for."""
DEFAULT_WAIT_MS = 200.0
DEFAULT_RETRY_SECONDS = 5.0
DEFAULT_READ_CONNECT_TIMEOUT = 2

_ROUTER = "_run_layer_replica_router"
_CONFIGURED = "_run_layer_replica_configured"
_MADE = "_run_layer_routed_reads"
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
UNREADABLE = -1
"""The token of a request whose token could not be read: its reads go to the primary."""


def parse_lsn(text: str) -> int | None:
    """``'16/B374D848'`` (PostgreSQL's ``pg_lsn`` text) as a number; None if malformed."""
    found = _LSN.match(text.strip())
    return None if found is None else (int(found[1], 16) << 32) | int(found[2], 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# --------------------------------------------------------------------------
# The request's token


class RequestTokens:
    """One HTTP request's consistency: the position it must read at, and the primary's
    position after its writes (to send back). Mutable: the request's threads share it."""

    __slots__ = ("required", "written")

    def __init__(self, required: int | None = None) -> None:
        self.required = required
        self.written: int | None = None


_request: ContextVar[RequestTokens | None] = ContextVar("run_layer_consistency", default=None)


def _token_of(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The position named by a request's ``Consistency-Token`` header, else its cookie;
    None without either, ``UNREADABLE`` when the one given is malformed."""
    header, cookie = None, None
    for name, value in headers:
        if name == b"consistency-token":
            header = value
        elif name == b"cookie" and b"consistency_token=" in value:
            for part in value.split(b";"):
                key, _, item = part.strip().partition(b"=")
                if key == b"consistency_token":
                    cookie = item
    raw = header if header is not None else cookie
    if raw is None:
        return None
    lsn = parse_lsn(raw.decode("latin-1").strip('"'))
    return UNREADABLE if lsn is None else lsn


class ConsistencyTokens:
    """Pure ASGI middleware: reads a request's token into the request's context, and
    adds ``Consistency-Token`` and its cookie to the answer of a request that wrote
    (only when the engine has a replica: ``RequestTokens.written`` is set)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tokens = RequestTokens(_token_of(scope["headers"]))
        reset = _request.set(tokens)

        async def send_with_token(message: Any) -> None:
            if message["type"] == "http.response.start" and tokens.written is not None:
                token = format_lsn(tokens.written).encode()
                headers = list(message.get("headers", ()))
                headers.append((b"consistency-token", token))
                headers.append(
                    (
                        b"set-cookie",
                        b"consistency_token=%s; Max-Age=%d; Path=/; HttpOnly; SameSite=Lax"
                        % (token, COOKIE_MAX_AGE),
                    )
                )
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_token)
        finally:
            _request.reset(reset)


# --------------------------------------------------------------------------
# The router


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _scalar(engine: Engine, sql: str) -> Any:
    """One value, in autocommit on a pooled connection: one round trip, no transaction
    left open, autocommit off again before the connection goes back."""
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection  # psycopg's connection (PostgreSQL only)
        driver.autocommit = True
        try:
            with driver.cursor() as cursor:
                cursor.execute(sql)
                row = cursor.fetchone()
        finally:
            driver.autocommit = False
        return None if row is None else row[0]
    except BaseException:
        raw.invalidate()
        raise
    finally:
        raw.close()


class ReplicaRouter:
    """Where a read of ``primary``'s data goes: ``replica`` or ``primary`` (see the
    module docstring). Thread-safe; one per primary engine (``attach_replica``)."""

    def __init__(
        self,
        primary: Engine,
        replica: Engine,
        *,
        wait_ms: float | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.wait = (
            _env_float("DB_READ_WAIT_MS", DEFAULT_WAIT_MS) if wait_ms is None else wait_ms
        ) / 1000
        self.retry = (
            _env_float("DB_READ_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)
            if retry_seconds is None
            else retry_seconds
        )
        self._lock = threading.Lock()
        self._replayed = 0  # the highest replay position seen on the replica
        self._last_write = 0  # the primary's position after this process's last write
        self._down_until = 0.0
        self._down = False
        self._failed_at = -math.inf
        self.replica_reads = 0
        self.primary_reads = 0

    # ------------------------------------------------------------ positions

    def primary_position(self) -> int:
        """The primary's WAL position now (after a commit: at or past its commit record)."""
        return parse_lsn(_scalar(self.primary, "SELECT pg_current_wal_lsn()::text")) or 0

    def note_write(self) -> int:
        """Record that this process (and the current request) just committed a write;
        returns the primary's position, the write's token."""
        lsn = self.primary_position()
        with self._lock:
            self._last_write = max(self._last_write, lsn)
        tokens = _request.get()
        if tokens is not None:
            tokens.written = max(tokens.written or 0, lsn)
        return lsn

    def required(self) -> int | None:
        """The position the current read must see: the request's token (and its own
        writes), or outside a request the process's last write; None: any."""
        tokens = _request.get()
        if tokens is None:
            return self._last_write or None
        if tokens.written is not None:
            return max(tokens.written, tokens.required or 0)
        return tokens.required

    def _replay_position(self) -> int | None:
        text = _scalar(self.replica, "SELECT pg_last_wal_replay_lsn()::text")
        return None if text is None else parse_lsn(text)

    def replica_ready(self, required: int | None) -> bool:
        """Whether a read needing ``required`` may go to the replica now: not in a
        cool-down, and replayed that far (polled for at most ``wait`` seconds).
        Raises what the replica raises."""
        if self._down and time.monotonic() < self._down_until:
            return False
        if required is None:
            return True
        if required == UNREADABLE:
            return False
        if required <= self._replayed:
            return True
        deadline, pause = time.monotonic() + self.wait, 0.001
        while True:
            replayed = self._replay_position()
            if replayed is None:  # not a standby (promoted?): it may be anywhere
                return False
            with self._lock:
                self._replayed = max(self._replayed, replayed)
            if replayed >= required:
                return True
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    # ------------------------------------------------------------ reads

    def call(
        self,
        on_primary: Callable[..., T],
        on_replica: Callable[..., T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """``on_replica(*args, **kwargs)`` when the replica may answer, else (or when it
        fails, or finds nothing) ``on_primary`` with the same arguments."""
        try:
            ready = self.replica_ready(self.required())
        except Exception as exc:
            self._failed(exc)
            ready = False
        if ready:
            began = time.monotonic()
            try:
                result = on_replica(*args, **kwargs)
            except BadParameterError:
                raise  # the primary would say the same
            except NotFoundError:
                pass  # maybe not replayed yet: the primary knows
            except Exception as exc:
                self._failed(exc)
            else:
                self._answered(began)
                return result
        self.primary_reads += 1
        return on_primary(*args, **kwargs)

    def on_replica(self, required: int | None = None) -> bool:
        """For callers that pick an engine themselves: whether to read on the replica
        (``required``: the position needed, default the current request's or process's)."""
        try:
            return self.replica_ready(self.required() if required is None else required)
        except Exception as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = not self._down
            self._failed_at = time.monotonic()
            self._down, self._down_until = True, self._failed_at + self.retry
        if first:
            log.warning(
                "read replica %s failed (%s: %s); reads go to the primary, "
                "the replica is tried again every %g s",
                self.replica.url.render_as_string(hide_password=True),
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                self.retry,
            )

    def _answered(self, began: float) -> None:
        """A read begun at ``began`` succeeded on the replica: it is back, unless the
        read began before the last failure (it raced the outage)."""
        self.replica_reads += 1
        if self._down:
            with self._lock:
                was_down = self._down and began > self._failed_at
                if was_down:
                    self._down = False
            if was_down:
                log.info(
                    "read replica %s answers again; reads go to it",
                    self.replica.url.render_as_string(hide_password=True),
                )

    def failed(self, exc: BaseException) -> None:
        """Report a failure of a read the caller ran on ``replica`` itself."""
        self._failed(exc)

    def answered(self, began: float) -> None:
        """Report a read the caller began on ``replica`` itself at ``began``
        (``time.monotonic()``) that succeeded."""
        self._answered(began)


class RoutedReads:
    """A ``RunReads`` / ``EventReads`` whose every method runs on the replica or the
    primary as the router decides (same arguments, results and errors)."""

    __slots__ = ("_primary", "_replica", "_router")

    def __init__(self, router: ReplicaRouter, primary: Any, replica: Any) -> None:
        self._router, self._primary, self._replica = router, primary, replica

    def __getattr__(self, name: str) -> Any:
        on_primary = getattr(self._primary, name)
        if name.startswith("_") or not callable(on_primary):
            return on_primary
        on_replica = getattr(self._replica, name)
        router = self._router

        def routed(*args: Any, **kwargs: Any) -> Any:
            return router.call(on_primary, on_replica, *args, **kwargs)

        routed.__name__ = name
        return routed


# --------------------------------------------------------------------------
# Attaching


def router_of(engine: Engine) -> ReplicaRouter | None:
    """``engine``'s replica router, None when it has no replica."""
    return engine.__dict__.get(_ROUTER)


def routed(engine: Engine, make: Callable[[Engine], T]) -> T:
    """``make(engine)``, or when ``engine`` has a replica, a ``RoutedReads`` over
    ``make(engine)`` and ``make(replica)`` (what ``RunReads.of`` / ``EventReads.of`` give)."""
    router = router_of(engine)
    reads: Any = make(engine)
    if router is not None:
        reads = RoutedReads(router, reads, make(router.replica))
    engine.__dict__.setdefault(_MADE, []).append(reads)
    return reads


def _forget_reads(engine: Engine) -> None:
    """Drop the readers ``routed`` made for ``engine`` from wherever the engine keeps
    them (``RunReads.of`` makes new ones, routed by the router attached now)."""
    made = engine.__dict__.pop(_MADE, [])
    for key, value in list(engine.__dict__.items()):
        if any(value is reads for reads in made):
            del engine.__dict__[key]


def attach_replica(
    primary: Engine,
    replica: Engine | str,
    *,
    wait_ms: float | None = None,
    retry_seconds: float | None = None,
) -> ReplicaRouter | None:
    """Serve ``primary``'s reads from ``replica`` (an engine or a URL) from now on.

    Returns the router; None on SQLite, where the replica is ignored (logged).
    A URL gets an engine of this layer (``app.db.create_db_engine``) whose connect
    timeout is ``DB_READ_CONNECT_TIMEOUT`` (2 s): a replica that does not answer
    holds a read up for that long, once per ``DB_READ_RETRY_SECONDS``.
    """
    if primary.dialect.name != "postgresql":
        log.warning(
            "%s is ignored: the database is %s, which has no read replicas",
            READ_URL_ENV,
            primary.dialect.name,
        )
        return None
    if isinstance(replica, str):
        from app.db import create_db_engine

        timeout = _env_float("DB_READ_CONNECT_TIMEOUT", DEFAULT_READ_CONNECT_TIMEOUT)
        replica = create_db_engine(
            replica, connect_args={"connect_timeout": max(math.ceil(timeout), 1)}
        )
    if replica.dialect.name != "postgresql":
        raise ValueError(f"{READ_URL_ENV} must name a PostgreSQL database, got {replica.url}")
    router = ReplicaRouter(primary, replica, wait_ms=wait_ms, retry_seconds=retry_seconds)
    primary.__dict__[_ROUTER] = router
    primary.__dict__[_CONFIGURED] = True
    _forget_reads(primary)
    return router


def detach_replica(primary: Engine) -> None:
    """Read from ``primary`` only again (the replica engine is left to its owner)."""
    primary.__dict__.pop(_ROUTER, None)
    _forget_reads(primary)


_configure_lock = threading.Lock()


def configure_from_env(engine: Engine) -> Engine:
    """Attach ``DATABASE_READ_URL`` to ``engine`` once (the server's engine); returns it."""
    if engine.__dict__.get(_CONFIGURED):
        return engine
    with _configure_lock:
        if not engine.__dict__.get(_CONFIGURED):
            url = os.environ.get(READ_URL_ENV, "").strip()
            if url:
                attach_replica(engine, url)
            engine.__dict__[_CONFIGURED] = True
    return engine


def note_write(engine: Engine) -> int | None:
    """After a commit on ``engine``: remember the primary's position for this process's
    and this request's reads; the position, or None when ``engine`` has no replica."""
    router = router_of(engine)
    return None if router is None else router.note_write()


__all__ = [
    "CONSISTENCY_COOKIE",
    "CONSISTENCY_HEADER",
    "ConsistencyTokens",
    "ReplicaRouter",
    "RequestTokens",
    "attach_replica",
    "configure_from_env",
    "detach_replica",
    "format_lsn",
    "note_write",
    "parse_lsn",
    "routed",
    "router_of",
]
