"""The type checker's view of ``app.aio``'s async twins: ``app/_async_twins.pyi``.

The twins are made from the sync classes when ``app.aio`` is imported, so a type
checker cannot see their methods. The stub declares each one, with the sync method's
parameters and result, as ``async def``; it is generated from the sync classes by this
test, which fails when the stub is out of date (a method added, renamed or retyped):

    WRITE_ASYNC_TWINS=1 scripts/test tests/internals/test_async_twins_stub.py

No database: the stub is made from the classes alone.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.aio import TWINS, public_methods

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "app" / "_async_twins.pyi"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BASES = {"Repository": "_RepositoryTwin", "Reads": "_ReadsTwin"}
_NOT_IMPORTED = frozenset({"self", "None", "Any"})


def _parameter(parameter: inspect.Parameter) -> str:
    text = parameter.name
    if parameter.annotation is not inspect.Parameter.empty:
        text += f": {parameter.annotation}"
    if parameter.default is not inspect.Parameter.empty:
        text += " = ..."
    return text


def _signature(method: Any) -> tuple[str, str]:
    """(parameters, result) of a sync method as source text (its annotations are
    strings: ``from __future__ import annotations``)."""
    signature = inspect.signature(method)
    parts: list[str] = []
    star = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            star = True
        parts.append(_parameter(parameter))
    result = signature.return_annotation
    return ", ".join(parts), "Any" if result is inspect.Signature.empty else str(result)


def render() -> str:
    """The stub's text, from the classes of ``app.aio.TWINS``."""
    imports: dict[str, set[str]] = {}
    classes: list[str] = []
    for sync_class, twin in TWINS.items():
        module = sys.modules[sync_class.__module__]
        base = next(base for suffix, base in _BASES.items() if sync_class.__name__.endswith(suffix))
        imports.setdefault(sync_class.__module__, set()).add(sync_class.__name__)
        lines = [f"class {twin.__name__}({base}[{sync_class.__name__}]):"]
        for name, method in public_methods(sync_class).items():
            parameters, result = _signature(method)
            for word in _NAME.findall(f"{parameters} -> {result}"):
                if keyword.iskeyword(word) or word in _NOT_IMPORTED or hasattr(builtins, word):
                    continue
                if word in vars(module):
                    imports.setdefault(_origin(module, word), set()).add(word)
            lines.append(f"    async def {name}({parameters}) -> {result}: ...")
        classes.append("\n".join(lines))
    imports.setdefault("typing", set()).add("Any")
    imports.setdefault("app.aio", set()).update({"_ReadsTwin", "_RepositoryTwin"})
    groups: tuple[list[str], list[str]] = ([], [])
    for source, words in sorted(imports.items()):
        line = f"from {source} import {', '.join(sorted(words))}"
        groups[source == "app" or source.startswith("app.")].append(line)
    docstring = (
        '"""The async twins of ``app.aio`` as a type checker sees them: each method of the\n'
        "sync class, as ``async def``. Generated from the sync classes by\n"
        'tests/internals/test_async_twins_stub.py (WRITE_ASYNC_TWINS=1); do not edit."""\n'
    )
    imports_text = "\n\n".join("\n".join(group) for group in groups)
    body = "\n\n".join(classes)
    return _formatted(f"{docstring}\n{imports_text}\n\n{body}\n")


def _origin(module: Any, word: str) -> str:
    """Where ``word`` of ``module`` is defined: the module its class or function names,
    when it is known there by the same name; else ``module`` itself."""
    obj = vars(module)[word]
    source = getattr(obj, "__module__", None)
    if isinstance(source, str) and getattr(obj, "__name__", None) == word:
        if getattr(sys.modules.get(source), word, None) is obj:
            return source
    return module.__name__


def _formatted(text: str) -> str:
    """``text`` as ``ruff format`` writes a stub (the project's settings)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(STUB), "-"],
        input=text,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_the_stub_declares_every_twin_as_the_sync_class_has_it() -> None:
    expected = render()
    if os.environ.get("WRITE_ASYNC_TWINS") == "1":
        STUB.write_text(expected)
    assert STUB.read_text() == expected, (
        "app/_async_twins.pyi is out of date: "
        "WRITE_ASYNC_TWINS=1 scripts/test tests/internals/test_async_twins_stub.py"
    )


@pytest.mark.slow  # runs mypy
def test_a_type_checker_sees_the_twins_results_and_refuses_wrong_arguments(
    tmp_path: Path,
) -> None:
    """mypy on code that uses the twins: a result is the sync method's type, a wrong
    argument and an unknown method are errors."""
    (tmp_path / "uses_twins.py").write_text(
        textwrap.dedent(
            """\
            from app.aio import AsyncEventReads, async_unit_of_work
            from app.db import get_engine
            from app.models import SessionRun
            from app.schemas import EventPage


            async def main() -> None:
                engine = get_engine()
                async with async_unit_of_work(engine) as db:
                    run: SessionRun = await db.runs.get("r")
                    reveal_type(run)
                    await db.runs.get(42)
                    await db.events.no_such_method()
                page: EventPage = await AsyncEventReads.of(engine).page_for_run("r")
                reveal_type(page)
            """
        )
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull),
            *("--follow-imports", "silent", str(tmp_path / "uses_twins.py")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert 'Revealed type is "app.models.SessionRun"' in out, out
    assert 'Revealed type is "app.schemas.EventPage"' in out or "EventPage" in out, out
    assert 'Argument 1 to "get" of "AsyncRunRepository" has incompatible type "int"' in out, out
    assert '"AsyncEventRepository" has no attribute "no_such_method"' in out, out
    assert out.count("error:") == 2, out
