"""Model instances from the rows of the repositories' statements.

The ORM's loading (row loaders, identity map bookkeeping, the table model's
constructor) cost more than the SQL on the hot paths (see ``benchmarks/``).
The repositories run prebuilt Core statements (``app.repositories._driver``)
and build instances from their rows the way the ORM's loader builds them:

* ``snapshots``: events are immutable log entries; a page of them is a list
  of instances in no session, which is all a reader needs;
* ``in_session``: what ``populate_existing`` loading gives: the session's own
  instance refreshed with the row, or a new one added to the session;
* ``inserted``: what a flush gives for a row this transaction inserted: after a
  rollback the instance is transient again and keeps its values, as an
  ORM-inserted one does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy.orm import Mapper, class_mapper
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlmodel import Session as DbSession

from app._cache import cache

M = TypeVar("M")


@cache
def _mapper(model: type[Any]) -> Mapper[Any]:
    return class_mapper(model)


@cache
def _primary_key(model: type[Any]) -> tuple[str, ...]:
    return tuple(str(column.key) for column in _mapper(model).primary_key)


def snapshots(model: type[M], columns: tuple[str, ...], rows: Iterable[Any]) -> list[M]:
    """One ``model`` instance per row (values in the order of ``columns``), in no session.

    Read them and serialize them; do not ``session.add`` them (that would
    insert them again), and changes to them are not tracked.
    """
    new_instance = _mapper(model).class_manager.new_instance
    instances: list[M] = []
    for row in rows:
        instance = new_instance()
        instance_state(instance).dict.update(zip(columns, row, strict=True))
        instances.append(instance)
    return instances


def _instance(model: type[M], values: Mapping[str, Any]) -> tuple[M, Any]:
    """A bare instance holding ``values`` (no attribute events, nothing tracked yet)."""
    instance = _mapper(model).class_manager.new_instance()
    state = instance_state(instance)
    state.dict.update(values)
    return instance, state


def inserted(session: DbSession, model: type[M], values: Mapping[str, Any]) -> M:
    """A persistent instance for a row this transaction has just inserted (see
    ``_register_inserted``)."""
    instance, state = _instance(model, values)
    _register_inserted(session, model, [state])
    return instance


def _register_inserted(
    session: DbSession, model: type[Any], states: list[Any], *, tracked: bool = False
) -> None:
    """Register fresh states as the ORM's flush registers the rows it inserts, so a
    rollback expunges them with their values intact instead of expiring them.

    No public API does this. The flush's own steps are ``Session._save_impl``
    then ``_register_persistent``: with no session listener for those steps, what
    they do for a fresh state (nothing tracked, no previous identity, nothing
    related loaded) is done here directly: the identity key, the session's id,
    the identity map (``_add_unpresent``, as the loader adds) and the transaction's
    record of its new objects (``SessionTransaction._new``, what a rollback
    expunges). Then the ``load`` event, as the ORM's loader: JSON becomes tracked
    (``tracked``: ``track_json`` has done that already).
    """
    dispatch = session.dispatch
    mapper = _mapper(model)
    load = mapper.class_manager.dispatch.load
    if (
        dispatch.before_attach
        or dispatch.after_attach
        or dispatch.transient_to_pending
        or dispatch.pending_to_persistent
    ):
        for state in states:
            session._save_impl(state)  # noqa: SLF001 SQLAlchemy private, docs/design.md
        session._register_persistent(set(states))  # noqa: SLF001 SQLAlchemy private, docs/design.md
    else:
        key_of = mapper.identity_key_from_primary_key
        primary_key = _primary_key(model)
        identity_map, hash_key = session.identity_map, session.hash_key
        created = session._autobegin_t()._new  # noqa: SLF001 SQLAlchemy private, docs/design.md
        for state in states:
            values = state.dict
            key = key_of(tuple(values[name] for name in primary_key))
            state.key = key
            state.session_id = hash_key
            identity_map._add_unpresent(state, key)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            created[state] = True
    if not tracked:
        for state in states:
            load(state, None)


def track_json(model: type[M], instances: list[M]) -> bool:
    """The ``load`` event of fresh instances ahead of their registration, when its
    only listeners are the JSON tracking's, which need no session (``append_many``
    does it while the database inserts the batch); False, and nothing done, else."""
    load = _mapper(model).class_manager.dispatch.load
    if not all(getattr(listener, "__module__", None) == _TRACKING for listener in load):
        return False
    for instance in instances:
        load(instance_state(instance), None)
    return True


_TRACKING = "sqlalchemy.ext.mutable"


@cache
def _loader(model: type[Any], columns: tuple[str, ...]) -> tuple[Any, Any, Any]:
    """(identity key of a row, ``new_instance``, the ``load`` event) for ``model``'s rows."""
    mapper = _mapper(model)
    positions = tuple(columns.index(name) for name in _primary_key(model))
    key_from_primary_key = mapper.identity_key_from_primary_key

    def key_of(row: Any) -> Any:
        return key_from_primary_key(tuple(row[position] for position in positions))

    manager = mapper.class_manager
    return key_of, manager.new_instance, manager.dispatch.load


def in_session(session: DbSession, model: type[M], columns: tuple[str, ...], row: Any) -> M:
    """The session's instance for ``row`` (see ``in_session_many``)."""
    return in_session_many(session, model, columns, (row,))[0]


def in_session_many(
    session: DbSession, model: type[M], columns: tuple[str, ...], rows: Iterable[Any]
) -> list[M]:
    """The session's instance for each row, in order, as the ORM's loader gives them
    with ``populate_existing``: an instance already in the session is refreshed with
    the row; a new one is loaded into it (the identity map's ``_add_unpresent`` and
    the ``load`` event, as ``sqlalchemy.orm.loading`` does: JSON columns become
    tracked; ``loaded_as_persistent`` for session listeners).

    The session must hold no pending change to them (``execute_core`` flushes).
    """
    key_of, new_instance, load = _loader(model, columns)
    loaded_as_persistent = session.dispatch.loaded_as_persistent
    identity_map, hash_key = session.identity_map, session.hash_key
    instances: list[M] = []
    for row in rows:
        key = key_of(row)
        existing = identity_map.get(key)
        if existing is None:
            instance = new_instance()
            state = instance_state(instance)
            state.dict.update(zip(columns, row, strict=True))
            state.key = key
            state.session_id = hash_key
            identity_map._add_unpresent(state, key)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            load(state, None)  # JSON columns become tracked
            if loaded_as_persistent:
                loaded_as_persistent(session, state)
            instances.append(instance)
            continue
        for name, value in zip(columns, row, strict=True):
            set_committed_value(existing, name, value)
        state = instance_state(existing)
        state.manager.dispatch.refresh(state, None, None)  # re-tracks the JSON columns
        instances.append(existing)
    return instances


def register_inserted(
    session: DbSession, model: type[M], instances: list[M], *, tracked: bool = False
) -> None:
    """``inserted`` for instances already built (``snapshots``) whose rows this
    transaction has just inserted (``append_many``'s events); ``tracked``: their
    JSON is tracked already (``track_json``)."""
    states = [instance_state(instance) for instance in instances]
    _register_inserted(session, model, states, tracked=tracked)
