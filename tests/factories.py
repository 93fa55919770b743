"""factory-boy factories for the tables, writing through the test's session.

The ``session`` fixture binds them (``bind_factories``); each ``create()``
adds the object and flushes, so database defaults and constraints apply at
once while the test keeps control of the transaction.
"""

from __future__ import annotations

import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlmodel import Session as DbSession

from app.models import (
    EventSource,
    RunStatus,
    Session,
    SessionEvent,
    SessionRun,
    TriggerSource,
    new_id,
)


class _BoundFactory(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_persistence = "flush"


class SessionFactory(_BoundFactory):
    class Meta:
        model = Session

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


FACTORIES: tuple[type[_BoundFactory], ...] = (
    SessionFactory,
    SessionRunFactory,
    SessionEventFactory,
)


def bind_factories(session: DbSession | None) -> None:
    for factory_class in FACTORIES:
        factory_class._meta.sqlalchemy_session = session
    SessionEventFactory.reset_sequence()
