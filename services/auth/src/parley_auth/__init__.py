"""Parley auth service: users, tokens, API keys, service identities."""

from __future__ import annotations

import logging

from flask_openapi3 import OpenAPI

from parley_kit.app import create_service_app
from parley_kit.db import Database
from parley_kit.health import Health

from .context import EXTENSION, AuthContext
from .events import IdentityEvents
from .settings import AuthSettings, load_settings
from .signing import Signer, bootstrap_lock, ensure_signing_key, local_verifier

log = logging.getLogger(__name__)

__all__ = ["create_app"]


def create_app(settings: AuthSettings | None = None) -> OpenAPI:
    """The auth app: gunicorn calls this in each worker, so connections are made after fork."""
    settings = settings or load_settings()
    app, health = create_service_app(settings, __name__, title="Parley auth")
    database = open_database(settings, health)
    bootstrap(settings, database)
    register_extensions(app, settings, database)
    register_blueprints(app)
    return app


def open_database(settings: AuthSettings, health: Health) -> Database:
    """The engine for this process, checked by /readyz."""
    database = Database(settings.database_url)
    health.add_check("database", database.check)
    return database


def bootstrap(settings: AuthSettings, database: Database) -> None:
    """Ensure a signing key (and the configured first admin) exist, drop stale login counters; one worker at a time."""
    from . import service, throttle

    with database.transaction() as session:
        bootstrap_lock(session)
        ensure_signing_key(session)
        throttle.purge_expired(session, settings=settings)
        if settings.admin_email and settings.admin_password:
            created = service.ensure_admin(session, email=settings.admin_email, password=settings.admin_password)
            if created is not None:
                log.info("created the first admin", extra={"user.id": created.id})


def register_extensions(app: OpenAPI, settings: AuthSettings, database: Database) -> None:
    """Signer, verifier (keys read from our own database) and the identity-event publisher."""
    app.extensions[EXTENSION] = AuthContext(
        settings=settings,
        db=database,
        signer=Signer(settings),
        verifier=local_verifier(settings, database),
        events=IdentityEvents(settings),
    )


def register_blueprints(app: OpenAPI) -> None:
    """The routes."""
    from .views import BLUEPRINTS

    for blueprint in BLUEPRINTS:
        app.register_api(blueprint)
