"""Parley gateway: the one public door. `create_app()` is what gunicorn serves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, Response, request
from flask_openapi3 import OpenAPI

from parley_kit.amqp import Consumer
from parley_kit.app import create_service_app
from parley_kit.errors import ServiceUnavailable
from parley_kit.health import Health
from parley_kit.http import ServiceClient
from parley_kit.service_auth import ServiceTokenSource
from parley_kit.tokens import TokenVerifier

from . import routing
from .credentials import EdgeAuthenticator, KeyCache, KeyExchanger, UserRevocations
from .headers import SECURITY_HEADERS
from .proxy import Proxy
from .revocation import start_listener
from .routing import Upstream
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]

READINESS_TIMEOUT = (0.5, 1.0)


@dataclass
class Gateway:
    """What the factory built for this process (kept on `app.extensions["parley_gateway"]`)."""

    settings: GatewaySettings
    upstreams: dict[Upstream, ServiceClient]
    authenticator: EdgeAuthenticator
    proxy: Proxy
    listener: Consumer | None

    def close(self) -> None:
        """Stop the background event listener (tests; gunicorn simply exits)."""
        if self.listener is not None:
            self.listener.stop()


def create_app(settings: GatewaySettings | None = None) -> OpenAPI:
    """Build the gateway for one process: upstream clients, edge authentication, revocation listener, proxy."""
    settings = settings or GatewaySettings()
    app, health = create_service_app(settings, __name__, title="Parley gateway", shape_for_path=routing.shape_for_path)
    upstreams = build_upstreams(settings)
    authenticator = build_authenticator(settings, upstreams[Upstream.AUTH])
    register_readiness(health, upstreams)
    register_security_headers(app)
    listener = start_revocations(settings, authenticator)
    proxy = mount_proxy(app, settings, upstreams, authenticator)
    app.extensions["parley_gateway"] = Gateway(settings, upstreams, authenticator, proxy, listener)
    return app


def build_upstreams(settings: GatewaySettings) -> dict[Upstream, ServiceClient]:
    """One pooled keep-alive client per upstream service, each with its own read timeout."""
    read_timeouts = {
        Upstream.AUTH: (settings.auth_url, settings.auth_read_timeout),
        Upstream.LLM: (settings.llm_url, settings.llm_read_timeout),
        Upstream.JOBS: (settings.jobs_url, settings.jobs_read_timeout),
    }
    return {
        upstream: ServiceClient(
            url,
            name=upstream.value,
            connect_timeout=settings.connect_timeout,
            read_timeout=read_timeout,
            max_connections=settings.upstream_pool_size,
        )
        for upstream, (url, read_timeout) in read_timeouts.items()
    }


def build_authenticator(settings: GatewaySettings, auth: ServiceClient) -> EdgeAuthenticator:
    """JWTs verified against auth's JWKS; API keys exchanged at auth with the gateway's service token, cached."""
    timeout = (settings.connect_timeout, settings.auth_read_timeout)
    service_token = ServiceTokenSource(
        auth,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        timeout=timeout,
        margin=settings.token_refresh_margin,
    )
    cache = KeyCache(ttl=settings.key_cache_ttl, refresh_margin=settings.token_refresh_margin)
    exchanger = KeyExchanger(auth, service_token, cache, timeout=timeout, rejected_ttl=settings.rejected_key_ttl)
    verifier = TokenVerifier(settings.jwks_url, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    return EdgeAuthenticator(verifier, exchanger, UserRevocations())


def register_readiness(health: Health, upstreams: dict[Upstream, ServiceClient]) -> None:
    """Ready when auth and llm answer their `/livez` (cheap); jobs being down only affects files and batches."""
    for upstream in (Upstream.AUTH, Upstream.LLM):
        health.add_check(upstream.value, _livez_check(upstreams[upstream]))


def _livez_check(client: ServiceClient) -> Callable[[], None]:
    def check() -> None:
        status, _ = client.json("GET", "/livez", timeout=READINESS_TIMEOUT)
        if status != 200:
            raise ServiceUnavailable(f"{client.name} /livez answered {status}")

    return check


def register_security_headers(app: Flask) -> None:
    """The same security headers on Flask's own answers (probes, metrics, Swagger UI) as on proxied ones."""

    @app.after_request
    def _secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS:
            response.headers.setdefault(name, value)
        if not request.path.startswith("/openapi"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def start_revocations(settings: GatewaySettings, authenticator: EdgeAuthenticator) -> Consumer | None:
    """Listen to auth's identity events in the background (per worker, after fork)."""
    if not settings.revocation_events:
        return None
    return start_listener(
        settings.amqp_url,
        settings.amqp_name("events"),
        keys=authenticator.exchanger.cache,
        users=authenticator.revocations,
    )


def mount_proxy(
    app: Flask, settings: GatewaySettings, upstreams: dict[Upstream, ServiceClient], authenticator: EdgeAuthenticator
) -> Proxy:
    """Put the proxy in front of Flask: proxied prefixes never enter Flask's request machinery."""
    proxy = Proxy(
        app.wsgi_app,
        upstreams=upstreams,
        authenticator=authenticator,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
    )
    app.wsgi_app = proxy  # type: ignore[method-assign]
    return proxy
