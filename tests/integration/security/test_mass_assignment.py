"""OWASP API3 (broken object property level authorization, formerly mass assignment): fields a client must not set —
role, ids, owners, hashes, limits, status, timestamps, spend — sent on every write route a member or admin has.
Each is refused with a 4xx or ignored, and reading the object back proves which."""

from __future__ import annotations

import io
import json
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from conftest import Admin, Client, Http, RunningPlatform

LONG_AGO = "2000-01-01T00:00:00Z"
FORGED_ID = "forged-0000"


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def claims(token: str) -> dict[str, Any]:
    """A token's claims (read, not verified: the services verify)."""
    return jwt.decode(token, options={"verify_signature": False})


def recent(iso: str) -> bool:
    """A timestamp from this run, not one a client chose."""
    return abs(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time()) < 3600


def test_register_ignores_role_id_and_timestamps(platform: RunningPlatform, http: Http) -> None:
    """A registration claiming admin, an id, a creation date and a disabled flag makes a plain member."""
    email, password = f"mass-{uuid.uuid4().hex[:10]}@example.com", "a long enough password"
    forged = {
        "role": "admin",
        "roles": ["admin"],
        "is_admin": True,
        "id": FORGED_ID,
        "created_at": LONG_AGO,
        "disabled": False,
        "password_hash": "$argon2id$forged",
    }
    made = http.post(f"{platform.gateway}/auth/register", json={"email": email, "password": password, **forged})
    assert made.status_code in (201, 400, 422), made.text
    login = http.post(f"{platform.gateway}/auth/token", json={"email": email, "password": password})
    if made.status_code != 201:  # refused outright: then nothing was created either
        assert login.status_code == 401
        return
    user = made.json()
    assert user["role"] == "member" and user["id"] != FORGED_ID and recent(user["created_at"])
    token = login.json()
    assert claims(token["access_token"])["roles"] == ["member"]
    me = http.get(f"{platform.gateway}/auth/me", headers=bearer(token["access_token"])).json()
    assert me == user
    assert http.get(f"{platform.gateway}/v1/usage/all", headers=bearer(token["access_token"])).status_code == 403


def test_key_creation_ignores_owner_secret_limits_and_scopes(platform: RunningPlatform, http: Http) -> None:
    """Bob creating a key that names Alice as owner, chooses its secret, hash, id, rate limits and roles gets an
    ordinary key of his own: a key he did not choose, listed under him only, booking to him, with default limits."""
    alice, bob = platform.new_client(), platform.new_client()
    chosen = "sk-pl-" + "A" * 43
    login = bearer(bob.access_token)
    forged = {
        "user_id": claims(alice.access_token)["sub"],
        "owner": claims(alice.access_token)["sub"],
        "id": FORGED_ID,
        "key": chosen,
        "key_hash": "00" * 32,
        "hash": "00" * 32,
        "prefix": "sk-pl-AAAAAA",
        "created_at": LONG_AGO,
        "last_used_at": LONG_AGO,
        "revoked_at": None,
        "roles": ["admin"],
        "scopes": ["admin", "*"],
        "rpm": 1_000_000,
        "tpm": 1_000_000_000,
    }
    made = http.post(f"{platform.gateway}/auth/api-keys", json={"name": "mass", **forged}, headers=login)
    assert made.status_code in (201, 400, 422), made.text
    alice_keys = http.get(f"{platform.gateway}/auth/api-keys", headers=bearer(alice.access_token)).json()["data"]
    assert [item["id"] for item in alice_keys] == [alice.key_id]
    if made.status_code != 201:
        return
    key = made.json()
    assert key["key"] != chosen and key["id"] != FORGED_ID and recent(key["created_at"])
    assert key["prefix"] == key["key"][:12]
    listed = http.get(f"{platform.gateway}/auth/api-keys", headers=bearer(bob.access_token)).json()["data"]
    bob_keys = {item["id"] for item in listed}
    assert bob_keys == {bob.key_id, key["id"]}
    refused = http.get(f"{platform.gateway}/v1/models", headers=bearer(chosen))
    assert refused.status_code == 401
    call = http.post(
        f"{platform.gateway}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mine? #fake:tokens=2"}]},
        headers=bearer(key["key"]),
    )
    assert call.status_code == 200, call.text
    default = http.post(
        f"{platform.gateway}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "baseline #fake:tokens=2"}]},
        headers=bearer(bob.api_key),
    )
    assert call.headers["x-ratelimit-limit-requests"] == default.headers["x-ratelimit-limit-requests"]
    assert http.get(f"{platform.gateway}/v1/usage/all", headers=bearer(key["key"])).status_code == 403


def test_batch_creation_refuses_status_owner_and_output_fields(platform: RunningPlatform, http: Http) -> None:
    """A batch body naming its status, owner, id, output files, counts or dates is a 400; no batch is made."""
    alice, bob = platform.new_client(), platform.new_client()
    key = bearer(bob.api_key)
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi #fake:tokens=1"}]},
    }
    upload = http.post(
        f"{platform.gateway}/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", io.BytesIO(json.dumps(line).encode()))},
        headers=key,
    )
    assert upload.status_code == 200, upload.text
    valid = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    forged_fields = {
        "status": "completed",
        "owner": claims(alice.access_token)["sub"],
        "user_id": claims(alice.access_token)["sub"],
        "id": FORGED_ID,
        "output_file_id": upload.json()["id"],
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "created_at": 0,
        "completed_at": 0,
        "usage": {"input_tokens": 0, "output_tokens": 0},
        "key_id": alice.key_id,
    }
    for name, value in forged_fields.items():
        refused = http.post(f"{platform.gateway}/v1/batches", json={**valid, name: value}, headers=key)
        assert refused.status_code == 400, (name, refused.status_code, refused.text)
    assert http.get(f"{platform.gateway}/v1/batches", headers=key).json()["data"] == []
    assert http.get(f"{platform.gateway}/v1/batches", headers=bearer(alice.api_key)).json()["data"] == []
    made = http.post(f"{platform.gateway}/v1/batches", json=valid, headers=key)
    assert made.status_code == 200 and made.json()["status"] in ("validating", "in_progress", "finalizing", "completed")


def test_file_upload_ignores_owner_id_size_and_dates(platform: RunningPlatform, http: Http) -> None:
    """Form fields naming the owner, id, size, status or dates are ignored: the file is Bob's, its size is its
    size, its id and dates are the service's."""
    alice, bob = platform.new_client(), platform.new_client()
    forged = {
        "purpose": "user_data",
        "owner": claims(alice.access_token)["sub"],
        "user_id": claims(alice.access_token)["sub"],
        "id": FORGED_ID,
        "bytes": "1",
        "status": "error",
        "created_at": "0",
        "expires_at": "1",
        "filename": "../../etc/passwd",
    }
    made = http.post(
        f"{platform.gateway}/v1/files",
        data=forged,
        files={"file": ("notes.txt", io.BytesIO(b"twelve bytes"))},
        headers=bearer(bob.api_key),
    )
    assert made.status_code in (200, 400), made.text
    assert http.get(f"{platform.gateway}/v1/files", headers=bearer(alice.api_key)).json()["data"] == []
    if made.status_code != 200:
        return
    file = made.json()
    assert file["id"] != FORGED_ID and file["bytes"] == 12 and file["status"] == "processed"
    assert file["filename"] == "notes.txt" and abs(file["created_at"] - time.time()) < 3600
    assert http.get(f"{platform.gateway}/v1/files/{file['id']}", headers=bearer(bob.api_key)).json() == file
    assert http.get(f"{platform.gateway}/v1/files/{file['id']}", headers=bearer(alice.api_key)).status_code == 404


def test_budget_put_ignores_spend_scope_and_subject(platform: RunningPlatform, http: Http, admin: Admin) -> None:
    """Even an admin cannot write a budget's spend, reservation, scope, subject or period start: a PUT carrying
    them sets the limit of the budget in the path and nothing else."""
    member = platform.new_client()
    member_id = claims(member.access_token)["sub"]
    other = f"someone-{uuid.uuid4().hex[:8]}"
    forged = {
        "limit_usd": "4",
        "spent_usd": -100,
        "reserved_usd": -100,
        "remaining_usd": 1_000_000,
        "scope": "key",
        "subject_id": other,
        "period_start": LONG_AGO,
    }
    put = http.request(
        "PUT", f"{platform.gateway}/v1/budgets/users/{member_id}", json=forged, headers=bearer(admin.access_token)
    )
    assert put.status_code in (200, 400), put.text
    if put.status_code == 200:
        budget = http.get(f"{platform.gateway}/v1/budgets/users/{member_id}", headers=bearer(member.api_key)).json()
        assert budget["scope"] == "user" and budget["subject_id"] == member_id
        assert budget["limit_usd"] == 4 and budget["spent_usd"] == 0 and budget["reserved_usd"] == 0
        started = datetime.fromisoformat(budget["period_start"]).timestamp()
        assert budget["remaining_usd"] == 4 and time.time() - 32 * 86_400 < started <= time.time()  # this month's
    for scope in ("users", "keys"):
        absent = http.get(f"{platform.gateway}/v1/budgets/{scope}/{other}", headers=bearer(admin.access_token))
        assert absent.status_code == 404


def test_inference_bodies_cannot_book_to_someone_else(platform: RunningPlatform, http: Http) -> None:
    """Identity fields in a chat body (user, user_id, key_id, metadata) do not move the call to Alice's account."""
    alice, bob = platform.new_client(), platform.new_client()
    alice_id = claims(alice.access_token)["sub"]
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "charge alice #fake:tokens=2"}],
        "user": alice_id,
        "user_id": alice_id,
        "key_id": alice.key_id,
        "metadata": {"user_id": alice_id},
    }
    answer = http.post(f"{platform.gateway}/v1/chat/completions", json=body, headers=bearer(bob.api_key))
    assert answer.status_code in (200, 400), answer.text

    def booked(client: Client) -> int:
        rows = http.get(f"{platform.gateway}/v1/usage", headers=bearer(client.api_key)).json()["data"]
        return sum(row["requests"] for row in rows)

    expected = (0, 1 if answer.status_code == 200 else 0)
    deadline = time.monotonic() + 30
    while (booked(alice), booked(bob)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (booked(alice), booked(bob)) == expected


def test_admin_user_update_refuses_fields_beyond_role_and_disabled(
    platform: RunningPlatform, http: Http, admin: Admin
) -> None:
    """An admin's PATCH naming email, id, password or created_at is a 400 and the user is unchanged."""
    member = platform.new_client()
    member_id = claims(member.access_token)["sub"]
    url = f"{platform.gateway}/auth/users/{member_id}"
    for name, value in (
        ("email", "taken@example.com"),
        ("id", FORGED_ID),
        ("password", "a new password"),
        ("created_at", LONG_AGO),
    ):
        refused = http.request("PATCH", url, json={"role": "member", name: value}, headers=bearer(admin.access_token))
        assert refused.status_code == 400, (name, refused.text)
    login = http.post(f"{platform.gateway}/auth/token", json={"email": member.email, "password": member.password})
    assert login.status_code == 200
    me = http.get(f"{platform.gateway}/auth/me", headers=bearer(login.json()["access_token"])).json()
    assert me["id"] == member_id and me["email"] == member.email and me["role"] == "member"
    assert datetime.fromisoformat(me["created_at"]).tzinfo is not None and me["created_at"] > "2020"
