"""Behaviour knobs of the fake provider.

Every knob can be set five ways; the later ones win:

1. environment variables at start-up: ``FAKE_PROVIDER_<NAME>`` (upper case), e.g.
   ``FAKE_PROVIDER_LATENCY_MS=50``; plus ``FAKE_PROVIDER_API_KEY``;
2. ``create_app(config)`` keys: the knob names below, plus ``api_key``;
3. ``POST /_fake/config`` with a JSON object of the same keys: it replaces the previous
   runtime overrides (``{}`` goes back to the start-up values); per process;
4. per request, HTTP headers ``x-fake-<name-with-dashes>``, e.g. ``x-fake-latency-ms: 50``;
5. per request, in-band directives in the text of the LAST user message (embeddings: of the
   inputs), so they pass through a gateway unchanged: ``#fake:<name>=<value>`` or ``#fake:<flag>``.

Knobs (names as used in directives and config keys):

* ``latency_ms=N``: wait N ms before answering (before the status line and the first chunk).
* ``chunk_delay_ms=N``: in streams, wait N ms before each content delta (one per token), so a
  stream lasts about ``latency_ms + tokens * chunk_delay_ms``.
* ``tokens=N``: output length in tokens (default 16), still capped by ``max_tokens``.
* ``error=S``: answer with HTTP status S (e.g. 400, 429, 500, 529) in the API's error shape.
* ``retry_after=S``: ``retry-after`` header (seconds) sent with ``error=429`` (default 1).
* ``hang``: accept the request and never answer (closes the connection after 300 s).
* ``cut_after=N``: stream N content deltas, then drop the connection without the final chunk,
  usage, ``[DONE]`` or ``message_stop``; without ``stream`` drop the connection unanswered.
* ``stream_error_after=N``: stream N content deltas, then the API's mid-stream error event
  (OpenAI ``data: {"error": ...}``, Anthropic ``event: error`` with ``overloaded_error``) and end.
* ``garbage``: answer 200 with a body that is not JSON (not SSE JSON either when streaming).

Flags (``hang``, ``garbage``) take ``1/true/yes/on`` or ``0/false/no/off``; a bare directive
means true. Unknown names or bad values are answered with a 400 so typos do not go unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

HANG_CAP_SECONDS = 300.0
_DIRECTIVE = re.compile(r"#fake:([A-Za-z_]+)(?:=(\S+))?")


class KnobError(ValueError):
    """A knob name or value that cannot be used."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """The effective knobs for one request."""

    latency_ms: int = 0
    chunk_delay_ms: int = 0
    tokens: int | None = None
    error: int | None = None
    retry_after: int = 1
    hang: bool = False
    cut_after: int | None = None
    stream_error_after: int | None = None
    garbage: bool = False


def _count(value: str) -> int:
    """Parse a non-negative integer."""
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _status(value: str) -> int:
    """Parse an HTTP error status."""
    number = int(value)
    if not 400 <= number <= 599:
        raise ValueError(value)
    return number


def _flag(value: str) -> bool:
    """Parse a boolean flag."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


PARSERS: dict[str, Callable[[str], Any]] = {
    "latency_ms": _count,
    "chunk_delay_ms": _count,
    "tokens": _count,
    "error": _status,
    "retry_after": _count,
    "hang": _flag,
    "cut_after": _count,
    "stream_error_after": _count,
    "garbage": _flag,
}


def parse(name: str, value: Any) -> Any:
    """Convert one knob value (string, number, bool or None) to its typed form."""
    name = name.lower()
    parser = PARSERS.get(name)
    if parser is None:
        raise KnobError(f"unknown fake knob {name!r}; known: {', '.join(PARSERS)}")
    if value is None:
        return getattr(Knobs(), name)
    if isinstance(value, bool):
        value = int(value)
    try:
        return parser(str(value))
    except ValueError:
        raise KnobError(f"bad value {value!r} for fake knob {name!r}") from None


def parse_all(values: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a mapping of knob names to values."""
    return {name.lower(): parse(name, value) for name, value in values.items()}


def apply(base: Knobs, overrides: Mapping[str, Any]) -> Knobs:
    """Return `base` with typed `overrides` applied."""
    return dataclasses.replace(base, **overrides) if overrides else base


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Knob values from ``FAKE_PROVIDER_<NAME>`` variables (other variables are ignored)."""
    return {name: parse(name, environ[key]) for name in PARSERS if (key := f"FAKE_PROVIDER_{name.upper()}") in environ}


def from_headers(environ: Mapping[str, Any]) -> dict[str, Any]:
    """Knob values from ``x-fake-*`` request headers of a WSGI environ."""
    found: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_X_FAKE_"):
            found[key[12:].lower()] = value
    return parse_all(found) if found else found


def from_text(text: str) -> dict[str, Any]:
    """Knob values from ``#fake:name=value`` directives in `text`."""
    if "#fake:" not in text:
        return {}
    return {m[1].lower(): parse(m[1], "1" if m[2] is None else m[2]) for m in _DIRECTIVE.finditer(text)}


def defaults(config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Start-up knob values: environment overlaid with `config` (``api_key`` excluded)."""
    values = from_env(os.environ if environ is None else environ)
    values.update(parse_all({k: v for k, v in (config or {}).items() if k != "api_key"}))
    return values
