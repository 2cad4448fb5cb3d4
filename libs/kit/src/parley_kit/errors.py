"""One error vocabulary for every service, rendered as problem+json or in the OpenAI / Anthropic shapes.

Flask is imported by the functions that render a Flask response, not here: the batch worker raises and reads these
errors but serves no HTTP, and loading Flask for them cost it ~20 MB.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from flask import Flask, Response
    from pydantic import ValidationError
    from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ParleyError(Exception):
    """Base of every error a Parley service answers with; `status` and `code` say what the client sees."""

    status = 500
    code = "internal_error"
    title = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.code = code or self.code
        self.param = param
        self.headers = headers or {}
        self.errors = errors


class BadRequest(ParleyError):
    """The request is malformed or fails validation."""

    status, code, title = 400, "invalid_request", "Bad Request"


class Unauthorized(ParleyError):
    """No valid credentials were presented."""

    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(ParleyError):
    """The caller is known but not allowed to do this."""

    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(ParleyError):
    """No such resource (or not one the caller may see)."""

    status, code, title = 404, "not_found", "Not Found"


class Conflict(ParleyError):
    """The request conflicts with the current state (duplicate, idempotency key reused with another body)."""

    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ParleyError):
    """The body is over the configured limit."""

    status, code, title = 413, "payload_too_large", "Payload Too Large"


class RateLimited(ParleyError):
    """Too many requests or tokens; `Retry-After` says when to come back."""

    status, code, title = 429, "rate_limited", "Too Many Requests"


class BudgetExceeded(ParleyError):
    """The spend limit for the period is reached (OpenAI answers quota errors with 429 as well)."""

    status, code, title = 429, "insufficient_quota", "Budget Exceeded"


class UpstreamError(ParleyError):
    """A service or provider behind this one answered with an error or garbage."""

    status, code, title = 502, "bad_gateway", "Bad Gateway"


class ServiceUnavailable(ParleyError):
    """A dependency is down or refusing connections."""

    status, code, title = 503, "service_unavailable", "Service Unavailable"


class GatewayTimeout(ParleyError):
    """A dependency did not answer in time."""

    status, code, title = 504, "timeout", "Gateway Timeout"


class ErrorShape(StrEnum):
    """How errors are rendered on a route."""

    PROBLEM = "problem"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def provider_api_shape(path: str) -> ErrorShape:
    """The error shape of the provider APIs the platform speaks: Anthropic's on `/v1/messages…`, OpenAI's on the rest
    of `/v1`, problem+json elsewhere (the gateway's and llm's routes alike)."""
    if path.startswith("/v1/messages"):
        return ErrorShape.ANTHROPIC
    if path.startswith("/v1/") or path == "/v1":
        return ErrorShape.OPENAI
    return ErrorShape.PROBLEM


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(shape: ErrorShape, error: ParleyError) -> dict[str, Any]:
    """The JSON body a client of that API expects for this error."""
    if shape is ErrorShape.OPENAI:
        if error.code == "insufficient_quota":
            kind = "insufficient_quota"
        else:
            kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
        return {"error": {"message": error.detail, "type": kind, "param": error.param, "code": error.code}}
    if shape is ErrorShape.ANTHROPIC:
        return {
            "type": "error",
            "error": {
                # A client error outside the table (405, 415, ...) is the client's fault, not Anthropic's api_error.
                "type": _ANTHROPIC_TYPES.get(
                    error.status, "api_error" if error.status >= 500 else "invalid_request_error"
                ),
                "message": error.detail,
            },
        }
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
    }
    if error.errors:
        body["errors"] = error.errors
    return body


def error_response(shape: ErrorShape, error: ParleyError) -> Response:
    """A complete Flask response for the error."""
    from flask import Response

    mimetype = "application/problem+json" if shape is ErrorShape.PROBLEM else "application/json"
    response = Response(orjson.dumps(error_body(shape, error)), status=error.status, mimetype=mimetype)
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def validation_error(exc: ValidationError) -> BadRequest:
    """A pydantic failure as a 400 that names the fields, never echoing the input values."""
    errors = [
        {"loc": ".".join(str(part) for part in item["loc"]), "msg": item["msg"], "type": item["type"]}
        for item in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0] if errors else {"loc": "", "msg": "invalid request"}
    detail = f"{first['loc']}: {first['msg']}" if first["loc"] else first["msg"]
    return BadRequest(detail, code="invalid_request", param=first["loc"] or None, errors=errors)


def register_error_handlers(app: Flask, shape_for_path: Callable[[str], ErrorShape]) -> None:
    """Answer every error in the shape of the route it happened on; never a traceback."""
    from flask import request
    from pydantic import ValidationError
    from werkzeug.exceptions import HTTPException

    def render(error: ParleyError) -> Response:
        return error_response(shape_for_path(request.path), error)

    @app.errorhandler(ParleyError)
    def _parley(error: ParleyError) -> Response:
        return render(error)

    @app.errorhandler(ValidationError)
    def _validation(error: ValidationError) -> Response:
        return render(validation_error(error))

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        mapped = ParleyError(error.description if (error.code or 500) < 500 else None)
        mapped.status = error.code or 500
        mapped.title = error.name
        mapped.code = error.name.lower().replace(" ", "_")
        response = render(mapped)
        if error.code == 405 and (allowed := getattr(error, "valid_methods", None)):
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        return render(from_unexpected(error, request.path))


def from_unexpected(error: Exception, path: str) -> ParleyError:
    """The answer to an exception no route turned into a ParleyError (logged here): a database fault the client or
    an outage explains, or a 500 with its traceback in the log, never in the answer."""
    if database_refused_value(error):
        # A value the database cannot hold (PostgreSQL text cannot carry NUL, numbers and dates have ranges) comes
        # from the request: the transaction rolled back, and the client gets a 400, not a 500 that reads as our bug.
        log.warning("database refused a value", extra={"url.path": path, "error.type": type(error).__name__})
        return BadRequest("a value in the request cannot be stored (text must not contain NUL characters)")
    if database_unavailable(error):
        log.warning("database unavailable", extra={"url.path": path, "error.type": type(error).__name__})
        return ServiceUnavailable("database unavailable, retry shortly", headers={"Retry-After": "1"})
    log.exception("unhandled error", extra={"url.path": path})
    return ParleyError()


def _database_errors() -> Any:
    """`sqlalchemy.exc` once this process has loaded SQLAlchemy, else None: then no error can be one of its, and a
    service without a database (the gateway) is spared loading it (~11 MB) just to say so."""
    return sys.modules.get("sqlalchemy.exc")


def database_refused_value(error: BaseException) -> bool:
    """Whether the database refused a value of the request (sqlalchemy's DataError)."""
    exc = _database_errors()
    return exc is not None and isinstance(error, exc.DataError)


def database_connection_lost(error: BaseException) -> bool:
    """Whether the database dropped the connection under a request (restart, failover, pg_terminate_backend): the
    transaction rolled back, so the client may retry; a 503, not a 500 that reads as our bug."""
    exc = _database_errors()
    return exc is not None and (
        isinstance(error, exc.DisconnectionError)
        or (isinstance(error, exc.DBAPIError) and error.connection_invalidated)
    )


# PostgreSQL states that mean the database cannot serve anyone right now: connection exceptions (class 08), a server
# shutting down or starting up (57P01-57P03), and no connection slot left (53300).
_UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")
# SQLite's equivalents: another writer holds the file, or the file cannot be opened.
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file")


def database_unavailable(error: BaseException) -> bool:
    """Whether the database could not serve the request now: it dropped the connection (above), could not be reached
    (an OperationalError with no server state: refused, reset), answered that it is shutting down, starting or out of
    connections, or the pool had no connection to lend in time. A 503 to retry, not a 500 that reads as our bug; any
    other OperationalError (a statement the server rejects, SQLite's "no such table") stays one."""
    exc = _database_errors()
    if exc is None:
        return False
    if database_connection_lost(error) or isinstance(error, exc.TimeoutError):
        return True
    if not isinstance(error, exc.OperationalError):
        return False
    original = error.orig
    state = getattr(original, "sqlstate", None)
    if state:
        return str(state).startswith(_UNAVAILABLE_STATES)
    if type(original).__module__ == "sqlite3":
        return str(original).startswith(_SQLITE_UNAVAILABLE)
    return True
