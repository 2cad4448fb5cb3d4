"""Shared fixtures for the kit's own tests."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from parley_kit import logs, tracing

TESTS_DIR = Path(__file__).resolve().parent

# The sample service module is imported by name here and by the gunicorn processes the metrics tests start.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo `logs.configure` (run by every `create_service_app`) so pytest's own log handlers keep working."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.shutdown()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    tracing.clear()


@pytest.fixture(autouse=True)
def no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in an empty directory, so a developer's `.env` never leaks into settings."""
    monkeypatch.chdir(tmp_path)
