"""Fixtures of the Run API tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.generated_client import make_client


@pytest.fixture(scope="session")
def generated_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client generated from the Run API's schema, once per test process
    (``tests.api.generated_client``)."""
    return make_client(tmp_path_factory.mktemp("generated-client"))
