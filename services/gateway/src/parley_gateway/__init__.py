"""Parley gateway: the one public door. `create_app()` is what gunicorn serves."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, Response, request
from flask_openapi3 import OpenAPI

from parley_kit.amqp import Consumer
from parley_kit.app import create_service_app
from parley_kit.errors import ServiceUnavailable, provider_api_shape
from parley_kit.forward import ForwardClient
from parley_kit.health import Health
from parley_kit.http import ServiceClient
from parley_kit.service_auth import ServiceTokenSource
from parley_kit.tokens import TokenVerifier

from .cors import Cors
from .credentials import EdgeAuthenticator, KeyCache, KeyExchanger, UserRevocations
from .docs import SpecCache, docs_blueprint
from .headers import SECURITY_HEADERS
from .metrics import start_known_series_at_zero
from .proxy import Proxy
from .ratelimit import DefaultLimits, LocalRateLimiter, RateLimiter, RedisRateLimiter
from .revocation import start_listener
from .routing import Upstream
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]

log = logging.getLogger(__name__)

READINESS_TIMEOUT = (0.5, 1.0)


@dataclass
class Gateway:
    """What the factory built for this process (kept on `app.extensions["parley_gateway"]`)."""

    settings: GatewaySettings
    upstreams: dict[Upstream, ServiceClient]
    forwarders: dict[Upstream, ForwardClient]
    authenticator: EdgeAuthenticator
    proxy: Proxy
    listener: Consumer | None
    limiter: RateLimiter | None

    def close(self) -> None:
        """Stop the background event listener and write pending token counts (tests; gunicorn workers exit)."""
        if self.listener is not None:
            self.listener.stop()
        if self.limiter is not None:
            self.limiter.close()
        for forwarder in self.forwarders.values():
            forwarder.close()


def create_app(settings: GatewaySettings | None = None) -> OpenAPI:
    """Build the gateway for one process: upstream clients, edge authentication, revocation listener, proxy."""
    settings = settings or GatewaySettings()
    app, health = create_service_app(settings, __name__, title="Parley gateway", shape_for_path=provider_api_shape)
    upstreams = build_upstreams(settings)
    authenticator = build_authenticator(settings, upstreams[Upstream.AUTH])
    limiter = build_rate_limiter(settings)
    register_readiness(health, upstreams, limiter)
    register_security_headers(app)
    register_docs(app, settings, upstreams)
    listener = start_revocations(settings, authenticator)
    forwarders = build_forwarders(settings)
    proxy = mount_proxy(app, settings, forwarders, authenticator, limiter)
    mount_cors(app, settings)
    app.extensions["parley_gateway"] = Gateway(settings, upstreams, forwarders, authenticator, proxy, listener, limiter)
    start_known_series_at_zero()
    return app


def _upstream_timeouts(settings: GatewaySettings) -> dict[Upstream, tuple[str, float]]:
    return {
        Upstream.AUTH: (settings.auth_url, settings.auth_read_timeout),
        Upstream.LLM: (settings.llm_url, settings.llm_read_timeout),
        Upstream.JOBS: (settings.jobs_url, settings.jobs_read_timeout),
    }


def build_upstreams(settings: GatewaySettings) -> dict[Upstream, ServiceClient]:
    """One pooled keep-alive client per upstream service, each with its own read timeout (key exchange, docs,
    probes)."""
    read_timeouts = _upstream_timeouts(settings)
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


def build_forwarders(settings: GatewaySettings) -> dict[Upstream, ForwardClient]:
    """The proxy's hop to each service: as many pooled connections as a worker takes clients (streams hold one)."""
    return {
        upstream: ForwardClient(
            url,
            headers={"User-Agent": "parley-gateway"},
            connect_timeout=settings.connect_timeout,
            read_timeout=read_timeout,
            max_connections=settings.worker_connections,
        )
        for upstream, (url, read_timeout) in _upstream_timeouts(settings).items()
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


def build_rate_limiter(settings: GatewaySettings) -> RateLimiter | None:
    """Redis-backed limits; in-process ones only in development without Redis (with a warning); None when all are 0."""
    if not settings.rate_limits_enabled:
        return None
    if settings.redis_url:
        return RedisRateLimiter(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
            failure_mode=settings.rate_limit_failure_mode,
            pool_size=settings.redis_pool_size,
            pool_wait=settings.redis_pool_wait,
            settle_interval=settings.rate_limit_settle_interval,
        )
    # settings refuse this combination outside development
    log.warning("GATEWAY_REDIS_URL is not set: rate limits are kept per process (development only)")
    return LocalRateLimiter()


def register_readiness(
    health: Health, upstreams: dict[Upstream, ServiceClient], limiter: RateLimiter | None = None
) -> None:
    """Ready when auth, llm and jobs answer their `/livez` (cheap) and Redis answers a PING when limits use it."""
    for upstream in (Upstream.AUTH, Upstream.LLM, Upstream.JOBS):
        health.add_check(upstream.value, _livez_check(upstreams[upstream]))
    if isinstance(limiter, RedisRateLimiter):
        health.add_check("redis", limiter.ping)


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


def register_docs(app: OpenAPI, settings: GatewaySettings, upstreams: dict[Upstream, ServiceClient]) -> None:
    """`/docs`: Swagger UI over auth's, llm's and jobs' OpenAPI documents (fetched and cached)."""
    app.register_api(docs_blueprint(SpecCache(upstreams, ttl=settings.docs_cache_ttl)))


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
    app: Flask,
    settings: GatewaySettings,
    forwarders: dict[Upstream, ForwardClient],
    authenticator: EdgeAuthenticator,
    limiter: RateLimiter | None,
) -> Proxy:
    """Put the proxy in front of Flask: proxied prefixes never enter Flask's request machinery."""
    proxy = Proxy(
        app.wsgi_app,
        upstreams=forwarders,
        authenticator=authenticator,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
        limiter=limiter,
        limits=DefaultLimits(
            key_rpm=settings.rate_limit_key_rpm,
            key_tpm=settings.rate_limit_key_tpm,
            user_rpm=settings.rate_limit_user_rpm,
            user_tpm=settings.rate_limit_user_tpm,
        ),
    )
    app.wsgi_app = proxy  # type: ignore[method-assign]
    return proxy


def mount_cors(app: Flask, settings: GatewaySettings) -> None:
    """CORS in front of everything (preflights never reach the proxy or a service); absent when no origin is set."""
    if settings.cors_allowed:
        app.wsgi_app = Cors(app.wsgi_app, origins=settings.cors_allowed, max_age=settings.cors_max_age)  # type: ignore[method-assign]
