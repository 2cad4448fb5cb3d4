"""OWASP API7 (server-side request forgery): no URL a client supplies ever makes the platform open a connection.
A real listening socket of our own (the canary) stands where the URLs point; after image parts, document sources,
URL-ish body fields, model names, batch ids, batch line URLs, batch items that run, JWT key URLs and Host /
X-Forwarded-* headers, it has recorded no connection at all."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

if TYPE_CHECKING:
    from conftest import Canary, Http, RunningPlatform

GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def canary_urls(canary: Canary) -> list[str]:
    """The same listener named every way a client might: IP, localhost, a path, credentials, a redirect-ish query."""
    return [
        f"{canary.url}/image.png",
        f"http://localhost:{canary.port}/image.png",
        f"http://user:pass@127.0.0.1:{canary.port}/x",
        f"https://127.0.0.1:{canary.port}/x",
        f"http://127.0.0.1:{canary.port}/?next=http://169.254.169.254/latest/meta-data/",
    ]


def test_the_canary_records_connections(canary: Canary) -> None:
    """The canary really listens and records (so an empty record below means nobody came)."""
    control = socket.create_connection(("127.0.0.1", canary.port), timeout=5)
    control.sendall(b"GET /control HTTP/1.1\r\nHost: canary\r\n\r\n")
    control.recv(100)
    control.close()
    deadline = time.monotonic() + 10
    while not any(b"/control" in first for first in canary.recorded()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(b"/control" in first for first in canary.recorded())
    canary.connections.clear()


def inference_attacks(canary: Canary) -> list[tuple[str, dict[str, Any]]]:
    """Chat, messages and embeddings bodies carrying the canary's URLs, to both providers (translated or not)."""
    attacks: list[tuple[str, dict[str, Any]]] = []
    for url in [*canary_urls(canary), "file:///etc/passwd", f"gopher://127.0.0.1:{canary.port}/_x"]:
        for model in (GPT, CLAUDE):
            image = {"type": "image_url", "image_url": {"url": url}}
            attacks.append(
                (
                    "/v1/chat/completions",
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, image]}],
                        "base_url": url,
                        "api_base": url,
                        "callback_url": url,
                        "webhook_url": url,
                    },
                )
            )
            source = {"type": "url", "url": url}
            attacks.append(
                (
                    "/v1/messages",
                    {
                        "model": model,
                        "max_tokens": 8,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image", "source": source},
                                    {"type": "document", "source": source},
                                    {"type": "text", "text": url},
                                ],
                            }
                        ],
                        "mcp_servers": [{"type": "url", "url": url, "name": "x"}],
                    },
                )
            )
        attacks.append(("/v1/embeddings", {"model": "text-embedding-3-small", "input": url, "base_url": url}))
        attacks.append(("/v1/chat/completions", {"model": url, "messages": [{"role": "user", "content": "hi"}]}))
    return attacks


def test_urls_in_inference_bodies_are_never_fetched(platform: RunningPlatform, http: Http, canary: Canary) -> None:
    """Image and document URLs, URL-ish fields and URL model names: each answered (2xx or a clean 4xx) and the
    canary saw nothing."""
    client = platform.new_client()
    answered = 0
    for path, body in inference_attacks(canary):
        answer = http.post(f"{platform.gateway}{path}", json=body, headers=bearer(client.api_key))
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:300])
        answered += 1
    assert answered >= 40
    assert canary.recorded() == []


def batch_line(custom_id: str, url: str, body: dict[str, Any]) -> bytes:
    """One JSONL request line."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


def upload(http: Http, gateway: str, key: str, content: bytes, filename: str = "in.jsonl") -> requests.Response:
    """POST /v1/files purpose=batch."""
    return http.post(
        f"{gateway}/v1/files",
        data={"purpose": "batch"},
        files={"file": (filename, io.BytesIO(content))},
        headers=bearer(key),
    )


def test_urls_in_batches_are_never_fetched(platform: RunningPlatform, http: Http, canary: Canary) -> None:
    """A batch id shaped like a URL, line URLs pointing at other hosts, and a batch whose items carry the canary's
    image URL and run to the end: refusals are 4xx, the batch completes, and the canary saw nothing."""
    client = platform.new_client()
    key = bearer(client.api_key)
    batch = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
    for url in canary_urls(canary):
        answer = http.post(f"{platform.gateway}/v1/batches", json={**batch, "input_file_id": url}, headers=key)
        assert answer.status_code in (400, 404), answer.text
        body = {"model": GPT, "messages": [{"role": "user", "content": "hi"}]}
        for line_url in (url, f"{url}/v1/chat/completions", f"//127.0.0.1:{canary.port}/v1/chat/completions"):
            refused = upload(http, platform.gateway, client.api_key, batch_line("1", line_url, body))
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_url", refused.text
    image = {"type": "image_url", "image_url": {"url": f"{canary.url}/batch.png"}}
    lines = b"".join(
        batch_line(
            f"item-{model}",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
        )
        for model in (GPT, CLAUDE)
    )
    uploaded = upload(http, platform.gateway, client.api_key, lines, filename=f"{canary.url}/name.jsonl")
    assert uploaded.status_code == 200, uploaded.text
    created = http.post(
        f"{platform.gateway}/v1/batches",
        json={**batch, "input_file_id": uploaded.json()["id"], "metadata": {"callback_url": canary.url}},
        headers=key,
    )
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 120
    status = created.json()["status"]
    while status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = http.get(f"{platform.gateway}/v1/batches/{created.json()['id']}", headers=key).json()["status"]
    assert status == "completed"
    assert canary.recorded() == []


def test_headers_naming_other_hosts_are_never_followed(platform: RunningPlatform, http: Http, canary: Canary) -> None:
    """Host, X-Forwarded-Host, Forwarded, X-Original-URL and friends naming the canary, on proxied routes, on
    /docs (which fetches from the services) and on the probes; then an absolute-form request line: the gateway
    answers for itself and the canary saw nothing."""
    client = platform.new_client()
    here = f"127.0.0.1:{canary.port}"
    spoofed = {
        "X-Forwarded-Host": here,
        "X-Forwarded-Server": here,
        "X-Host": here,
        "Forwarded": f"for=1.2.3.4;host={here};proto=http",
        "X-Original-URL": f"{canary.url}/v1/models",
        "X-Rewrite-URL": f"{canary.url}/v1/models",
        "X-Forwarded-Prefix": canary.url,
        "X-Forwarded-Proto": "http",
        "X-Real-IP": "127.0.0.1",
    }
    paths = ("/v1/models", "/auth/me", "/docs/auth.json", "/docs", "/readyz", "/.well-known/jwks.json")
    for path in paths:
        for headers in ({**spoofed, "Host": here}, spoofed):
            credential = client.access_token if path.startswith("/auth") else client.api_key
            answer = http.get(f"{platform.gateway}{path}", headers={**headers, **bearer(credential)})
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    target = urlparse(platform.gateway)
    with socket.create_connection((target.hostname, target.port), timeout=30) as raw:
        raw.sendall(
            f"GET {canary.url}/v1/models HTTP/1.1\r\nHost: {here}\r\nAuthorization: Bearer {client.api_key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status in (200, 400, 404), reply[:300]
    assert canary.recorded() == []


def test_jwt_key_urls_are_never_fetched(platform: RunningPlatform, http: Http, canary: Canary) -> None:
    """Tokens whose header points the verifier at the canary (jku, x5u) or embeds the attacker's key (jwk) are 401
    at the gateway and at each service, and nobody fetched the canary."""
    attacker = Ed25519PrivateKey.generate()
    public_jwk = json.loads(OKPAlgorithm.to_jwk(attacker.public_key()))
    now = int(time.time())
    claims = {
        "iss": "parley-auth",
        "aud": "parley",
        "sub": "attacker",
        "iat": now,
        "exp": now + 600,
        "jti": "j",
        "typ": "access",
        "roles": ["admin"],
    }
    headers_list = [
        {"alg": "EdDSA", "kid": "attacker", "jku": f"{canary.url}/jwks.json"},
        {"alg": "EdDSA", "kid": "attacker", "x5u": f"{canary.url}/cert.pem"},
        {"alg": "EdDSA", "kid": "attacker", "jwk": {**public_jwk, "kid": "attacker"}},
        {"alg": "EdDSA", "kid": f"{canary.url}/jwks.json"},
    ]
    for header in headers_list:
        token = sign(header, claims, attacker)
        for base, path in (
            (platform.gateway, "/v1/usage/all"),
            (platform.gateway, "/v1/files"),
            (platform.gateway, "/auth/users"),
            (platform.url("llm"), "/v1/usage/all"),
            (platform.url("jobs"), "/v1/files"),
            (platform.url("auth"), "/auth/users"),
        ):
            answer = http.get(f"{base}{path}", headers=bearer(token))
            assert answer.status_code == 401, (header, base, path, answer.text)
    assert canary.recorded() == []


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any], claims: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """A compact JWS with exactly this header (PyJWT would rewrite some header fields)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
