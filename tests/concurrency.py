"""Helpers for tests that race several workers, each with its own session and commit."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


ROOT = Path(__file__).resolve().parents[1]


def run_scripts_together(
    script: str, args: list[str], count: int, timeout: float = 120
) -> list[str]:
    """Run ``count`` Python processes of ``script`` that start its real work at one moment.

    Each process prints ``ready`` once it has imported everything, then waits for
    a line on stdin; all are released together, so a slow machine cannot spread
    their starts apart. Every process must exit 0; returns each one's stdout after
    ``ready``.
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for process in processes:
        line = process.stdout.readline()
        assert line.strip() == "ready", f"process said {line!r} (exit code {process.poll()})"
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs
