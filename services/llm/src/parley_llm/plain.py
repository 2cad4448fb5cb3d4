"""Plain inference calls without Flask: a WSGI layer in front of the llm app.

A non-streamed call in the route's own API family is what the gateway and the batch worker send most. This layer
answers it without Flask's request context, URL map, hooks and flask-openapi3's validation machinery: with the
settlement done in the close itself, a third of llm's CPU per call (bench/README.md, session 8). It runs the same
steps as the Flask view (`views.admit`, `views.plain_call`, an Idempotency-Key's `claim_or_replay` and
`settle_claim`), writes the same metric and access line, and settles the ledger at the same moment (the WSGI close).

Only admitted calls are answered here. Anything this layer would refuse before doing any work (not JSON, invalid, no
or a bad token, an unknown or forbidden model, a model of the other family, a stream) goes to Flask untouched, with
the body it read, and Flask answers it: client errors have one author. The price: such a request is parsed, and a
bad token verified, twice (the verifier caches only what it accepts). Once a call is admitted (a budget may be
held), its errors are rendered here by the kit's renderer, in the route's shape.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
from werkzeug.wrappers import Response
from werkzeug.wsgi import ClosingIterator

from parley_kit import errors, logs, metrics, tracing
from parley_kit.errors import ParleyError
from parley_kit.tokens import Identity, parse_bearer

from . import idempotency
from .catalog import Deployment
from .telemetry import CallRecord
from .views import INFERENCE_ROUTES, Inference, LlmState, admit, bridge_for, context, plain_call

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication


class PlainCalls:
    """WSGI app: admitted plain calls are answered here, every other request by `app` (Flask)."""

    def __init__(self, app: WSGIApplication, state: LlmState) -> None:
        self._app = app
        self._state = state

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request."""
        route = INFERENCE_ROUTES.get(environ.get("PATH_INFO", ""))
        if (
            route is None
            or environ["REQUEST_METHOD"] != "POST"
            or len(_idempotency_key(route, environ)) > idempotency.MAX_KEY_LENGTH
        ):
            return self._app(environ, start_response)  # a key too long is Flask's 400
        started = time.perf_counter()
        data = _json_body(environ)
        if data is None:
            return self._app(environ, start_response)
        # Begun before the token is verified, as Flask's hooks do: a key fetch from auth carries the trace.
        trace = tracing.start(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_X_REQUEST_ID"))
        try:
            admitted = self._admit(route, environ, data)
        except BaseException:
            tracing.clear()
            raise
        if admitted is None:
            tracing.clear()  # Flask begins its own (and a stream it answers keeps it while it runs)
            environ["wsgi.input"] = io.BytesIO(data)  # Flask reads the body again, and answers
            return self._app(environ, start_response)
        identity, deployment, raw = admitted
        try:
            return self._call(route, environ, start_response, identity, deployment, raw, data, started, trace)
        finally:
            tracing.clear()

    def _admit(
        self, route: Inference, environ: dict[str, Any], data: bytes
    ) -> tuple[Identity, Deployment, dict[str, Any]] | None:
        """The caller, the deployment and the body of a call this layer answers; None for Flask to answer (every
        refusal, and anything unexpected: Flask then answers it in the route's shape, and logs it)."""
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
        except Exception:  # noqa: BLE001 - refused here means answered by Flask
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
        key = _idempotency_key(route, environ) or None
        claimed: str | None = None  # the Idempotency-Key this request holds
        records: list[CallRecord] = []

        def settle() -> None:
            for record in records:  # the call's one record, once the answer is out
                state.ledger.settle_after_answer(ctx, record, trace)

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
            answer_error = errors.error_response(errors.provider_api_shape(path), error)
            try:
                body = self._respond(answer_error, environ, start_response, started, trace)
            except BaseException:
                settle()
                raise
        else:
            if claimed is not None:
                idempotency.settle_claim(state.db, user_id=identity.subject, key=claimed, answer=answer)
            try:
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(answer))),
                        ("x-request-id", trace.request_id),
                    ],
                )
                self._observe(path, 200, started)
            except BaseException:
                settle()  # never answered: still charged, and a held budget released
                raise
            body = [answer]
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
        metrics.observe_request("POST", path, status, elapsed)
        logs.access("POST", path, status, int(elapsed * 1e9))


def _json_body(environ: dict[str, Any]) -> bytes | None:
    """The body of a JSON request of declared length (anything else is Flask's to answer)."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    length = environ.get("CONTENT_LENGTH", "")
    if mimetype != "application/json" or not (length.isascii() and length.isdigit()):
        return None
    return environ["wsgi.input"].read(int(length))


def _idempotency_key(route: Inference, environ: dict[str, Any]) -> str:
    """The request's Idempotency-Key on a route it applies to ("" otherwise: embeddings ignore it, as in Flask)."""
    return environ.get("HTTP_IDEMPOTENCY_KEY", "") if route.idempotent else ""
