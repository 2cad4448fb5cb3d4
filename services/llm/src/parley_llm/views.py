"""The OpenAI- and Anthropic-compatible routes: parse, route to a deployment, relay, shape the answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, after_this_request, g, request, stream_with_context
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel, ConfigDict, Field

from parley_kit import background, tracing
from parley_kit.db import Database
from parley_kit.errors import BadRequest, Forbidden, NotFound
from parley_kit.openapi import error_responses
from parley_kit.tokens import Identity, TokenVerifier, authenticate

from . import idempotency, relay, translate
from .catalog import Catalog, Deployment, Operation, Provider
from .routing import Router
from .telemetry import CallRecord
from .upstream import Upstreams


@dataclass(frozen=True, slots=True)
class LlmState:
    """What the routes need, built once per worker by the factory."""

    catalog: Catalog
    db: Database
    verifier: TokenVerifier
    upstreams: Upstreams
    router: Router
    ledger: relay.Ledger
    log_prompts: bool = False
    idempotency_wait: float = 60.0

    def close(self) -> None:
        """Release pooled database and provider connections."""
        self.upstreams.close()
        self.db.dispose()


# ----- request and response bodies (lenient: unknown fields pass through to the provider) ----------------------

# Messages per request (OpenAI's own ceiling): a bound on the work one request can ask for, beside the body size.
MAX_MESSAGES = 2048


class ChatCompletionRequest(BaseModel):
    """OpenAI `POST /v1/chat/completions`; every other field (tools, response_format, stop, …) is passed on."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[Any]


class MessagesRequest(BaseModel):
    """Anthropic `POST /v1/messages`; every other field (system, tools, stop_sequences, …) is passed on."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(ge=1)
    stream: bool = False


class ProviderAnswer(BaseModel):
    """The provider's own response object, forwarded unchanged (`stream: true`: its server-sent events)."""

    model_config = ConfigDict(
        extra="allow", openapi_extra={"content": {"text/event-stream": {"schema": {"type": "string"}}}}
    )


# What an inference route answers besides 200 and the kit's 400/401/403: an unknown model, an Idempotency-Key
# reused with another body or still running, a budget or provider limit, and the provider failing or timing out.
INFERENCE_ERRORS = error_responses(404, 409, 429, 502, 503, 504)
EMBEDDING_ERRORS = error_responses(404, 429, 502, 503, 504)


class ModelCard(BaseModel):
    """One model in OpenAI's list shape."""

    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: str = "list"
    data: list[ModelCard]


# ----- routes ---------------------------------------------------------------------------------------------------


def register_routes(app: OpenAPI, state: LlmState) -> None:
    """Mount the `/v1` routes; every one needs a verified bearer token."""
    bp = APIBlueprint("llm", __name__, url_prefix="/v1", abp_tags=[Tag(name="llm")], abp_security=[{"bearer": []}])

    @bp.before_request
    def _authenticate() -> None:
        g.identity = authenticate(request, state.verifier)

    def deferred_settle(ctx: relay.CallContext) -> Callable[[CallRecord], None]:
        """Settle once the answer has been sent (WSGI close), detached: the ledger write is off this client's clock,
        and off the next request's on the same connection."""

        def settle(record: CallRecord) -> None:
            @after_this_request
            def _on_close(response: Response) -> Response:
                context = tracing.current()  # the close callback runs after the request's trace is cleared

                def settle_in_trace() -> None:
                    with tracing.use(context):
                        state.ledger.settle(ctx, record)

                response.call_on_close(lambda: background.run_detached(settle_in_trace))
                return response

        return settle

    def stream_response(events: Any) -> Response:
        return Response(stream_with_context(events), mimetype="text/event-stream", headers=relay.SSE_HEADERS)

    def translated(bridge: translate.Bridge, ctx: relay.CallContext, raw: dict[str, Any]) -> Response:
        """A model of the other API family: the request, the answer and each stream event are translated."""
        content = bridge.request(raw, model=ctx.deployment.upstream_model)
        # Reserve only once the request is known to be translatable: a 400 here must not hold budget.
        state.ledger.reserve(ctx)
        if not raw.get("stream"):
            answer = relay.complete(state.router, ctx, path=bridge.path, content=content, settle=deferred_settle(ctx))
            return Response(bridge.response(answer), mimetype="application/json")
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router, ctx, record, path=bridge.path, content=content, settle=state.ledger.settle
        )
        meter = bridge.stream_meter(record, raw, redact=state.upstreams.redact)
        return stream_response(
            relay.RelayedStream(upstream, ctx, meter, state.ledger.settle, total_timeout=state.router.total_timeout)
        )

    once = idempotency.idempotent(
        state.db, wait=state.idempotency_wait, stale_after=state.idempotency_wait + state.router.total_timeout
    )

    @bp.post("/chat/completions", responses={200: ProviderAnswer, **INFERENCE_ERRORS})
    @once
    def chat_completions(body: ChatCompletionRequest) -> Response:
        """Create a chat completion (OpenAI format), streamed or not."""
        deployment = resolve(state.catalog, g.identity, body.model, Operation.CHAT)
        raw: dict[str, Any] = request.get_json()
        check_output_limit(deployment, raw)
        ctx = context(g.identity, deployment, "chat", raw)
        if (bridge := translate.bridge(Provider.OPENAI, deployment.provider)) is not None:
            return translated(bridge, ctx, raw)
        state.ledger.reserve(ctx)
        if not body.stream:
            content = request.get_data() if deployment.upstream_model == body.model else _rename(raw, deployment)
            answer = relay.complete(
                state.router, ctx, path="/chat/completions", content=content, settle=deferred_settle(ctx)
            )
            return Response(answer, mimetype="application/json")
        options = raw.get("stream_options") or {}
        # Always ask for the usage chunk (the ledger needs it); the meter drops it if the client did not ask.
        upstream_body = {
            **raw,
            "model": deployment.upstream_model,
            "stream_options": {**options, "include_usage": True},
        }
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router,
            ctx,
            record,
            path="/chat/completions",
            content=orjson.dumps(upstream_body),
            settle=state.ledger.settle,
        )
        meter = relay.OpenAIStreamMeter(record, client_wants_usage=bool(options.get("include_usage")))
        return stream_response(
            relay.RelayedStream(upstream, ctx, meter, state.ledger.settle, total_timeout=state.router.total_timeout)
        )

    @bp.post("/embeddings", responses={200: ProviderAnswer, **EMBEDDING_ERRORS})
    def embeddings(body: EmbeddingRequest) -> Response:
        """Create embeddings (OpenAI format)."""
        deployment = resolve(state.catalog, g.identity, body.model, Operation.EMBEDDINGS)
        raw: dict[str, Any] = request.get_json()
        ctx = context(g.identity, deployment, "embeddings", raw)
        state.ledger.reserve(ctx)
        content = request.get_data() if deployment.upstream_model == body.model else _rename(raw, deployment)
        answer = relay.complete(state.router, ctx, path="/embeddings", content=content, settle=deferred_settle(ctx))
        return Response(answer, mimetype="application/json")

    @bp.post("/messages", responses={200: ProviderAnswer, **INFERENCE_ERRORS})
    @once
    def messages(body: MessagesRequest) -> Response:
        """Create a message (Anthropic format), streamed or not."""
        deployment = resolve(state.catalog, g.identity, body.model, Operation.CHAT)
        raw: dict[str, Any] = request.get_json()
        check_output_limit(deployment, raw)
        ctx = context(g.identity, deployment, "messages", raw)
        if (bridge := translate.bridge(Provider.ANTHROPIC, deployment.provider)) is not None:
            return translated(bridge, ctx, raw)
        state.ledger.reserve(ctx)
        beta = request.headers.get("anthropic-beta")
        headers = {"anthropic-beta": beta} if beta else None
        content = request.get_data() if deployment.upstream_model == body.model else _rename(raw, deployment)
        if not body.stream:
            answer = relay.complete(
                state.router, ctx, path="/v1/messages", content=content, settle=deferred_settle(ctx), headers=headers
            )
            return Response(answer, mimetype="application/json")
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router,
            ctx,
            record,
            path="/v1/messages",
            content=content,
            settle=state.ledger.settle,
            headers=headers,
        )
        meter = relay.AnthropicStreamMeter(record)
        return stream_response(
            relay.RelayedStream(upstream, ctx, meter, state.ledger.settle, total_timeout=state.router.total_timeout)
        )

    @bp.get("/models", responses={200: ModelList})
    def list_models() -> Response:
        """The models this caller may use, in OpenAI's list shape."""
        allowed = g.identity.models
        data = [
            {"id": name, "object": "model", "created": d.created, "owned_by": d.provider.value}
            for name, d in state.catalog.models.items()
            if allowed is None or name in allowed
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), mimetype="application/json")

    app.register_api(bp)


def resolve(catalog: Catalog, identity: Identity, model: str, operation: Operation) -> Deployment:
    """The deployment for a public model name the caller may use for this operation (404 / 403 / 400 otherwise)."""
    deployment = catalog.get(model)
    if deployment is None:
        raise NotFound(
            # Not quoted back: a client pasting a key into `model` must not see it in an error (or its logs).
            "The requested model does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if identity.models is not None and model not in identity.models:
        raise Forbidden(f"this key may not use the model {model!r}", code="model_not_allowed", param="model")
    if deployment.operation is not operation:
        raise BadRequest(
            f"the model {model!r} does not support {operation.value}", code="model_not_supported", param="model"
        )
    return deployment


def check_output_limit(deployment: Deployment, body: dict[str, Any]) -> None:
    """400 when the request asks for more output tokens than the model can give (before any reservation or call)."""
    ceiling = deployment.max_output_tokens
    if ceiling is None:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        asked = body.get(field)
        if isinstance(asked, int) and asked > ceiling:
            raise BadRequest(
                f"{field} is too large: this model supports at most {ceiling} output tokens",
                code="invalid_value",
                param=field,
            )


def context(identity: Identity, deployment: Deployment, operation: str, body: dict[str, Any]) -> relay.CallContext:
    """The ledger context of this request."""
    trace = tracing.current()
    return relay.CallContext(
        request_id=trace.request_id if trace else "",
        user_id=identity.subject,
        key_id=identity.key_id,
        deployment=deployment,
        operation=operation,
        body=body,
        started=g.get("parley_started") or time.perf_counter(),
    )


def _rename(raw: dict[str, Any], deployment: Deployment) -> bytes:
    """The request body with the public model name replaced by the provider's."""
    return orjson.dumps({**raw, "model": deployment.upstream_model})
