"""OWASP API1 (broken object-level authorization): Bob, a member, aims every route that takes an id at Alice's API
key, file, batch and budgets — through the gateway with his API key and straight at each service with his login
token. Each attempt is a 404 (never 403, never 200) and Alice's things read back unchanged; then Alice herself
succeeds on the same URLs, which proves the attacks aimed at real objects. The route list comes from the services'
OpenAPI documents: a new route with an id that this matrix does not cover fails the suite."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import pytest

if TYPE_CHECKING:
    from conftest import Admin, Client, Documents, Http, RunningPlatform

OWNED_ID_ROUTES_ADMIN_ONLY = {
    # Admin functions that take ids: test_bfla.py refuses them to members with 403 (an admin route, not an object).
    ("PATCH", "/auth/users/{user_id}"),
    ("POST", "/auth/users/{user_id}/disable"),
    ("DELETE", "/auth/invites/{invite_id}"),
    ("PUT", "/v1/budgets/users/{user_id}"),
    ("DELETE", "/v1/budgets/users/{user_id}"),
    ("PUT", "/v1/budgets/keys/{key_id}"),
    ("DELETE", "/v1/budgets/keys/{key_id}"),
}


@dataclass
class Victim:
    """Alice's objects."""

    client: Client
    user_id: str
    file_id: str
    batch_id: str


@dataclass(frozen=True)
class Attack:
    """One route with an id, aimed at Alice's object; `owner_ok` is what Alice gets on the same URL."""

    method: str
    template: str
    fill: Callable[[Victim], str]
    owner_ok: frozenset[int]


CANCELLED = frozenset({200, 409})

ATTACKS = [
    Attack("GET", "/v1/files/{file_id}", lambda v: f"/v1/files/{v.file_id}", frozenset({200})),
    Attack("GET", "/v1/files/{file_id}/content", lambda v: f"/v1/files/{v.file_id}/content", frozenset({200})),
    Attack("GET", "/v1/batches/{batch_id}", lambda v: f"/v1/batches/{v.batch_id}", frozenset({200})),
    Attack("GET", "/v1/budgets/users/{user_id}", lambda v: f"/v1/budgets/users/{v.user_id}", frozenset({200})),
    Attack("GET", "/v1/budgets/keys/{key_id}", lambda v: f"/v1/budgets/keys/{v.client.key_id}", frozenset({200})),
    # a batch that already finished cannot be cancelled (409): either way the owner reached her batch
    Attack("POST", "/v1/batches/{batch_id}/cancel", lambda v: f"/v1/batches/{v.batch_id}/cancel", CANCELLED),
    Attack("DELETE", "/v1/files/{file_id}", lambda v: f"/v1/files/{v.file_id}", frozenset({200})),
    Attack("DELETE", "/auth/api-keys/{key_id}", lambda v: f"/auth/api-keys/{v.client.key_id}", frozenset({204})),
]


def test_every_route_with_an_id_is_in_a_matrix(documents: Documents) -> None:
    """Each documented route with a path parameter is attacked here or refused as an admin function in
    test_bfla.py; nothing else may exist."""
    with_ids = {route for route in documents.routes() if "{" in route[1]}
    covered = {(attack.method, attack.template) for attack in ATTACKS} | OWNED_ID_ROUTES_ADMIN_ONLY
    assert with_ids - covered == set(), "routes with an id that no matrix covers"
    assert covered - with_ids == set(), "matrix entries for routes that no longer exist"


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def owner_of(path: str) -> str:
    """Which service serves a path."""
    if path.startswith("/auth"):
        return "auth"
    return "jobs" if path.startswith(("/v1/files", "/v1/batches")) else "llm"


def batch_file(model: str = "gpt-4o-mini", lines: int = 2) -> bytes:
    """A small valid batch input file."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"line-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"hello {n} #fake:tokens=2"}]},
            }
        ).encode()
        + b"\n"
        for n in range(lines)
    )


def make_victim(platform: RunningPlatform, http: Http, admin: Admin) -> Victim:
    """Alice with a file, a batch made from it, and budgets on her user and her key (set by the admin)."""
    alice = platform.new_client()
    user_id = jwt.decode(alice.access_token, options={"verify_signature": False})["sub"]
    key = bearer(alice.api_key)
    upload = {"data": {"purpose": "batch"}, "files": {"file": ("in.jsonl", batch_file())}}
    uploaded = http.post(f"{platform.gateway}/v1/files", headers=key, **upload)
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    batch = http.post(
        f"{platform.gateway}/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=key,
    )
    assert batch.status_code == 200, batch.text
    as_admin = bearer(admin.access_token)
    for path, limit in ((f"/v1/budgets/users/{user_id}", "5"), (f"/v1/budgets/keys/{alice.key_id}", "2")):
        put = http.request("PUT", platform.gateway + path, json={"limit_usd": limit}, headers=as_admin)
        assert put.status_code == 200, put.text
    return Victim(alice, user_id, file_id, batch.json()["id"])


def snapshot(platform: RunningPlatform, http: Http, victim: Victim) -> dict[str, Any]:
    """Everything of Alice's an attack could touch, read by Alice (batch progress itself may move on)."""
    key, login, g = bearer(victim.client.api_key), bearer(victim.client.access_token), platform.gateway
    batch = http.get(f"{g}/v1/batches/{victim.batch_id}", headers=key).json()
    return {
        "keys": sorted(item["id"] for item in http.get(f"{g}/auth/api-keys", headers=login).json()["data"]),
        "key works": http.get(f"{g}/v1/models", headers=key).status_code,
        "file": http.get(f"{g}/v1/files/{victim.file_id}", headers=key).json(),
        "content": http.get(f"{g}/v1/files/{victim.file_id}/content", headers=key).content,
        "batch cancelled": (batch["cancelling_at"], batch["cancelled_at"], batch["input_file_id"]),
        "user budget": http.get(f"{g}/v1/budgets/users/{victim.user_id}", headers=key).json()["limit_usd"],
        "key budget": http.get(f"{g}/v1/budgets/keys/{victim.client.key_id}", headers=key).json()["limit_usd"],
    }


@pytest.mark.parametrize("door", ["gateway", "service"])
def test_another_users_objects_are_404_on_every_route_and_verb(
    platform: RunningPlatform, http: Http, admin: Admin, door: str
) -> None:
    """Bob on each of Alice's objects: 404 on every route and verb; Alice's state unchanged after each attempt;
    then Alice on the same URLs: success."""
    victim = make_victim(platform, http, admin)
    bob = platform.new_client()
    before = snapshot(platform, http, victim)
    assert before["key works"] == 200 and before["content"] == batch_file()
    refused = 0
    for attack in ATTACKS:
        path = attack.fill(victim)
        base = platform.gateway if door == "gateway" else platform.url(owner_of(path))
        # auth manages keys with login tokens only; elsewhere Bob uses what a client uses at that door
        credential = bob.access_token if door == "service" or path.startswith("/auth") else bob.api_key
        answer = http.request(attack.method, base + path, headers=bearer(credential))
        assert answer.status_code == 404, (door, attack.method, path, answer.status_code, answer.text)
        assert snapshot(platform, http, victim) == before, (door, attack.method, path)
        refused += 1
    for attack in ATTACKS:  # the destructive ones come last; a key's budget is shown to that key, so: the gateway
        path = attack.fill(victim)
        credential = victim.client.access_token if path.startswith("/auth") else victim.client.api_key
        answer = http.request(attack.method, platform.gateway + path, headers=bearer(credential))
        assert answer.status_code in attack.owner_ok, (door, attack.method, path, answer.status_code, answer.text)
    assert refused == len(ATTACKS)


def test_ids_in_bodies_and_cursors_reveal_nothing(platform: RunningPlatform, http: Http, admin: Admin) -> None:
    """Alice's ids where a body or a query takes one: a batch from her file is 404 like a file that does not exist,
    and list cursors on her ids answer exactly as cursors on ids that never existed; Bob ends with no batches."""
    victim = make_victim(platform, http, admin)
    bob = platform.new_client()
    key, g = bearer(bob.api_key), platform.gateway
    batch = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
    stolen = http.post(f"{g}/v1/batches", json={**batch, "input_file_id": victim.file_id}, headers=key)
    missing = http.post(f"{g}/v1/batches", json={**batch, "input_file_id": "file-" + uuid.uuid4().hex}, headers=key)
    assert stolen.status_code == missing.status_code == 404
    assert stolen.json()["error"]["code"] == missing.json()["error"]["code"]
    for listing, own_id in (("/v1/files", victim.file_id), ("/v1/batches", victim.batch_id)):
        theirs = http.get(f"{g}{listing}", params={"after": own_id}, headers=key)
        nobodys = http.get(f"{g}{listing}", params={"after": own_id[:-4] + "zzzz"}, headers=key)
        assert theirs.status_code == nobodys.status_code and theirs.status_code in (400, 404), theirs.text
        assert _redact(theirs.text, own_id) == _redact(nobodys.text, own_id[:-4] + "zzzz")
    assert http.get(f"{g}/v1/batches", headers=key).json()["data"] == []
    assert http.get(f"{g}/v1/files", headers=key).json()["data"] == []


def _redact(text: str, identifier: str) -> str:
    return re.sub(re.escape(identifier), "<id>", text)


def test_usage_and_idempotency_keys_are_per_user(platform: RunningPlatform, http: Http) -> None:
    """Bob's usage never shows Alice's calls, and Bob reusing Alice's Idempotency-Key with her exact body gets a
    completion of his own (booked to him), not a replay of hers."""
    alice, bob = platform.new_client(), platform.new_client()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "secret plans #fake:tokens=3"}]}
    shared = {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}
    url = f"{platform.gateway}/v1/chat/completions"
    hers = http.post(url, json=body, headers={**bearer(alice.api_key), **shared})
    assert hers.status_code == 200, hers.text
    replay = http.post(url, json=body, headers={**bearer(alice.api_key), **shared})
    assert replay.json()["id"] == hers.json()["id"]  # the key does replay for its owner
    his = http.post(url, json=body, headers={**bearer(bob.api_key), **shared})
    assert his.status_code == 200, his.text
    assert his.json()["id"] != hers.json()["id"]

    def requests_of(client: Client) -> int:
        usage = http.get(f"{platform.gateway}/v1/usage", headers=bearer(client.api_key))
        assert usage.status_code == 200
        assert all("user_id" not in row or row["user_id"] in (None, _sub(client)) for row in usage.json()["data"])
        return sum(row["requests"] for row in usage.json()["data"])

    # the ledger books a call once its answer is sent: wait (bounded) for both bookings, then compare
    deadline = time.monotonic() + 30
    while (requests_of(alice), requests_of(bob)) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (requests_of(alice), requests_of(bob)) == (1, 1)


def _sub(client: Client) -> str:
    return jwt.decode(client.access_token, options={"verify_signature": False})["sub"]
