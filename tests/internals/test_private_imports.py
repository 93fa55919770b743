"""A leading ``_`` means private to its package, and no code imports across that line.

``pkg._module`` and ``pkg.module._name`` belong to ``pkg``: modules of ``pkg`` and of
its subpackages may import them, nothing else may (``app.repositories._sql`` is
for ``app.repositories`` only; ``app._dialects`` for ``app`` and its subpackages).
Checked on the import statements of app/, migrations/, benchmarks/, examples/ and
the tests. Tests under tests/internals/ are the contract tests of private code and
may import it; a test elsewhere may only with an entry in ``CONTRACT_TESTS`` below
saying why (docs/design.md).

No database: the rule is about source text, the same on both backends.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("app", "migrations", "benchmarks", "examples", "tests", "conftest.py")

CONTRACT_TESTS: dict[str, str] = {
    "tests/repositories/test_read_path.py": "checks the driver path's plans of the read path",
    "tests/migrations/test_migrations_live.py": "takes the runner's advisory lock to make it wait",
    "tests/migrations/test_migrations_checksums.py": "reads the runner's table of old checksums",
}
"""Test files outside tests/internals/ allowed to import private code, with why."""


def _module_of(path: Path) -> tuple[str, str]:
    """(dotted module name, its package) of a source file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imported(tree: ast.AST, module: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted path) of each module or name the source imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importer's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}"


def _is_package(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    if path.is_dir() or path.with_suffix(".py").is_file():
        return (path / "__init__.py").is_file()
    try:
        spec = importlib.util.find_spec(dotted)
    except (ImportError, ValueError):
        return True
    return spec is None or spec.submodule_search_locations is not None


def _owner(dotted: str) -> str | None:
    """The package a private module or name belongs to: the package holding it, or
    for a private name in a module, that module's package. None when nothing in
    ``dotted`` is private, or the private part is a top-level module (another
    project's: ``_thread``)."""
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = ".".join(parts[:index])
            if owner and not _is_package(owner):
                owner = owner.rpartition(".")[0]
            return owner or None
    return None


def violations(source: str, module: str, package: str) -> list[str]:
    """Each import in ``source`` (of ``module`` in ``package``) of another package's
    private module or name."""
    found = []
    for line, dotted in _imported(ast.parse(source), module, package):
        owner = _owner(dotted)
        if owner is None or package == owner or package.startswith(f"{owner}."):
            continue
        found.append(f"{module}:{line} imports {dotted} (private to {owner})")
    return found


def _sources() -> Iterator[Path]:
    for name in CHECKED:
        path = ROOT / name
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def test_no_module_imports_another_packages_private_code() -> None:
    found = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("tests/internals/") or relative in CONTRACT_TESTS:
            continue
        found += violations(path.read_text(), *_module_of(path))
    assert found == []


def test_contract_tests_named_outside_tests_internals_exist() -> None:
    assert [name for name in CONTRACT_TESTS if not (ROOT / name).is_file()] == []


def test_the_check_sees_cross_package_private_imports() -> None:
    source = (
        "from app.repositories._sql import POSTGRESQL\n"
        "import migrations._operator\n"
        "from app.repositories.reads import _builder\n"
        "from app.repositories import _driver\n"
        "from app._json import dumps\n"
        "from . import _private\n"
    )
    assert [v.split(" imports ")[1] for v in violations(source, "app.feed", "app")] == [
        "app.repositories._sql.POSTGRESQL (private to app.repositories)",
        "migrations._operator (private to migrations)",
        "app.repositories.reads._builder (private to app.repositories)",
        "app.repositories._driver (private to app.repositories)",
    ]


def test_the_check_lets_a_package_and_its_subpackages_use_its_private_code() -> None:
    source = (
        "from app._json import dumps\n"
        "from app.repositories._sql import NOW\n"
        "from app.repositories.reads import _builder\n"
        "from .. import _dialects\n"
        "from __future__ import annotations\n"
        "import app.__main__\n"
    )
    assert violations(source, "app.repositories.runs", "app.repositories") == []
