"""A Python client generated from the Run API's OpenAPI schema by openapi-python-client
(the test extra), for ``test_api_generated_client`` and ``test_sessions_generated_client``.

The schema does not depend on the database, so each test process generates the client
once (``make_client``, through the ``generated_client`` fixture of tests/api/conftest.py:
the folder holding the package ``run_api_client`` and a strict ``mypy.ini``). Each test
module type-checks its script against it once, and runs the script against a real server
on each backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from app.api.main import create_app

BIN = Path(sys.executable).parent
PACKAGE = "run_api_client"


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """``args`` in ``cwd`` with the virtual environment's commands first on PATH; their
    output, or a failed assertion with it."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def type_check(folder: Path, script: str) -> None:
    """mypy --strict over ``script`` (a file in ``folder``) and the generated client."""
    run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            script,
            PACKAGE,
        ],
        folder,
    )


def make_client(folder: Path) -> Path:
    """Generate the client into ``folder`` from ``create_app().openapi()`` (what
    ``GET /openapi.json`` serves); ``folder``."""

    generator = shutil.which("openapi-python-client", path=str(BIN))
    assert generator is not None, "openapi-python-client (the test extra) is not installed"
    (folder / "openapi.json").write_text(json.dumps(create_app().openapi()))
    run(
        [
            generator,
            "generate",
            "--path",
            "openapi.json",
            "--meta",
            "none",
            "--output-path",
            PACKAGE,
        ],
        folder,
    )
    # The generator's own httpx wrapper (client.py, the same for every schema) trips
    # mypy --strict over ``__exit__(*args)``; everything made from the schema is checked.
    (folder / "mypy.ini").write_text(
        f"[mypy]\nstrict = True\n\n[mypy-{PACKAGE}.client]\nignore_errors = True\n"
    )
    return folder
