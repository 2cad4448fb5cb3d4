"""OWASP API5 (broken function-level authorization): every route the services document is classified here, and
every admin route answers 401 to nobody, 403 to a member (through the gateway and straight at the service) and
works for a real admin, made with auth's own `create-admin` command. A member's attempt changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import pytest

if TYPE_CHECKING:
    from conftest import Admin, Client, Documents, Http, RunningPlatform

PUBLIC = "public"  # no credentials needed
SERVICE = "service"  # service accounts only; 404 at the edge
USER = "user"  # any signed-in user, on their own things
OWNER_OR_ADMIN = "owner-or-admin"  # the owner or an admin; anyone else 404 (see test_bola.py)
ADMIN = "admin"

# Every route of every service, by who may call it. A route the services add and this table misses fails
# test_every_documented_route_is_classified, so a new admin route cannot ship unchecked.
ACCESS: dict[tuple[str, str], str] = {
    ("GET", "/.well-known/jwks.json"): PUBLIC,
    ("POST", "/auth/register"): PUBLIC,
    ("POST", "/auth/token"): PUBLIC,
    ("POST", "/auth/refresh"): PUBLIC,
    ("POST", "/auth/logout"): PUBLIC,
    ("POST", "/auth/service-token"): SERVICE,
    ("POST", "/auth/internal/act-as"): SERVICE,
    ("POST", "/auth/internal/key-exchange"): SERVICE,
    ("GET", "/auth/me"): USER,
    ("POST", "/auth/password"): USER,
    ("GET", "/auth/api-keys"): USER,
    ("POST", "/auth/api-keys"): USER,
    ("DELETE", "/auth/api-keys/{key_id}"): USER,
    ("GET", "/auth/users"): ADMIN,
    ("PATCH", "/auth/users/{user_id}"): ADMIN,
    ("POST", "/auth/users/{user_id}/disable"): ADMIN,
    ("GET", "/auth/invites"): ADMIN,
    ("POST", "/auth/invites"): ADMIN,
    ("DELETE", "/auth/invites/{invite_id}"): ADMIN,
    ("POST", "/internal/calls"): SERVICE,  # llm's groups of calls, for a service acting for a user (the jobs worker)
    ("POST", "/v1/chat/completions"): USER,
    ("POST", "/v1/embeddings"): USER,
    ("POST", "/v1/messages"): USER,
    ("GET", "/v1/models"): USER,
    ("GET", "/v1/usage"): USER,
    ("GET", "/v1/usage/all"): ADMIN,
    ("GET", "/v1/budgets"): ADMIN,
    ("GET", "/v1/budgets/users/{user_id}"): OWNER_OR_ADMIN,
    ("PUT", "/v1/budgets/users/{user_id}"): ADMIN,
    ("DELETE", "/v1/budgets/users/{user_id}"): ADMIN,
    ("GET", "/v1/budgets/keys/{key_id}"): OWNER_OR_ADMIN,
    ("PUT", "/v1/budgets/keys/{key_id}"): ADMIN,
    ("DELETE", "/v1/budgets/keys/{key_id}"): ADMIN,
    ("GET", "/v1/files"): USER,
    ("POST", "/v1/files"): USER,
    ("GET", "/v1/files/{file_id}"): USER,
    ("DELETE", "/v1/files/{file_id}"): USER,
    ("GET", "/v1/files/{file_id}/content"): USER,
    ("GET", "/v1/batches"): USER,
    ("POST", "/v1/batches"): USER,
    ("GET", "/v1/batches/{batch_id}"): USER,
    ("POST", "/v1/batches/{batch_id}/cancel"): USER,
}

ADMIN_WORDS = ("admin", "/users", "/invites", "/all", "/budgets")


def looks_admin(path: str, operation: dict[str, Any]) -> bool:
    """An admin-looking route: tagged admin, documented as for admins, or under an admin-sounding path."""
    text = " ".join([*operation.get("tags", []), operation.get("summary", ""), operation.get("description", "")])
    return "admin" in text.lower() or any(word in path for word in ADMIN_WORDS)


def test_every_documented_route_is_classified(documents: Documents) -> None:
    """The OpenAPI documents /docs serves and this table list the same routes; every admin-looking route is
    classified admin (or, for budgets' reads, owner-or-admin)."""
    documented = documents.routes()
    assert set(documented) - set(ACCESS) == set(), "routes nobody classified (add them to ACCESS and the matrices)"
    assert set(ACCESS) - set(documented) == set(), "classified routes the services no longer document"
    for (method, path), service in documented.items():
        operation = documents.by_service[service]["paths"][path][method.lower()]
        if looks_admin(path, operation) and not (method == "GET" and path == "/auth/me"):
            assert ACCESS[(method, path)] in (ADMIN, OWNER_OR_ADMIN), (method, path, operation.get("summary"))


@dataclass
class World:
    """What the admin routes act on: a victim user with a key, and an invite."""

    victim: Client
    victim_id: str
    invite_id: str


@dataclass(frozen=True)
class AdminCall:
    """One admin route made concrete: the URL path (ids filled in) and a body that would succeed for an admin."""

    method: str
    template: str
    path: Callable[[World], str]
    body: dict[str, Any] | None
    admin_status: int


ADMIN_CALLS = [
    AdminCall("GET", "/auth/users", lambda w: "/auth/users", None, 200),
    AdminCall("GET", "/auth/invites", lambda w: "/auth/invites", None, 200),
    AdminCall("POST", "/auth/invites", lambda w: "/auth/invites", {}, 201),
    AdminCall("GET", "/v1/usage/all", lambda w: "/v1/usage/all", None, 200),
    AdminCall("GET", "/v1/budgets", lambda w: "/v1/budgets", None, 200),
    AdminCall(
        "PUT", "/v1/budgets/users/{user_id}", lambda w: f"/v1/budgets/users/{w.victim_id}", {"limit_usd": "7"}, 200
    ),
    AdminCall(
        "PUT", "/v1/budgets/keys/{key_id}", lambda w: f"/v1/budgets/keys/{w.victim.key_id}", {"limit_usd": "3"}, 200
    ),
    AdminCall("DELETE", "/v1/budgets/users/{user_id}", lambda w: f"/v1/budgets/users/{w.victim_id}", None, 204),
    AdminCall("DELETE", "/v1/budgets/keys/{key_id}", lambda w: f"/v1/budgets/keys/{w.victim.key_id}", None, 204),
    AdminCall("PATCH", "/auth/users/{user_id}", lambda w: f"/auth/users/{w.victim_id}", {"role": "admin"}, 200),
    AdminCall("DELETE", "/auth/invites/{invite_id}", lambda w: f"/auth/invites/{w.invite_id}", None, 204),
    AdminCall("POST", "/auth/users/{user_id}/disable", lambda w: f"/auth/users/{w.victim_id}/disable", None, 204),
]


def test_the_matrix_covers_every_admin_route() -> None:
    """Each admin route of the table has a concrete call below (so the matrix cannot silently skip one)."""
    admin_routes = {route for route, access in ACCESS.items() if access == ADMIN}
    assert {(call.method, call.template) for call in ADMIN_CALLS} == admin_routes


def service_url(platform: RunningPlatform, path: str) -> str:
    """The service that owns a path, reached directly (bypassing the gateway)."""
    name = "auth" if path.startswith("/auth") else "llm"
    return platform.url(name)


def state_of(http: Http, platform: RunningPlatform, admin: Admin, world: World) -> dict[str, Any]:
    """What a member's attempt could have changed, read by the admin."""
    token = {"Authorization": f"Bearer {admin.access_token}"}
    users = http.get(f"{platform.gateway}/auth/users", headers=token).json()["data"]
    victim = next(user for user in users if user["id"] == world.victim_id)
    invites = http.get(f"{platform.gateway}/auth/invites", headers=token).json()["data"]
    invite = next(item for item in invites if item["id"] == world.invite_id)
    budgets = http.get(f"{platform.gateway}/v1/budgets", headers=token).json()["data"]
    return {
        "victim": (victim["role"], victim["disabled"]),
        "invite revoked": invite["revoked_at"],
        "invites": len(invites),
        "budgets": sorted(
            (b["scope"], b["subject_id"]) for b in budgets if b["subject_id"] in (world.victim_id, world.victim.key_id)
        ),
    }


@pytest.mark.parametrize("door", ["gateway", "service"])
def test_admin_routes_refuse_members_and_anonymous_and_serve_admins(
    platform: RunningPlatform, http: Http, admin: Admin, door: str
) -> None:
    """Per admin route: no credentials → 401, a member's login token and API key → 403 (also on their own id),
    and nothing changed; then the admin → the route's success status."""
    member = platform.new_client()
    victim = platform.new_client()
    admin_token = {"Authorization": f"Bearer {admin.access_token}"}
    invite = http.post(f"{platform.gateway}/auth/invites", json={}, headers=admin_token)
    assert invite.status_code == 201, invite.text
    world = World(victim, _sub(victim.access_token), invite.json()["id"])
    before = state_of(http, platform, admin, world)
    member_id = _sub(member.access_token)
    attempts = 0
    for call in ADMIN_CALLS:
        path = call.path(world)
        base = platform.gateway if door == "gateway" else service_url(platform, path)
        anonymous = http.request(call.method, base + path, json=call.body)
        assert anonymous.status_code == 401, (call.method, path, anonymous.status_code, anonymous.text)
        credentials = [member.access_token] if door == "service" else [member.access_token, member.api_key]
        for credential in credentials:
            for target in {path, path.replace(world.victim_id, member_id)}:
                refused = http.request(call.method, base + target, json=call.body, headers=_bearer(credential))
                # auth takes login tokens only: an API key there is no credential at all (401), elsewhere 403
                expected = 401 if credential == member.api_key and path.startswith("/auth") else 403
                assert refused.status_code == expected, (call.method, target, refused.status_code, refused.text)
                attempts += 1
    assert state_of(http, platform, admin, world) == before
    for call in ADMIN_CALLS:  # in order: the disabling comes last
        path = call.path(world)
        base = platform.gateway if door == "gateway" else service_url(platform, path)
        done = http.request(call.method, base + path, json=call.body, headers=admin_token)
        assert done.status_code == call.admin_status, (call.method, path, done.status_code, done.text)
    assert attempts >= len(ADMIN_CALLS)
    after = state_of(http, platform, admin, world)
    assert after["victim"] == ("admin", True) and after["invite revoked"] is not None


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sub(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["sub"]


def test_a_member_cannot_make_themselves_admin_by_any_route(platform: RunningPlatform, http: Http) -> None:
    """Self-promotion attempts (PATCH own role, register or create a key claiming a role) leave the member a member:
    their next login token still says member and the admin aggregate still refuses them."""
    member = platform.new_client()
    member_id = _sub(member.access_token)
    own = f"{platform.gateway}/auth/users/{member_id}"
    promote = http.request("PATCH", own, json={"role": "admin"}, headers=_bearer(member.access_token))
    assert promote.status_code == 403
    login = http.post(f"{platform.gateway}/auth/token", json={"email": member.email, "password": member.password})
    assert login.status_code == 200
    fresh = login.json()["access_token"]
    assert jwt.decode(fresh, options={"verify_signature": False})["roles"] == ["member"]
    assert http.get(f"{platform.gateway}/v1/usage/all", headers=_bearer(fresh)).status_code == 403
    assert http.get(f"{platform.gateway}/v1/usage/all", headers=_bearer(member.api_key)).status_code == 403
