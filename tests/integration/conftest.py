from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.processes import Stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack on SQLite; tests start the parts they need."""
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The same stack on SQLite and on the real PostgreSQL."""
    db_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    s = Stack(tmp_path, db_url=db_url)
    try:
        yield s
    finally:
        s.close()
