"""Writes through model attributes follow the repositories' rules (docs/unit-of-work.md).

* **Assignment validates.** Every column attribute of a table model checks the
  value when it is set (constructor included): enums take a member or one of
  their values, text is storable text, JSON is an object both backends store
  verbatim (``app.input_limits.ensure_json_object``), timestamps are datetimes. A bad
  value raises ``ValueError`` naming ``Model.field`` at once, not at flush.
* **Assignment stays tracked.** SQLModel's ``__setattr__`` writes the raw value
  into the instance after SQLAlchemy has wrapped it, which untracks JSON
  values; ``StoredModel.__setattr__`` lets SQLAlchemy alone store it.
* **Stored rows change through the repositories.** Once a run is stored, the
  columns its transitions own (status, timestamps, waiting reason, resume
  payload, error, metrics) and its identity change only through
  ``RunRepository``; an event never changes. Assigning one raises
  ``ReadOnlyFieldError`` at once; changing a JSON value in place is refused at
  flush. A copy loaded before another request's transition therefore cannot
  write over it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import JSON, Enum, Integer, String, Table, TypeDecorator, event
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import UOWTransaction
from sqlalchemy.orm.attributes import set_attribute
from sqlalchemy.orm.base import instance_state
from sqlmodel import SQLModel
from sqlmodel.main import is_instrumented

from app.errors import ReadOnlyFieldError
from app.input_limits import ensure_json_object, ensure_storable_text
from app.types import StrEnumType, UTCDateTime

Check = Callable[[Any], Any]


class StoredModel(SQLModel):
    """Base of the table models: attribute writes go through SQLAlchemy only."""

    if TYPE_CHECKING:  # set by SQLAlchemy's declarative mapping on each table model
        __table__: ClassVar[Table]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_sa_instance_state":  # SQLAlchemy making an instance: as SQLModel does
            self.__dict__[name] = value
            return
        if is_instrumented(self, name):
            set_attribute(self, name, value)
            if name not in self.__sqlmodel_relationships__:
                self.__pydantic_fields_set__.add(name)
            return
        super().__setattr__(name, value)


def _enum_check(where: str, enum_class: type[enum.Enum]) -> Check:
    choices = ", ".join(str(member.value) for member in enum_class)

    def check(value: Any) -> Any:
        try:
            return enum_class(value)
        except ValueError:
            raise ValueError(f"{where}: expected one of {choices}, got {value!r}") from None

    return check


def _check_for(where: str, column_type: Any) -> Check | None:
    if isinstance(column_type, TypeDecorator) and not isinstance(
        column_type, StrEnumType | UTCDateTime
    ):
        column_type = column_type.impl_instance  # e.g. SQLModel's AutoString
    if isinstance(column_type, StrEnumType):
        return _enum_check(where, column_type.enum_class)
    if isinstance(column_type, Enum) and column_type.enum_class is not None:
        return _enum_check(where, column_type.enum_class)
    if isinstance(column_type, JSON):
        return lambda value: None if value is None else ensure_json_object(value, where)
    if isinstance(column_type, UTCDateTime):

        def check_datetime(value: Any) -> Any:
            if value is not None and not isinstance(value, datetime):
                raise ValueError(f"{where}: expected a datetime, got {type(value).__name__}")
            return value

        return check_datetime
    if isinstance(column_type, String):
        length = column_type.length

        def check_text(value: Any) -> Any:
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
            if length is not None and len(value) > length:
                raise ValueError(f"{where}: at most {length} characters, got {len(value)}")
            return ensure_storable_text(value, where)

        return check_text
    if isinstance(column_type, Integer):

        def check_integer(value: Any) -> Any:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{where}: expected an integer, got {type(value).__name__}")
            return value

        return check_integer
    return None


def _stored(target: Any) -> bool:
    return instance_state(target).key is not None


def install(model: type[SQLModel], *, read_only_when_stored: Iterable[str], hint: str) -> None:
    """Validate every column of ``model`` on assignment; refuse changes of
    ``read_only_when_stored`` on rows that are stored (persistent or detached)."""
    frozen = frozenset(read_only_when_stored)
    name = model.__name__
    for column in model.__table__.columns:  # type: ignore[attr-defined]
        attribute = getattr(model, column.key)
        check = _check_for(f"{name}.{column.key}", column.type)
        read_only = column.key in frozen

        def on_set(
            target: Any,
            value: Any,
            _old: Any,
            _initiator: Any,
            check: Check | None = check,
            read_only: bool = read_only,
            field: str = column.key,
        ) -> Any:
            if read_only and _stored(target):
                raise ReadOnlyFieldError(name, field, getattr(target, "id", None), hint)
            return value if check is None else check(value)

        event.listen(attribute, "set", on_set, retval=True)
    _READ_ONLY[model] = (frozen, hint)


_READ_ONLY: dict[type[SQLModel], tuple[frozenset[str], str]] = {}


@event.listens_for(OrmSession, "before_flush")
def _refuse_in_place_changes(session: OrmSession, _flush: UOWTransaction, _objs: Any) -> None:
    """JSON values changed in place never pass through ``set``: check them here."""
    for target in session.dirty:
        rule = _READ_ONLY.get(type(target))
        if rule is None:
            continue
        frozen, hint = rule
        state = instance_state(target)
        for field in frozen:
            if state.attrs[field].history.has_changes():
                raise ReadOnlyFieldError(
                    type(target).__name__, field, getattr(target, "id", None), hint
                )


__all__ = ["StoredModel", "install"]
