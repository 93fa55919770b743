"""Model instances from Core rows, without the ORM's per-row loading machinery.

Events are immutable log entries. Loading a page of them through the ORM
(identity map, row loaders, mutation tracking for the JSON payload) took most
of the page's time and gives a read-only copy nothing (see ``benchmarks/``).
The instances here are built as the ORM's loader builds them, without the
table model's constructor (which validates nothing and was the slowest part).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any, TypeVar

from sqlalchemy.orm import class_mapper, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.instrumentation import ClassManager

M = TypeVar("M")


@cache
def _class_manager(model: type[Any]) -> ClassManager[Any]:
    return class_mapper(model).class_manager


def snapshots(model: type[M], columns: tuple[str, ...], rows: Iterable[Any]) -> list[M]:
    """One ``model`` instance per row (values in the order of ``columns``), in no session.

    Transient snapshots: read them, serialize them; do not ``session.add``
    them (that would insert them again).
    """
    new_instance = _class_manager(model).new_instance
    instances: list[M] = []
    for row in rows:
        instance = new_instance()
        instance_state(instance).dict.update(zip(columns, row, strict=True))
        instances.append(instance)
    return instances


def detached(model: type[M], values: Mapping[str, Any]) -> M:
    """An instance holding ``values`` (every column) that behaves like a row loaded earlier.

    It carries its identity key, so ``session.add`` attaches it without an INSERT.
    """
    (instance,) = snapshots(model, tuple(values), [tuple(values.values())])
    make_transient_to_detached(instance)
    return instance
