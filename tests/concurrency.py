"""Helpers for tests that race several workers, each with its own session and commit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from tests.factories import bind_factories

T = TypeVar("T")


def in_own_transaction(engine: Engine, work: Callable[[DbSession], T]) -> T:
    """Run ``work`` in a new session and commit it (roll back if it raises)."""
    with DbSession(engine, expire_on_commit=False) as db:
        try:
            result = work(db)
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return result


def seed(engine: Engine, work: Callable[[DbSession], T]) -> T:
    """``in_own_transaction`` with the factories writing through that session."""

    def bound(db: DbSession) -> T:
        bind_factories(db)
        try:
            return work(db)
        finally:
            bind_factories(None)

    return in_own_transaction(engine, bound)


def race(engine: Engine, works: list[Callable[[DbSession], T]]) -> list[T | Exception]:
    """Start every ``work`` at once, each in its own transaction; results or exceptions in order."""
    barrier = threading.Barrier(len(works))

    def run(work: Callable[[DbSession], T]) -> T | Exception:
        barrier.wait()
        try:
            return in_own_transaction(engine, work)
        except Exception as exc:  # the caller inspects which worker failed and how
            return exc

    with ThreadPoolExecutor(max_workers=len(works)) as pool:
        return list(pool.map(run, works))
