"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os

import pytest


def missing_service(what: str) -> None:
    """Under CI a missing service is a failure; elsewhere the test is skipped with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} is not available here")
