"""factory-boy factories for the tables, writing through the test's session.

The ``db`` and ``session`` fixtures and ``tests.concurrency.seed`` bind them
(``bind_factories``); factory-boy asks ``sqlalchemy_session_factory`` for that
session on every ``create()``, which adds the object and flushes, so database
defaults and constraints apply at once while the test keeps control of the
transaction.
"""

from __future__ import annotations

import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlmodel import Session as DbSession

from app.models import (
    ChatSession,
    EventSource,
    RunStatus,
    SessionEvent,
    SessionRun,
    TriggerSource,
    new_id,
)

_bound_session: DbSession | None = None


def bound_session() -> DbSession:
    if _bound_session is None:
        raise RuntimeError(
            "the factories are bound to no session: use the db or session fixture, "
            "or tests.concurrency.seed"
        )
    return _bound_session


class _BoundFactory(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_factory = bound_session
        sqlalchemy_session_persistence = "flush"


class SessionFactory(_BoundFactory):
    class Meta:
        model = ChatSession

    id = factory.LazyFunction(new_id)
    title = factory.Sequence(lambda n: f"session {n}")


class SessionRunFactory(_BoundFactory):
    class Meta:
        model = SessionRun

    id = factory.LazyFunction(new_id)
    session = factory.SubFactory(SessionFactory)
    session_id = factory.SelfAttribute("session.id")
    trigger_source = TriggerSource.CHAT
    status = RunStatus.QUEUED
    input_message = factory.Faker("sentence")
    checkpoint_thread = factory.LazyAttribute(lambda run: f"{run.session_id}:{run.id}")
    options = factory.LazyFunction(
        lambda: {"generate_now": False, "style_reference": None, "target_pages": []}
    )


class SessionEventFactory(_BoundFactory):
    """An event with the next free ``seq`` of its session, counted in the test.

    For seq allocation under concurrency use ``EventRepository.append``.
    """

    class Meta:
        model = SessionEvent

    session = factory.SubFactory(SessionFactory)
    session_id = factory.SelfAttribute("session.id")
    seq = factory.Sequence(lambda n: n + 1)
    type = "message"
    payload = factory.LazyFunction(dict)
    source = EventSource.SESSION


def bind_factories(session: DbSession | None) -> None:
    global _bound_session
    _bound_session = session
    SessionEventFactory.reset_sequence()
