"""The route table: which upstream serves a path, whether the edge authenticates it, and its error shape."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from parley_kit.errors import ErrorShape


class Upstream(StrEnum):
    """The services behind the gateway."""

    AUTH = "auth"
    LLM = "llm"
    JOBS = "jobs"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a proxied path goes; `name` is its bounded metric label (never the raw path)."""

    name: str
    upstream: Upstream
    authenticate: bool
    shape: ErrorShape
    # Rate-limited (requests and tokens per minute): the inference routes; listing models or usage is not.
    limited: bool = False


LLM_PREFIXES = ("/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models", "/v1/usage", "/v1/budgets")
JOBS_PREFIXES = ("/v1/files", "/v1/batches")
LIMITED_PREFIXES = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/embeddings"})
# Auth endpoints only services may call: they answer 404 at the edge, as if they did not exist.
HIDDEN_AUTH_PREFIXES = ("/auth/internal", "/auth/service-token")

AUTH_ROUTE = Route("/auth", Upstream.AUTH, authenticate=False, shape=ErrorShape.PROBLEM)
JWKS_ROUTE = Route("/.well-known/jwks.json", Upstream.AUTH, authenticate=False, shape=ErrorShape.PROBLEM)
_V1_ROUTES = tuple(
    (
        prefix,
        prefix + "/",
        Route(
            prefix,
            Upstream.LLM if prefix in LLM_PREFIXES else Upstream.JOBS,
            authenticate=True,
            shape=ErrorShape.ANTHROPIC if prefix == "/v1/messages" else ErrorShape.OPENAI,
            limited=prefix in LIMITED_PREFIXES,
        ),
    )
    for prefix in LLM_PREFIXES + JOBS_PREFIXES
)
_HIDDEN = tuple((prefix, prefix + "/") for prefix in HIDDEN_AUTH_PREFIXES)


def is_clean(path: str) -> bool:
    """No empty or dot segments: the upstream must route exactly the path the edge checked."""
    return (
        "//" not in path
        and "/./" not in path
        and "/../" not in path
        and not path.endswith(("/.", "/.."))
        and "\\" not in path
    )


def match(path: str) -> Route | None:
    """The route serving `path` (decoded PATH_INFO), or None when the gateway does not proxy it."""
    if path.startswith("/v1/"):
        for exact, below, route in _V1_ROUTES:
            if path == exact or path.startswith(below):
                return route if is_clean(path) else None
        return None
    if path.startswith("/auth/"):
        for exact, below in _HIDDEN:
            if path == exact or path.startswith(below):
                return None
        return AUTH_ROUTE if is_clean(path) else None
    if path == "/.well-known/jwks.json":
        return JWKS_ROUTE
    return None
