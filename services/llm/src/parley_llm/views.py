"""The OpenAI- and Anthropic-compatible routes: parse, route to a deployment, relay, shape the answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, after_this_request, g, request, stream_with_context
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from parley_kit import tracing
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

    @property
    def idempotency_stale_after(self) -> float:
        """How old a claim must be before another request takes it over (its holder died): the wait, plus a call."""
        return self.idempotency_wait + self.router.total_timeout

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
    stream: StrictBool = False  # as the providers: a string "false" is a 400, not a truthy stream flag
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
    stream: StrictBool = False  # as the providers: a string "false" is a 400, not a truthy stream flag


@dataclass(frozen=True, slots=True)
class Inference:
    """An inference route: its ledger name, the kind of model it needs, its API family and its provider path."""

    ledger_name: str  # the usage row's operation: chat | messages | embeddings
    kind: Operation
    family: Provider
    body: type[BaseModel]
    upstream_path: str
    output_limited: bool = True  # max_tokens is checked against the model's ceiling
    passes_beta: bool = False  # the anthropic-beta header goes on to the provider
    idempotent: bool = True  # an Idempotency-Key makes it run once (embeddings: not covered)


CHAT = Inference("chat", Operation.CHAT, Provider.OPENAI, ChatCompletionRequest, "/chat/completions")
MESSAGES = Inference("messages", Operation.CHAT, Provider.ANTHROPIC, MessagesRequest, "/v1/messages", passes_beta=True)
EMBEDDINGS = Inference(
    "embeddings",
    Operation.EMBEDDINGS,
    Provider.OPENAI,
    EmbeddingRequest,
    "/embeddings",
    output_limited=False,
    idempotent=False,
)
INFERENCE_ROUTES = {"/v1/chat/completions": CHAT, "/v1/messages": MESSAGES, "/v1/embeddings": EMBEDDINGS}


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
        """Settle once the answer has been sent (WSGI close): off this client's clock, and off the next request's on
        the same connection."""

        def settle(record: CallRecord) -> None:
            @after_this_request
            def _on_close(response: Response) -> Response:
                trace = tracing.current()  # the close callback runs after the request's trace is cleared
                response.call_on_close(lambda: state.ledger.settle_after_answer(ctx, record, trace))
                return response

        return settle

    def stream_response(events: Any) -> Response:
        return Response(stream_with_context(events), mimetype="text/event-stream", headers=relay.SSE_HEADERS)

    def relayed(upstream: relay.ForwardResponse, ctx: relay.CallContext, meter: relay.StreamMeter) -> Response:
        return stream_response(
            relay.RelayedStream(upstream, ctx, meter, state.ledger.settle, total_timeout=state.router.total_timeout)
        )

    def translated(bridge: translate.Bridge, ctx: relay.CallContext, raw: dict[str, Any]) -> Response:
        """A model of the other API family: the request, the answer and each stream event are translated."""
        content = bridge.request(raw, model=ctx.deployment.upstream_model)
        # Reserve only once the request is known to be translatable: a 400 here must not hold budget.
        state.ledger.reserve(ctx)
        if not raw.get("stream"):
            answer = relay.complete(
                state.router,
                ctx,
                path=bridge.path,
                content=content,
                settle=deferred_settle(ctx),
                convert=bridge.response,
            )
            return Response(answer, mimetype="application/json")
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router, ctx, record, path=bridge.path, content=content, settle=state.ledger.settle
        )
        return relayed(upstream, ctx, bridge.stream_meter(record, raw, redact=state.upstreams.redact))

    def begin(route: Inference) -> tuple[relay.CallContext, dict[str, Any], translate.Bridge | None]:
        """The checked call (404/403/400 before any reservation), its raw body and the bridge it needs, if any."""
        raw = request.get_json()
        if not isinstance(raw, dict):  # a JSON string holding an object passes the body model's validation
            raise BadRequest("the request body must be a JSON object", code="invalid_request")
        deployment = admit(state.catalog, route, g.identity, raw)
        trace = tracing.current()
        ctx = context(
            g.identity,
            deployment,
            route,
            raw,
            started=g.get("parley_started") or time.perf_counter(),
            request_id=trace.request_id if trace else "",
        )
        return ctx, raw, bridge_for(route, deployment)

    def plain(route: Inference, ctx: relay.CallContext, raw: dict[str, Any]) -> Response:
        beta = request.headers.get("anthropic-beta") if route.passes_beta else None
        answer = plain_call(state, route, ctx, raw, request.get_data(), beta=beta, settle=deferred_settle(ctx))
        return Response(answer, mimetype="application/json")

    once = idempotency.idempotent(state.db, wait=state.idempotency_wait, stale_after=state.idempotency_stale_after)

    @bp.post("/chat/completions", responses={200: ProviderAnswer, **INFERENCE_ERRORS})
    @once
    def chat_completions(body: ChatCompletionRequest) -> Response:
        """Create a chat completion (OpenAI format), streamed or not."""
        ctx, raw, bridge = begin(CHAT)
        if bridge is not None:
            return translated(bridge, ctx, raw)
        state.ledger.reserve(ctx)
        if not body.stream:
            return plain(CHAT, ctx, raw)
        options = raw.get("stream_options") or {}
        # Always ask for the usage chunk (the ledger needs it); the meter drops it if the client did not ask.
        upstream_body = {
            **raw,
            "model": ctx.deployment.upstream_model,
            "stream_options": {**options, "include_usage": True},
        }
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router,
            ctx,
            record,
            path=CHAT.upstream_path,
            content=orjson.dumps(upstream_body),
            settle=state.ledger.settle,
        )
        return relayed(
            upstream, ctx, relay.OpenAIStreamMeter(record, client_wants_usage=bool(options.get("include_usage")))
        )

    @bp.post("/embeddings", responses={200: ProviderAnswer, **EMBEDDING_ERRORS})
    def embeddings(body: EmbeddingRequest) -> Response:
        """Create embeddings (OpenAI format)."""
        ctx, raw, _ = begin(EMBEDDINGS)
        state.ledger.reserve(ctx)
        return plain(EMBEDDINGS, ctx, raw)

    @bp.post("/messages", responses={200: ProviderAnswer, **INFERENCE_ERRORS})
    @once
    def messages(body: MessagesRequest) -> Response:
        """Create a message (Anthropic format), streamed or not."""
        ctx, raw, bridge = begin(MESSAGES)
        if bridge is not None:
            return translated(bridge, ctx, raw)
        state.ledger.reserve(ctx)
        if not body.stream:
            return plain(MESSAGES, ctx, raw)
        record = ctx.new_record(streamed=True)
        upstream = relay.start_stream(
            state.router,
            ctx,
            record,
            path=MESSAGES.upstream_path,
            content=passed_on(ctx.deployment, raw, request.get_data()),
            settle=state.ledger.settle,
            headers=_beta_headers(request.headers.get("anthropic-beta")),
        )
        return relayed(upstream, ctx, relay.AnthropicStreamMeter(record))

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


def admit(catalog: Catalog, route: Inference, identity: Identity, raw: dict[str, Any]) -> Deployment:
    """The deployment for the request's model, checked for this caller and route (404 / 403 / 400)."""
    deployment = resolve(catalog, identity, raw["model"], route.kind)
    if route.output_limited:
        check_output_limit(deployment, raw)
    return deployment


def bridge_for(route: Inference, deployment: Deployment) -> translate.Bridge | None:
    """The translation a chat model of the other API family needs (None: the body goes on as it is)."""
    return translate.bridge(route.family, deployment.provider) if route.kind is Operation.CHAT else None


def plain_call(
    state: LlmState,
    route: Inference,
    ctx: relay.CallContext,
    raw: dict[str, Any],
    data: bytes,
    *,
    beta: str | None,
    settle: Callable[[CallRecord], None],
) -> bytes:
    """A non-streamed call in the route's own API family: the client's bytes go on unchanged unless the model is
    renamed; the provider's answer comes back as it is."""
    return relay.complete(
        state.router,
        ctx,
        path=route.upstream_path,
        content=passed_on(ctx.deployment, raw, data),
        settle=settle,
        headers=_beta_headers(beta),
    )


def context(
    identity: Identity,
    deployment: Deployment,
    route: Inference,
    body: dict[str, Any],
    *,
    started: float,
    request_id: str,
) -> relay.CallContext:
    """The ledger context of this request."""
    return relay.CallContext(
        request_id=request_id,
        user_id=identity.subject,
        key_id=identity.key_id,
        deployment=deployment,
        operation=route.ledger_name,
        body=body,
        started=started,
    )


def passed_on(deployment: Deployment, raw: dict[str, Any], data: bytes) -> bytes:
    """The body for the provider: the client's bytes as sent, or re-encoded with the public model name replaced by
    the provider's."""
    return (
        data if deployment.upstream_model == raw["model"] else orjson.dumps({**raw, "model": deployment.upstream_model})
    )


def _beta_headers(beta: str | None) -> dict[str, str] | None:
    """The anthropic-beta header passed on to the provider, when the client sent one."""
    return {"anthropic-beta": beta} if beta else None
