"""Parley llm service: OpenAI/Anthropic-compatible inference, routing and the usage ledger."""

from __future__ import annotations

import atexit
from pathlib import Path

from flask_openapi3 import OpenAPI

from parley_kit.app import create_service_app
from parley_kit.db import Database
from parley_kit.errors import provider_api_shape
from parley_kit.health import Health
from parley_kit.tokens import TokenVerifier

from .catalog import load_catalog
from .groups import register_group_route
from .ledger_views import register_ledger_routes
from .plain import PlainCalls
from .relay import Ledger
from .routing import RetryPolicy, Router
from .settings import LlmSettings, load_settings
from .upstream import Upstreams
from .views import LlmState, register_routes

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def create_app(settings: LlmSettings | None = None) -> OpenAPI:
    """Build the llm app: catalogue, database, token verifier, provider clients, routes and readiness."""
    settings = settings or load_settings()
    app, health = create_service_app(settings, __name__, title="Parley llm", shape_for_path=provider_api_shape)
    state = build_state(settings)
    app.extensions["parley_llm"] = state
    register_routes(app, state)
    register_ledger_routes(app, state)
    register_group_route(app, state)
    register_health(health, state)
    app.wsgi_app = PlainCalls(app.wsgi_app, state)  # type: ignore[method-assign]
    atexit.register(state.close)
    return app


def build_state(settings: LlmSettings) -> LlmState:
    """Everything a worker builds once after fork; a bad models file stops the service here."""
    catalog = load_catalog(settings.models_file)
    # No ping per checkout (a round trip on every call): the usage write and the idempotency claim retry on a lost
    # connection, the budget list reload too; anything else answers 503 once and the pool is renewed.
    db = Database(settings.database_url, pre_ping=False)
    upstreams = Upstreams(settings)
    policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        backoff_base=settings.retry_backoff,
        retry_max_wait=settings.retry_max_wait,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown=settings.breaker_cooldown,
    )
    return LlmState(
        catalog=catalog,
        db=db,
        verifier=TokenVerifier(settings.jwks_url, issuer=settings.jwt_issuer, audience=settings.jwt_audience),
        upstreams=upstreams,
        router=Router(catalog, policy, upstreams),
        ledger=Ledger(
            db.engine,
            catalog.price_version,
            budget_cache_seconds=settings.budget_cache_seconds,
            default_max_tokens=settings.default_max_tokens,
        ),
        log_prompts=settings.log_prompts,
        idempotency_wait=settings.idempotency_wait,
    )


def register_health(health: Health, state: LlmState) -> None:
    """Ready when the ledger database answers."""
    health.add_check("database", state.db.check)
