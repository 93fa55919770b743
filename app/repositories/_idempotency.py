"""Idempotency keys of ``RunRepository.create`` and ``resume`` (table ``run_idempotency_keys``).

A keyed request runs in three steps inside the caller's transaction:

1. **claim**: insert the key with ``run_id = NULL``, or take over a stored
   one that has expired or was left without a result. The primary key
   ``(scope, scope_id, key)`` decides between two requests with one key: on
   PostgreSQL the second insert waits for the first transaction and then sees
   its row; on SQLite the write lock serializes them.
2. the work itself (the new run, or the resume);
3. **record**: the key's ``run_id`` is set to the run.

When the claim finds a live key, its ``request_hash`` tells a replay (the
same request: the stored run comes back, nothing is written) from a reuse
(another request: ``IdempotencyKeyReusedError``). A request that fails rolls
back with its transaction, its key included, so a retry runs it again; a key
whose request failed in a transaction that was committed anyway keeps
``run_id = NULL`` and the next request with it takes it over.

A key's ``created_at`` and ``expires_at`` (``created_at`` + the window) and the
expiry checks of the claim and the purge use the database's clock (``_sql.NOW``),
so servers whose clocks drift agree on which keys are live.

Contract: docs/reference.md (Idempotency keys).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import Executable, String, bindparam, delete, exists, literal, or_, select, update
from sqlmodel import Session as DbSession

from app._params import described, text_param
from app.errors import BadParameterError, IdempotencyKeyReusedError
from app.models import ChatSession, IdempotencyKey, IdempotencyScope, SessionRun
from app.repositories._driver import execute_core
from app.repositories._sql import NOW, insert_for, now_plus

KEYS = IdempotencyKey.__table__
KEY_MAX_LENGTH = 255
DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=3650)
WINDOW_ENVIRONMENT_VARIABLE = "RUN_IDEMPOTENCY_WINDOW_SECONDS"

# Not the column names: those are reserved for the SET clauses of the same name.
_SCOPE = bindparam("key_scope", type_=KEYS.c.scope.type)
_SCOPE_ID = bindparam("key_owner", type_=String())
_KEY = bindparam("key_text", type_=String())


@dataclass(frozen=True, slots=True)
class _Statements:
    claim: dict[IdempotencyScope, Executable]
    lookup: Executable
    record: Executable
    purge: Executable


@cache
def _statements(dialect: str) -> _Statements:
    owner_exists = {
        IdempotencyScope.CREATE: exists().where(ChatSession.__table__.c.id == _SCOPE_ID),
        IdempotencyScope.RESUME: exists().where(SessionRun.__table__.c.id == _SCOPE_ID),
    }
    columns = ["scope", "scope_id", "key", "request_hash", "created_at", "expires_at"]
    claims: dict[IdempotencyScope, Executable] = {}
    for scope, owner in owner_exists.items():
        # Inserts nothing when the session (create) or run (resume) does not exist.
        upsert = insert_for(dialect)(KEYS).from_select(
            columns,
            select(
                _SCOPE,
                _SCOPE_ID,
                _KEY,
                bindparam("fingerprint", type_=String()),
                NOW,
                now_plus("window_seconds"),
            ).where(owner),
        )
        claims[scope] = upsert.on_conflict_do_update(
            index_elements=[KEYS.c.scope, KEYS.c.scope_id, KEYS.c.key],
            set_={
                "request_hash": upsert.excluded.request_hash,
                "run_id": None,
                "created_at": upsert.excluded.created_at,
                "expires_at": upsert.excluded.expires_at,
            },
            where=or_(KEYS.c.expires_at <= NOW, KEYS.c.run_id.is_(None)),
        ).returning(literal(1))
    primary_key = (KEYS.c.scope == _SCOPE, KEYS.c.scope_id == _SCOPE_ID, KEYS.c.key == _KEY)
    return _Statements(
        claim=claims,
        lookup=select(KEYS.c.request_hash, KEYS.c.run_id).where(*primary_key),
        record=update(KEYS)
        .where(*primary_key)
        .values(run_id=bindparam("result_run_id", type_=String())),
        purge=delete(KEYS).where(KEYS.c.expires_at <= NOW),
    )


def window_from_environment() -> timedelta:
    """``RUN_IDEMPOTENCY_WINDOW_SECONDS`` (a positive number), else 24 hours."""
    raw = os.environ.get(WINDOW_ENVIRONMENT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_WINDOW
    return _parse_window(raw)


MIN_WINDOW = timedelta(milliseconds=1)


@cache
def _parse_window(raw: str) -> timedelta:
    """A ``ValueError`` naming the variable and its range, not quoting the value."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not MIN_WINDOW.total_seconds() <= seconds <= MAX_WINDOW.total_seconds():
        raise ValueError(
            f"{WINDOW_ENVIRONMENT_VARIABLE} must be a number of seconds from "
            f"{MIN_WINDOW.total_seconds():g} to {MAX_WINDOW.total_seconds():.0f} (ten years), "
            f"got {described(raw)}"
        )
    return timedelta(seconds=seconds)


def window_param(window: Any) -> timedelta:
    """A positive window of at most ten years (so that ``now + window`` stays a date)."""
    if not isinstance(window, timedelta) or not timedelta(0) < window <= MAX_WINDOW:
        raise BadParameterError(
            "idempotency_window",
            f"expected a positive timedelta of at most {MAX_WINDOW.days} days, "
            f"got {described(window)}",
        )
    return window


def request_hash(request: dict[str, Any]) -> str:
    """A fingerprint of the request: SHA-256 of its canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of ``claim``: either this request owns the key, or ``replay_run_id``
    is the run the first request with that key produced."""

    owned: bool
    replay_run_id: str | None = None


class IdempotencyKeys:
    """The three steps of a keyed request on one session (see the module docstring)."""

    def __init__(self, session: DbSession, window: timedelta) -> None:
        self._session = session
        self._sql = _statements(session.get_bind().dialect.name)
        self._window = window

    def claim(
        self,
        scope: IdempotencyScope,
        scope_id: str,
        key: str,
        request: dict[str, Any],
    ) -> Claim:
        """Own ``key`` for this request, or find the first request's run.

        ``Claim(owned=False, replay_run_id=None)`` means the session (create) or
        run (resume) does not exist: the caller raises its not-found error.
        Raises ``IdempotencyKeyReusedError`` for a live key of another request.
        """
        fingerprint = request_hash(request)
        params = {
            "key_scope": scope,
            "key_owner": scope_id,
            "key_text": key,
            "fingerprint": fingerprint,
            "window_seconds": self._window.total_seconds(),
        }
        if execute_core(self._session, self._sql.claim[scope], params).first() is not None:
            return Claim(owned=True)
        stored = execute_core(self._session, self._sql.lookup, params).first()
        if stored is None:
            return Claim(owned=False)
        stored_hash, run_id = stored
        if run_id is None:
            return Claim(owned=False)
        if stored_hash != fingerprint:
            raise IdempotencyKeyReusedError(scope.value, scope_id)
        return Claim(owned=False, replay_run_id=run_id)

    def record(self, scope: IdempotencyScope, scope_id: str, key: str, run_id: str) -> None:
        params = {"key_scope": scope, "key_owner": scope_id, "key_text": key}
        params["result_run_id"] = run_id
        execute_core(self._session, self._sql.record, params)

    def purge_expired(self) -> int:
        """Delete the keys whose window has passed by the database's clock."""
        return execute_core(self._session, self._sql.purge, {}).rowcount


def key_param(key: Any) -> str:
    """An ``Idempotency-Key``: 1 to 255 characters of printable ASCII (as Stripe's)."""
    key = text_param(key, "idempotency_key", max_length=KEY_MAX_LENGTH)
    if not key.isascii() or not key.isprintable():
        raise BadParameterError("idempotency_key", "expected printable ASCII characters only")
    return key


__all__ = [
    "DEFAULT_WINDOW",
    "KEY_MAX_LENGTH",
    "Claim",
    "IdempotencyKeys",
    "key_param",
    "request_hash",
    "window_from_environment",
    "window_param",
]
