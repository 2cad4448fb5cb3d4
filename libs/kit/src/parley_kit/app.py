"""The common steps of every service's app factory: logging, trace context, errors, metrics, health, OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Response, g, request
from flask.json.provider import DefaultJSONProvider
from flask_openapi3 import Info, OpenAPI
from pydantic import BaseModel, ValidationError

from . import errors, health, logs, metrics, tracing
from .errors import ErrorShape
from .openapi import ServiceOpenAPI
from .settings import ServiceSettings

BEARER_SCHEME = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON, except that a body nested too deeply for the parser is a malformed body (400), not a crash:
    Flask turns only ValueError into a client error, and `json` raises RecursionError past ~1,000 levels."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse, with runaway nesting reported as invalid JSON."""
        try:
            return super().loads(s, **kwargs)
        except RecursionError as exc:
            raise ValueError("the JSON body is nested too deeply") from exc


def create_service_app(
    settings: ServiceSettings,
    import_name: str,
    *,
    title: str,
    shape_for_path: Callable[[str], ErrorShape] = lambda _path: ErrorShape.PROBLEM,
) -> tuple[OpenAPI, health.Health]:
    """A Flask (flask-openapi3) app with the kit's steps registered; the service adds its routes and checks."""
    logs.configure(
        settings.service_name,
        settings.version,
        settings.environment,
        settings.log_level,
        settings.logstash_host,
        settings.logstash_port,
    )

    def on_validation_error(exc: ValidationError) -> Response:
        return errors.error_response(shape_for_path(request.path), errors.validation_error(exc))

    app = ServiceOpenAPI(
        import_name,
        shape_for_path=shape_for_path,
        info=Info(title=title, version=settings.version),
        security_schemes=BEARER_SCHEME,
        validation_error_status=400,
        validation_error_callback=on_validation_error,
    )
    app.json = JsonProvider(app)
    app.config["PARLEY_SETTINGS"] = settings
    register_request_context(app)
    errors.register_error_handlers(app, shape_for_path)
    metrics.init_app(app)
    return app, health.init_app(app)


def register_request_context(app: OpenAPI) -> None:
    """Start a trace per request (continuing the caller's), echo the request id, and write one access line."""

    @app.before_request
    def _begin() -> None:
        g.parley_begun = time.perf_counter_ns()
        tracing.start(request.headers.get("traceparent"), request.headers.get("x-request-id"))

    @app.after_request
    def _end(response: Response) -> Response:
        context = tracing.current()
        if context is not None:
            response.headers["x-request-id"] = context.request_id
        if request.path not in ("/metrics", "/livez", "/readyz"):
            begun = g.get("parley_begun")
            logs.access(
                request.method,
                request.path,
                response.status_code,
                time.perf_counter_ns() - begun if begun is not None else 0,
            )
        return response

    @app.teardown_request
    def _forget(_exc: BaseException | None) -> None:
        tracing.clear()


def model_response(model: BaseModel, status: int = 200) -> Response:
    """A JSON response from a pydantic response model (datetimes as ISO 8601, not Flask's RFC 822)."""
    return Response(model.model_dump_json(), status=status, mimetype="application/json")
