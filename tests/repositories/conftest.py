"""The parity suite: the repository tests run through the sync and the async API.

Every test of the modules in ``PARITY_MODULES`` runs twice per backend, with
``api`` = ``sync`` and ``async`` (ids ``[sqlite-sync]``, ``[postgresql-async]``...).
For ``async`` the module's ``RunRepository`` / ``EventRepository`` are replaced,
for that test only, by factories of a sync-looking facade (``Through``): each
method call goes through an anyio blocking portal into an event loop thread,
where the async twin (``app.aio``) awaits it on the worker thread of an
``app.aio.adopt`` unit of work made for the test's ``Session``. So the same
test source checks both APIs, and the async variant really crosses the async
path and its threads; the test's own code (factories, ``db.commit()``,
``pytest.raises``) stays sync.

Left out: ``test_read_path`` (it checks the sync read path's internals; the async
read path's twins are checked against it in ``test_async_api.py``),
``test_run_queue_processes`` (its workers are other processes) and
``test_models`` (no repository).
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import pytest
from sqlmodel import Session as DbSession

from app import aio
from app.repositories import EventRepository, RunRepository

PARITY_MODULES = frozenset(
    {
        "test_append_many",
        "test_event_repository",
        "test_multitask_and_idempotency_races",
        "test_run_queue",
        "test_run_queue_retries",
        "test_run_repository",
        "test_unit_of_work",
    }
)
APIS = ("sync", "async")
PATCHED: dict[str, type] = {"RunRepository": RunRepository, "EventRepository": EventRepository}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module not in PARITY_MODULES or "api" not in metafunc.fixturenames:
        return
    if "run_scripts_together" in inspect.getsource(metafunc.function):
        return  # its repositories run in other processes: nothing to route through
    metafunc.parametrize("api", APIS, indirect=True)


@pytest.fixture(scope="session")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    """One event loop in a thread of its own for the run's async calls."""
    with anyio.from_thread.start_blocking_portal() as blocking_portal:
        yield blocking_portal


class Facade:
    """A repository twin that looks sync: each coroutine method is awaited through
    the portal (from whatever thread calls it); other attributes pass through."""

    def __init__(self, through: Through, twin: Any) -> None:
        self._through = through
        self._twin = twin

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._twin, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        through = self._through

        def call(*args: Any, **kwargs: Any) -> Any:
            through.calls += 1
            through.methods.add(f"{type(self._twin).__name__}.{name}")
            return through.portal.call(functools.partial(attribute, *args, **kwargs))

        return call


class Through:
    """Makes ``RunRepository(session, ...)`` go through the async API: one ``adopt``
    unit of work (one worker thread) per Session, closed when the test ends."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal) -> None:
        self.portal = portal
        self._units: dict[int, tuple[DbSession, aio.adopt, aio.AsyncUnitOfWork]] = {}
        self._lock = threading.Lock()
        self.calls = 0
        self.methods: set[str] = set()

    def unit(self, session: DbSession) -> aio.AsyncUnitOfWork:
        with self._lock:
            known = self._units.get(id(session))
        if known is not None:
            return known[2]
        adopted = aio.adopt(session)
        unit = self.portal.call(adopted.__aenter__)
        with self._lock:  # the session is kept alive with it: its id is not reused
            self._units[id(session)] = (session, adopted, unit)
        return unit

    def factory(self, sync_class: type) -> Callable[..., Facade]:
        twin_class = aio.TWINS[sync_class]

        def make(session: DbSession, /, **options: Any) -> Facade:
            return Facade(self, twin_class(self.unit(session), **options))

        return make

    def close(self) -> None:
        with self._lock:
            units, self._units = list(self._units.values()), {}
        for _, adopted, _ in units:
            self.portal.call(adopted.__aexit__, None, None, None)


@pytest.fixture(autouse=True)
def api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``sync`` or ``async``: which API the module's repositories are (module docstring)."""
    kind: str = getattr(request, "param", "sync")
    if kind == "async":
        through = Through(request.getfixturevalue("portal"))
        request.addfinalizer(through.close)
        factories = {sync_class: through.factory(sync_class) for sync_class in PATCHED.values()}
        for name, sync_class in PATCHED.items():
            if getattr(request.module, name, None) is sync_class:
                monkeypatch.setattr(request.module, name, factories[sync_class])
        for function in vars(request.module).values():  # `repository=RunRepository` defaults
            if inspect.isfunction(function) and function.__kwdefaults__:
                defaults = function.__kwdefaults__
                patched = {
                    key: factories.get(value, value) if isinstance(value, type) else value
                    for key, value in defaults.items()
                }
                if any(patched[key] is not defaults[key] for key in defaults):
                    monkeypatch.setattr(function, "__kwdefaults__", patched)
        if os.environ.get("PARITY_REPORT"):  # the async methods each variant called
            request.addfinalizer(lambda: _report(request.node.nodeid, through.methods))
    return kind


def _report(nodeid: str, methods: set[str]) -> None:
    with open(os.environ["PARITY_REPORT"], "a") as out:
        out.write(f"{nodeid} {' '.join(sorted(methods)) or '-'}\n")
