"""Every test runs with its own state directory, never the user's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("mnp-home")
    old = os.environ.get("MNP_HOME")
    os.environ["MNP_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MNP_HOME", None)
    else:
        os.environ["MNP_HOME"] = old


# The fault ledger (tests/ledger.py): its fixture and the summary it prints.
from tests.ledger import (  # noqa: E402, F401
    ledger,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)
