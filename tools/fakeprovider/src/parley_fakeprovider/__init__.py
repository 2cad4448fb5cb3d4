"""Parley fake provider: a deterministic fake OpenAI + Anthropic upstream for development, tests and benchmarks.

Run it with ``python -m parley_fakeprovider --port 8090``; see ``knobs`` for the behaviour knobs
and ``text`` for the token rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .text import count_tokens

if TYPE_CHECKING:
    from .app import FakeProvider

__all__ = ["count_tokens", "create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> FakeProvider:
    """Build the WSGI application (imported lazily so ``count_tokens`` does not pull in gevent)."""
    from .app import create_app as build

    return build(config)
