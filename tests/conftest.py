"""Shared fixtures: a real PostgreSQL schema per test, and the CI rule that missing services fail."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from tests_support import missing_service

POSTGRES_URL = os.environ.get("VECTORLAY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database URL whose search_path is a fresh schema, dropped afterwards."""
    import sqlalchemy

    schema = f"vl_test_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError as error:
        admin.dispose()
        missing_service(f"PostgreSQL at {POSTGRES_URL} ({str(error).splitlines()[0]})")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
