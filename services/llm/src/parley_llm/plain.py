"""Plain inference calls without Flask: a WSGI layer in front of the llm app.

A non-streamed call in the route's own API family is what the gateway and the batch worker send most. This layer
answers it without Flask's request context, URL map, hooks and flask-openapi3's validation machinery: ~18% of
llm's CPU per call (bench/README.md, session 8). It runs the same steps as the Flask view (`views.admit`,
`views.plain_call`, an Idempotency-Key's `claim_or_replay` and `settle_claim`), writes the same metric and access
line, and settles the ledger at the same moment (the WSGI close).

Only admitted calls are answered here. Anything this layer would refuse before doing any work (not JSON, invalid, no
or a bad token, an unknown or forbidden model, a model of the other family) goes to Flask untouched, with the body it
read, and Flask answers it: client errors have one author. Once a call is admitted (a budget may be held), its errors
are rendered here by the kit's renderer, in the route's shape.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from pydantic import ValidationError
from werkzeug.wrappers import Response
from werkzeug.wsgi import ClosingIterator

from parley_kit import errors, logs, tracing
from parley_kit.errors import ErrorShape, ParleyError
from parley_kit.metrics import HTTP_SERVER_DURATION
from parley_kit.tokens import Identity, parse_bearer

from . import idempotency
from .catalog import Deployment, Provider
from .telemetry import CallRecord
from .views import INFERENCE_ROUTES, Inference, LlmState, admit, bridge_for, context, plain_call

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class PlainCalls:
    """WSGI app: admitted plain calls are answered here, every other request by `app` (Flask)."""

    def __init__(self, app: WSGIApp, state: LlmState) -> None:
        self._app = app
        self._state = state

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request."""
        path = environ.get("PATH_INFO", "")
        route = INFERENCE_ROUTES.get(path)
        if route is None or environ["REQUEST_METHOD"] != "POST" or not _usable_key(environ):
            return self._app(environ, start_response)
        started = time.perf_counter()
        data = _json_body(environ)
        if data is None:
            return self._app(environ, start_response)
        admitted = self._admit(route, environ, data)
        if admitted is None:
            environ["wsgi.input"] = io.BytesIO(data)  # Flask reads the body again, and answers
            return self._app(environ, start_response)
        identity, deployment, raw = admitted
        trace = tracing.start(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_X_REQUEST_ID"))
        try:
            return self._call(route, environ, start_response, identity, deployment, raw, data, started, trace)
        finally:
            tracing.clear()

    def _admit(
        self, route: Inference, environ: dict[str, Any], data: bytes
    ) -> tuple[Identity, Deployment, dict[str, Any]] | None:
        """The caller, the deployment and the body of a call this layer answers; None for Flask to answer."""
        token = parse_bearer(environ.get("HTTP_AUTHORIZATION", ""))
        if token is None:
            return None
        try:
            raw = orjson.loads(data)
            if not isinstance(raw, dict) or raw.get("stream"):
                return None
            route.body.model_validate(raw)
            identity = self._state.verifier.verify(token)
            deployment = admit(self._state.catalog, route, identity, raw)
        except (orjson.JSONDecodeError, ValidationError, ParleyError):
            return None
        if bridge_for(route, deployment) is not None:
            return None
        return identity, deployment, raw

    def _call(
        self,
        route: Inference,
        environ: dict[str, Any],
        start_response: StartResponse,
        identity: Identity,
        deployment: Deployment,
        raw: dict[str, Any],
        data: bytes,
        started: float,
        trace: tracing.TraceContext,
    ) -> Iterable[bytes]:
        state = self._state
        path = environ["PATH_INFO"]
        ctx = context(identity, deployment, route, raw, started=started, request_id=trace.request_id)
        key = environ.get("HTTP_IDEMPOTENCY_KEY") or None
        claimed: str | None = None  # the Idempotency-Key this request holds
        records: list[CallRecord] = []
        try:
            if key is not None:
                done = idempotency.claim_or_replay(
                    state.db,
                    user_id=identity.subject,
                    key=key,
                    fingerprint=idempotency.request_hash(path, raw),
                    wait=state.idempotency_wait,
                    stale_after=state.idempotency_stale_after,
                )
                if done is not None:
                    return self._respond(idempotency.replay(done), environ, start_response, started, trace)
                claimed = key
            state.ledger.reserve(ctx)
            beta = environ.get("HTTP_ANTHROPIC_BETA") if route.passes_beta else None
            answer = plain_call(state, route, ctx, raw, data, beta=beta, settle=records.append)
        except BaseException as exc:  # every failure is answered in the route's shape; a kill releases the key too
            if claimed is not None:
                idempotency.settle_claim(state.db, user_id=identity.subject, key=claimed, answer=None)
            if not isinstance(exc, Exception):
                raise
            error = exc if isinstance(exc, ParleyError) else errors.from_unexpected(exc, path)
            body = self._respond(errors.error_response(_shape(route), error), environ, start_response, started, trace)
        else:
            if claimed is not None:
                idempotency.settle_claim(state.db, user_id=identity.subject, key=claimed, answer=answer)
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(answer))),
                    ("x-request-id", trace.request_id),
                ],
            )
            self._observe(path, 200, started)
            body = [answer]

        def settle() -> None:
            for record in records:  # the call's one record, once the answer is out
                state.ledger.settle_after_answer(ctx, record, trace)

        return ClosingIterator(body, settle)

    def _respond(
        self,
        response: Response,
        environ: dict[str, Any],
        start_response: StartResponse,
        started: float,
        trace: tracing.TraceContext,
    ) -> Iterable[bytes]:
        """Send a ready response (an error, a replay) with the request id, observed like any answer."""
        response.headers["x-request-id"] = trace.request_id
        self._observe(environ["PATH_INFO"], response.status_code, started)
        return response(environ, start_response)

    @staticmethod
    def _observe(path: str, status: int, started: float) -> None:
        """The metric and access line the kit's Flask hooks write, by the same route template."""
        elapsed = time.perf_counter() - started
        HTTP_SERVER_DURATION.labels("POST", path, str(status)).observe(elapsed)
        logs.access("POST", path, status, int(elapsed * 1e9))


def _json_body(environ: dict[str, Any]) -> bytes | None:
    """The body of a JSON request of declared length (anything else is Flask's to answer)."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    length = environ.get("CONTENT_LENGTH", "")
    if mimetype != "application/json" or not length.isdigit():
        return None
    return environ["wsgi.input"].read(int(length))


def _usable_key(environ: dict[str, Any]) -> bool:
    """No Idempotency-Key, or one of an acceptable length (a longer one is Flask's 400)."""
    return len(environ.get("HTTP_IDEMPOTENCY_KEY", "")) <= idempotency.MAX_KEY_LENGTH


def _shape(route: Inference) -> ErrorShape:
    return ErrorShape.ANTHROPIC if route.family is Provider.ANTHROPIC else ErrorShape.OPENAI
