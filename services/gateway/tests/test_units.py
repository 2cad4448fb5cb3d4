"""Unit tests (no network): route table, header filtering, credential detection, key cache and its events."""

from __future__ import annotations

import datetime as dt
import io
import time

import pytest

from parley_gateway import routing
from parley_gateway.credentials import (
    CredentialKind,
    KeyCache,
    UserRevocations,
    classify,
    key_digest,
    presented_credential,
)
from parley_gateway.headers import client_response_headers, upstream_request_headers
from parley_gateway.proxy import read_body, stream_error_event, upstream_target, whole_events
from parley_gateway.revocation import apply_event
from parley_gateway.routing import Upstream
from parley_kit.amqp import Message
from parley_kit.errors import BadRequest, ErrorShape, PayloadTooLarge, Unauthorized
from parley_kit.testing import TokenMint


@pytest.mark.parametrize(
    ("path", "upstream", "shape"),
    [
        ("/v1/chat/completions", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/messages", Upstream.LLM, ErrorShape.ANTHROPIC),
        ("/v1/messages/count_tokens", Upstream.LLM, ErrorShape.ANTHROPIC),
        ("/v1/embeddings", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/models", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/models/gpt-4o", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/usage", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/usage/all", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/budgets/users/user_1", Upstream.LLM, ErrorShape.OPENAI),
        ("/v1/files", Upstream.JOBS, ErrorShape.OPENAI),
        ("/v1/files/file-1/content", Upstream.JOBS, ErrorShape.OPENAI),
        ("/v1/batches/batch_1/cancel", Upstream.JOBS, ErrorShape.OPENAI),
        ("/auth/token", Upstream.AUTH, ErrorShape.PROBLEM),
        ("/auth/api-keys/key_1", Upstream.AUTH, ErrorShape.PROBLEM),
        ("/.well-known/jwks.json", Upstream.AUTH, ErrorShape.PROBLEM),
    ],
)
def test_routes(path: str, upstream: Upstream, shape: ErrorShape) -> None:
    """Each documented prefix goes to its service, with the error shape of its API."""
    route = routing.match(path)
    assert route is not None
    assert (route.upstream, route.shape) == (upstream, shape)
    assert route.authenticate is (upstream is not Upstream.AUTH)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1",
        "/v1/",
        "/v1/unknown",
        "/v1/chat/completionsX",
        "/v1/filesystem",
        "/auth",
        "/auth/internal",
        "/auth/internal/key-exchange",
        "/auth/internal/act-as",
        "/auth/service-token",
        "/auth/service-token/",
        "/auth//internal/key-exchange",
        "/auth/x/../internal/key-exchange",
        "/v1/files/../../auth/internal/act-as",
        "/livez",
        "/metrics",
    ],
)
def test_not_proxied(path: str) -> None:
    """Unknown paths, auth's internal endpoints and paths with empty or dot segments are not proxied."""
    assert routing.match(path) is None


def environ(**headers: str) -> dict[str, str]:
    """A WSGI environ holding these headers (`x_api_key=` → HTTP_X_API_KEY)."""
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "REMOTE_ADDR": "10.0.0.9"}
    base.update({f"HTTP_{name.upper()}": value for name, value in headers.items()})
    return base


def test_request_headers_drop_hop_by_hop_identity_and_trace() -> None:
    """Only end-to-end, non-identity headers are forwarded; Host and trace headers are rebuilt."""
    env = environ(
        authorization="Bearer client",
        x_api_key="sk-pl-x",
        x_user_id="admin",
        x_parley_user="admin",
        x_forwarded_user="admin",
        x_auth_request_user="admin",
        x_remote_user="admin",
        connection="keep-alive, x-secret-hop",
        x_secret_hop="1",
        keep_alive="timeout=5",
        transfer_encoding="chunked",
        te="trailers",
        upgrade="h2c",
        proxy_authorization="Basic x",
        host="gateway.example",
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        x_request_id="client-id",
        accept="application/json",
        anthropic_version="2023-06-01",
        x_stainless_lang="python",
    )
    env["CONTENT_TYPE"] = "application/json"
    forwarded = upstream_request_headers(env, keep_authorization=False)
    assert forwarded == {
        "accept": "application/json",
        "anthropic-version": "2023-06-01",
        "x-stainless-lang": "python",
        "content-type": "application/json",
        "x-forwarded-for": "10.0.0.9",
        "x-forwarded-proto": "http",
    }


def test_request_headers_keep_authorization_for_auth_routes() -> None:
    """/auth/… authenticates the client itself: its Authorization passes, identity headers still do not."""
    forwarded = upstream_request_headers(
        environ(authorization="Bearer t", x_user_id="admin", x_forwarded_for="1.2.3.4"), keep_authorization=True
    )
    assert forwarded["authorization"] == "Bearer t"
    assert "x-user-id" not in forwarded
    assert forwarded["x-forwarded-for"] == "1.2.3.4, 10.0.0.9"


def test_response_headers() -> None:
    """Hop-by-hop, Server and Date are dropped; security headers, no-store and our request id are added."""
    headers = client_response_headers(
        [
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "gunicorn"),
            ("Date", "now"),
            ("x-request-id", "upstream"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ],
        "req_1",
    )
    names = [name.lower() for name, _ in headers]
    assert not {"connection", "transfer-encoding", "server", "date"} & set(names)
    assert names.count("set-cookie") == 2
    assert ("x-request-id", "req_1") in headers
    assert ("X-Content-Type-Options", "nosniff") in headers
    assert ("Referrer-Policy", "no-referrer") in headers
    assert ("Cache-Control", "no-store") in headers


def test_upstream_keeps_its_cache_control() -> None:
    """An upstream's own Cache-Control (e.g. SSE `no-cache`) is not overridden."""
    headers = client_response_headers([("Cache-Control", "no-cache")], None)
    assert [v for n, v in headers if n.lower() == "cache-control"] == ["no-cache"]


@pytest.mark.parametrize(
    ("credential", "kind"),
    [
        ("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1In0.c2ln", CredentialKind.JWT),
        ("sk-pl-" + "A" * 43, CredentialKind.API_KEY),
        ("sk-proj-abc", CredentialKind.UNKNOWN),
        ("a..b", CredentialKind.UNKNOWN),
        ("a.b", CredentialKind.UNKNOWN),
        ("a.b.c.d", CredentialKind.UNKNOWN),
        ("", CredentialKind.UNKNOWN),
    ],
)
def test_classify(credential: str, kind: CredentialKind) -> None:
    """Three non-empty dot-separated parts: a JWT; `sk-pl-…`: an API key; anything else: unknown."""
    assert classify(credential) is kind


def test_presented_credential() -> None:
    """Bearer wins over x-api-key; other schemes and nothing at all are 401."""
    assert presented_credential("Bearer abc", "other") == "abc"
    assert presented_credential("bearer  abc ", None) == "abc"
    assert presented_credential(None, "sk-pl-x") == "sk-pl-x"
    for authorization, api_key in (("Basic dXNlcjpwYXNz", None), ("Bearer ", None), (None, None), (None, " ")):
        with pytest.raises(Unauthorized):
            presented_credential(authorization, api_key)


def cache_with(entries: int = 2, **kwargs: float) -> tuple[KeyCache, list[bytes]]:
    """A cache holding `entries` tokens of user u1 (keys k0, k1, …)."""
    cache = KeyCache(ttl=kwargs.get("ttl", 300), refresh_margin=kwargs.get("margin", 30))
    digests = [key_digest(f"sk-pl-key{i}") for i in range(entries)]
    for i, digest in enumerate(digests):
        assert cache.put(
            digest,
            access_token=f"token-{i}",
            expires_in=kwargs.get("expires_in", 600),
            key_id=f"k{i}",
            user_id="u1",
            requested_at=time.monotonic(),
        )
    return cache, digests


def test_key_cache_hit_and_drop_by_key() -> None:
    """A key.revoked drops only that key's token."""
    cache, (first, second) = cache_with()
    assert cache.get(first) == "token-0"
    assert cache.drop_key("k0") == 1
    assert cache.get(first) is None
    assert cache.get(second) == "token-1"


def test_key_cache_drop_by_user() -> None:
    """A user event drops every token of that user's keys."""
    cache, digests = cache_with(3)
    assert cache.drop_user("u1") == 3
    assert all(cache.get(d) is None for d in digests)
    assert len(cache) == 0


def test_key_cache_expires_before_the_token() -> None:
    """Entries live until shortly before the token's expiry, never longer than the TTL."""
    cache, (digest,) = cache_with(1, expires_in=0.5, margin=30)
    assert cache.get(digest) == "token-0"
    deadline = time.monotonic() + 2
    while cache.get(digest) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get(digest) is None
    bounded = KeyCache(ttl=0.3, refresh_margin=30)
    assert bounded.put(b"x", access_token="t", expires_in=600, key_id=None, user_id=None, requested_at=time.monotonic())
    assert bounded.get(b"x") == "t"
    deadline = time.monotonic() + 2
    while bounded.get(b"x") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bounded.get(b"x") is None


def test_key_cache_refuses_a_token_revoked_while_in_flight() -> None:
    """An exchange that started before a revocation is not cached after it."""
    cache = KeyCache(ttl=300, refresh_margin=30)
    started = time.monotonic()
    cache.drop_key("k9")
    stored = cache.put(b"d", access_token="t", expires_in=600, key_id="k9", user_id="u9", requested_at=started)
    assert not stored
    assert cache.get(b"d") is None


def message(event_type: str, **data: str) -> Message:
    """An identity event envelope."""
    return Message("msg_1", event_type, "2030-01-01T00:00:00+00:00", None, data, 0, False)


def test_events_drop_cached_tokens() -> None:
    """key.revoked, user.disabled and password.changed each drop what they make stale; others are ignored."""
    cache, (first, second) = cache_with()
    users = UserRevocations()
    apply_event(message("key.created", key_id="k0", user_id="u1"), keys=cache, users=users)
    assert len(cache) == 2
    apply_event(message("key.revoked", key_id="k0", user_id="u1"), keys=cache, users=users)
    assert cache.get(first) is None and cache.get(second) == "token-1"
    apply_event(message("password.changed", user_id="u1"), keys=cache, users=users)
    assert len(cache) == 0
    cache, _ = cache_with()
    apply_event(message("user.role_changed", user_id="u1"), keys=cache, users=users)
    assert len(cache) == 0  # a key's cached token carries the old role


def test_a_role_change_refuses_the_users_tokens_with_another_role_whenever_issued(token_mint: TokenMint) -> None:
    """After a demotion, a token with the old role is refused even if signed after the event (a login that read the
    user before the change); one with the new role is accepted, even from the event's own second."""
    at = time.time() - 10
    users = UserRevocations()
    occurred = dt.datetime.fromtimestamp(at, dt.UTC).isoformat()
    demoted = Message("m", "user.role_changed", occurred, None, {"user_id": "u1", "role": "member"}, 0, False)
    apply_event(demoted, keys=KeyCache(ttl=300, refresh_margin=30), users=users)
    for issued in (int(at) - 1, int(at), int(at) + 5):
        assert users.refuses("u1", token_mint.mint("u1", roles=["admin"], iat=issued))
        assert not users.refuses("u1", token_mint.mint("u1", roles=["member"], iat=issued))
    assert not users.refuses("u2", token_mint.mint("u2", roles=["admin"], iat=int(at)))
    # an earlier change delivered late does not bring the old role back
    promoted_before = Message(
        "m", "user.role_changed", "2020-01-01T00:00:00+00:00", None, {"user_id": "u1", "role": "admin"}, 0, False
    )
    apply_event(promoted_before, keys=KeyCache(ttl=300, refresh_margin=30), users=users)
    assert users.refuses("u1", token_mint.mint("u1", roles=["admin"]))


def test_a_late_or_lesser_revocation_never_lowers_the_cut_off(token_mint: TokenMint) -> None:
    """A password change in the second of a disable, or an earlier event delivered late, keeps the later and wider
    cut-off: the disable's own second stays refused."""
    at = int(time.time()) - 10 + 0.6
    users = UserRevocations()
    users.revoke("u1", at, whole_second=True)
    users.revoke("u1", at)  # a password change in the same second
    users.revoke("u1", at - 5, whole_second=True)  # an older event, late
    assert users.refuses("u1", token_mint.mint("u1", iat=int(at)))
    assert not users.refuses("u1", token_mint.mint("u1", iat=int(at) + 1))


def test_read_body_limits() -> None:
    """Over the limit: 413 without reading; a lying or invalid Content-Length: 400; no body: None."""
    env = {"CONTENT_LENGTH": "11", "wsgi.input": io.BytesIO(b"hello world")}
    assert read_body(env, 11) == b"hello world"
    with pytest.raises(PayloadTooLarge):
        read_body({"CONTENT_LENGTH": "12", "wsgi.input": io.BytesIO(b"")}, 11)
    with pytest.raises(BadRequest):
        read_body({"CONTENT_LENGTH": "5", "wsgi.input": io.BytesIO(b"hi")}, 11)
    with pytest.raises(BadRequest):
        read_body({"CONTENT_LENGTH": "x", "wsgi.input": io.BytesIO(b"")}, 11)
    chunked = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": io.BytesIO(b"x" * 20)}
    with pytest.raises(PayloadTooLarge):
        read_body(chunked, 11)
    assert read_body({"wsgi.input": io.BytesIO(b"")}, 11) is None


def test_upstream_target_keeps_path_and_query() -> None:
    """The decoded path is re-quoted; the query string goes as sent."""
    assert upstream_target({"PATH_INFO": "/v1/files/a b", "QUERY_STRING": "limit=2&after=x%20y"}) == (
        "/v1/files/a%20b?limit=2&after=x%20y"
    )
    assert upstream_target({"PATH_INFO": "/v1/models"}) == "/v1/models"


def test_stream_error_events() -> None:
    """Mid-stream failures are announced the way each SDK reads them."""
    from parley_kit.errors import UpstreamError

    assert stream_error_event(ErrorShape.OPENAI, UpstreamError("x")).startswith(b'data: {"error":')
    assert stream_error_event(ErrorShape.ANTHROPIC, UpstreamError("x")).startswith(b"event: error\ndata: ")


def test_sse_relay_passes_whole_events_as_they_complete() -> None:
    pieces = [b"data: 1\n\nda", b"ta: 2", b"\n\n", b"data: 3\r\n\r\ndata: 4\n\ndata: par"]
    assert list(whole_events(pieces)) == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\r\n\r\ndata: 4\n\n", b"data: par"]
    assert list(whole_events([b"data: a\n\n", b"data: b\n\n"])) == [b"data: a\n\n", b"data: b\n\n"]
