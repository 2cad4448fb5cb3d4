"""Parley jobs service: the OpenAI Files + Batch API, run over RabbitMQ by the `worker` processes.

The web app's imports (Flask, the OpenAPI extension, the token verifier) are made where the app is built: the batch
worker imports this package too, serves no HTTP, and carried them (~20 MB) for nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from parley_kit.db import Database
from parley_kit.errors import ErrorShape

from .settings import JobsSettings, load_settings

if TYPE_CHECKING:
    from flask_openapi3 import OpenAPI

    from parley_kit.health import Health

MIGRATIONS = Path(__file__).parent / "migrations"
UPLOAD_OVERHEAD = 64 * 1024  # multipart framing around the file itself


def shape_for_path(path: str) -> ErrorShape:
    """OpenAI's error shape on the OpenAI-compatible routes, problem+json elsewhere."""
    return ErrorShape.OPENAI if path.startswith("/v1/") else ErrorShape.PROBLEM


def open_database(settings: JobsSettings, *, pre_ping: bool = True) -> Database:
    """The jobs database engine for this process (`pre_ping` off where every touch is retried on a lost connection)."""
    return Database(settings.database_url, pre_ping=pre_ping)


def register_extensions(app: OpenAPI, settings: JobsSettings) -> None:
    """Per-process resources: the database engine and the token verifier (built after gunicorn forks)."""
    from parley_kit.tokens import TokenVerifier

    app.extensions["parley_db"] = open_database(settings)
    app.extensions["parley_verifier"] = TokenVerifier(
        settings.jwks_url, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    # werkzeug refuses larger bodies itself (413) even when no Content-Length was sent.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_file_bytes + UPLOAD_OVERHEAD


def register_blueprints(app: OpenAPI) -> None:
    """The Files and Batch API."""
    from .views import api

    app.register_api(api)


def register_health_checks(health: Health, app: OpenAPI, settings: JobsSettings) -> None:
    """Ready when the database and the broker answer."""
    from parley_kit.amqp import check_broker

    health.add_check("database", app.extensions["parley_db"].check)
    health.add_check("broker", lambda: check_broker(settings.amqp_url))


def create_app(settings: JobsSettings | None = None) -> OpenAPI:
    """The jobs API app (gunicorn calls this once per worker)."""
    from parley_kit.app import create_service_app

    settings = settings or load_settings()
    app, health = create_service_app(settings, __name__, title="Parley jobs", shape_for_path=shape_for_path)
    register_extensions(app, settings)
    register_blueprints(app)
    register_health_checks(health, app, settings)
    return app
