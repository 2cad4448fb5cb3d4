"""The published documents themselves: what the fuzzer checks responses against must state the errors truly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import requests

if TYPE_CHECKING:
    from conftest import RunningPlatform

    from .conftest import Credentials

# Each route's error shape, as the services render it (parley_kit.errors): media type and schema name.
PROBLEM = ("application/problem+json", "#/components/schemas/Problem")
OPENAI = ("application/json", "#/components/schemas/OpenAIError")
ANTHROPIC = ("application/json", "#/components/schemas/AnthropicError")


def expected_shape(path: str) -> tuple[str, str]:
    """Anthropic's shape on /v1/messages, OpenAI's on the other /v1 routes, problem+json elsewhere."""
    if path.startswith("/v1/messages"):
        return ANTHROPIC
    return OPENAI if path.startswith("/v1/") else PROBLEM


def fetch(url: str) -> dict[str, Any]:
    """A published OpenAPI document."""
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def error_contract_problems(document: dict[str, Any]) -> list[str]:
    """Every operation whose error responses are missing or not in its route's shape."""
    problems = []
    for path, item in document["paths"].items():
        media_type, schema = expected_shape(path)
        for method, operation in item.items():
            responses = operation["responses"]
            required = {"400"} | ({"401", "403"} if any(operation.get("security") or []) else set())
            if missing := sorted(required - responses.keys()):
                problems.append(f"{method.upper()} {path}: no {', '.join(missing)}")
            for status, response in responses.items():
                if int(status) >= 400 and response.get("content") != {media_type: {"schema": {"$ref": schema}}}:
                    problems.append(f"{method.upper()} {path} {status}: {response.get('content')}")
    return problems


@pytest.mark.parametrize("service", ["auth", "llm", "jobs"])
def test_errors_are_documented_in_each_routes_shape(platform: RunningPlatform, service: str) -> None:
    """flask-openapi3 alone documents a 400 as a JSON array no service sends, and no other error at all."""
    direct = fetch(f"{platform.url(service)}/openapi/openapi.json")
    assert direct["paths"], service
    assert error_contract_problems(direct) == []
    assert "ValidationErrorModel" not in direct["components"]["schemas"]


def test_gateway_publishes_only_what_it_routes(platform: RunningPlatform) -> None:
    """The internal auth and llm routes answer 404 at the edge, so the gateway's view leaves them out; the rest is
    there, with the edge's own 429 on the rate-limited inference routes."""
    direct = fetch(f"{platform.url('auth')}/openapi/openapi.json")
    published = fetch(f"{platform.gateway}/docs/auth.json")
    hidden = {"/auth/internal/key-exchange", "/auth/internal/act-as", "/auth/service-token"}
    assert hidden <= direct["paths"].keys()
    assert published["paths"].keys() == direct["paths"].keys() - hidden
    for path in hidden:
        assert requests.post(f"{platform.gateway}{path}", json={}, timeout=10).status_code == 404
    llm = fetch(f"{platform.gateway}/docs/llm.json")
    assert "/internal/calls" in fetch(f"{platform.url('llm')}/openapi/openapi.json")["paths"]
    assert "/internal/calls" not in llm["paths"]  # the batch worker's route: llm's own, 404 at the edge
    assert requests.post(f"{platform.gateway}/internal/calls", json={}, timeout=10).status_code == 404
    assert "429" in llm["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "429" not in llm["paths"]["/v1/models"]["get"]["responses"]
    assert error_contract_problems(llm) == []


def test_nul_characters_are_refused(platform: RunningPlatform, fuzz_credentials: Credentials) -> None:
    """PostgreSQL text cannot hold NUL: in a stored field, a looked-up field, a path id or a query cursor it is the
    client's 400 in the route's shape, never a 500 (schemathesis found `POST /auth/api-keys {"name": "\\u0000"}`)."""
    member = {"Authorization": f"Bearer {fuzz_credentials.user.access_token}", "X-Forwarded-For": "198.51.100.10"}
    auth, jobs, llm = platform.url("auth"), platform.url("jobs"), platform.url("llm")
    calls = [
        ("POST", f"{auth}/auth/api-keys", {"name": "a\x00b"}, PROBLEM),
        ("POST", f"{auth}/auth/token", {"email": "a\x00@example.com", "password": "x"}, PROBLEM),
        ("POST", f"{auth}/auth/refresh", {"refresh_token": "\x00"}, PROBLEM),
        ("DELETE", f"{auth}/auth/api-keys/a%00b", None, PROBLEM),
        ("GET", f"{jobs}/v1/files/file-%00", None, OPENAI),
        ("GET", f"{jobs}/v1/batches?after=batch_%00", None, OPENAI),
        ("GET", f"{llm}/v1/budgets/users/u%00", None, OPENAI),
        ("POST", f"{platform.gateway}/v1/chat/completions", {"model": "gpt\x00", "messages": []}, OPENAI),
    ]
    for method, url, body, (media_type, _) in calls:
        headers = member
        if url.startswith(platform.gateway):
            headers = {**member, "Authorization": f"Bearer {fuzz_credentials.user.api_key}"}
        answer = requests.request(method, url, json=body, headers=headers, timeout=10)
        assert 400 <= answer.status_code < 500, (method, url, answer.status_code, answer.text)
        assert answer.headers["Content-Type"].startswith(media_type), (url, answer.headers["Content-Type"])
        error = answer.json()
        assert error.get("detail") or error.get("error", {}).get("message"), (url, error)
