"""OWASP API2 (broken authentication) and API8 (security misconfiguration) at the edge: tokens forged the way an
attacker would, and a sweep over every documented route provoking errors. Every error answer of this suite passes
the conftest's ErrorCheck: the route's own shape, no 5xx but 502/503/504, no traceback, path, key, token, SQL or
secret."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from parley_kit.testing import eventually

if TYPE_CHECKING:
    from conftest import Admin, Client, Documents, ErrorCheck, Http, RunningPlatform

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi #fake:tokens=1"}]}


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def auth_signing_key(platform: RunningPlatform) -> tuple[str, Ed25519PrivateKey]:
    """Auth's current signing key, read from its database: forging with the real key isolates the one claim a test
    gets wrong (an attacker never has it; a token minted for another audience or issuer by the same auth would)."""
    engine = create_engine(platform.config.database_urls["auth"], poolclass=NullPool)
    try:
        with engine.connect() as connection:
            kid, pem = connection.execute(
                text(
                    "SELECT kid, private_key_pem FROM signing_keys WHERE retired_at IS NULL "
                    "ORDER BY created_at DESC, kid DESC LIMIT 1"
                )
            ).one()
    finally:
        engine.dispose()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return kid, key


def forge(key: Ed25519PrivateKey, kid: str, subject: str, **changes: Any) -> str:
    """An access token like auth's, with `changes` to its claims (a value of None drops the claim)."""
    now = int(time.time())
    claims = {
        "iss": "parley-auth",
        "aud": "parley",
        "sub": subject,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "roles": ["member"],
    }
    claims.update(changes)
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def doors(platform: RunningPlatform) -> list[tuple[str, str]]:
    """Where a bearer token is checked: the gateway's edge and each service itself."""
    return [
        (platform.gateway, "/v1/usage"),
        (platform.gateway, "/v1/files"),
        (platform.gateway, "/auth/me"),
        (platform.url("llm"), "/v1/usage"),
        (platform.url("jobs"), "/v1/files"),
        (platform.url("auth"), "/auth/me"),
    ]


def test_forged_tokens_are_401_at_every_door(
    platform: RunningPlatform, http: Http, client: Client, auth_signing_key: tuple[str, Ed25519PrivateKey]
) -> None:
    """With auth's real key, a token right in every way is accepted (the control); each single wrong claim — audience,
    issuer, expiry past the leeway, type, missing jti/exp/iat, a kid that names another key — and each wrong key —
    HS256 keyed with the public key, an attacker's Ed25519 key under the real kid — is a 401 at every door."""
    kid, key = auth_signing_key
    user = jwt.decode(client.access_token, options={"verify_signature": False})["sub"]
    for base, path in doors(platform):
        assert http.get(base + path, headers=bearer(forge(key, kid, user))).status_code == 200, (base, path)
    jwks = http.get(f"{platform.gateway}/.well-known/jwks.json").json()["keys"]
    public = next(item for item in jwks if item["kid"] == kid)
    raw_public = base64.urlsafe_b64decode(public["x"] + "==")
    pem_public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    hs_claims = {"iss": "parley-auth", "aud": "parley", "sub": user, "iat": now, "exp": now + 300}
    hs_claims |= {"jti": "x", "typ": "access", "roles": ["admin"]}
    forged = {
        "wrong audience": forge(key, kid, user, aud="somebody-else"),
        "audience list without ours": forge(key, kid, user, aud=["other", "another"]),
        "wrong issuer": forge(key, kid, user, iss="https://evil.example"),
        "expired past the leeway": forge(key, kid, user, exp=now - 120, iat=now - 900),
        "refresh type": forge(key, kid, user, typ="refresh"),
        "no type": forge(key, kid, user, typ=None),
        "no jti": forge(key, kid, user, jti=None),
        "no exp": forge(key, kid, user, exp=None),
        "no iat": forge(key, kid, user, iat=None),
        "kid of another key": forge(key, "kid_" + uuid.uuid4().hex, user),
        "kid path traversal": forge(key, "../../../../dev/null", user),
        "no kid": jwt.encode({**hs_claims, "roles": ["member"]}, key, algorithm="EdDSA"),
        "attacker key under the real kid": forge(Ed25519PrivateKey.generate(), kid, user, roles=["admin"]),
        "HS256 keyed with the raw public key": jwt.encode(
            hs_claims, raw_public, algorithm="HS256", headers={"kid": kid}
        ),
        "HS256 keyed with the public PEM": _hs256(hs_claims, pem_public, kid),
        "HS256 keyed with the JWK text": _hs256(hs_claims, json.dumps(public).encode(), kid),
        "EdDSA header, signature stripped": forge(key, kid, user).rsplit(".", 1)[0] + ".",
        "payload swapped after signing": _swap_payload(forge(key, kid, user), {**hs_claims, "sub": "someone-else"}),
    }
    for reason, token in forged.items():
        for base, path in doors(platform):
            answer = http.get(base + path, headers=bearer(token))
            assert answer.status_code == 401, (reason, base, path, answer.status_code, answer.text)


def _hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 by hand (PyJWT refuses a PEM-looking HMAC secret, an attacker's tooling does not)."""
    import hashlib
    import hmac

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}."
    signing_input += b64(json.dumps(claims).encode())
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def _swap_payload(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def test_revoked_keys_disabled_users_and_changed_passwords_lose_access_at_the_edge(
    platform: RunningPlatform, http: Http, admin: Admin
) -> None:
    """A revoked API key (Bearer and x-api-key) stops working at the gateway although it was exchanged and cached;
    a disabled user's login token and keys stop; a password change ends older login tokens."""
    url = f"{platform.gateway}/v1/models"
    revoked = platform.new_client()
    assert http.get(url, headers=bearer(revoked.api_key)).status_code == 200  # now cached at the edge
    gone = http.request(
        "DELETE", f"{platform.gateway}/auth/api-keys/{revoked.key_id}", headers=bearer(revoked.access_token)
    )
    assert gone.status_code == 204
    assert eventually(lambda: http.get(url, headers=bearer(revoked.api_key)).status_code == 401)
    assert eventually(lambda: http.get(url, headers={"x-api-key": revoked.api_key}).status_code == 401)
    assert http.get(url, headers=bearer(revoked.access_token)).status_code == 200  # the login itself still works

    disabled = platform.new_client()
    user_id = jwt.decode(disabled.access_token, options={"verify_signature": False})["sub"]
    assert http.get(url, headers=bearer(disabled.access_token)).status_code == 200
    assert http.post(f"{platform.gateway}/auth/users/{user_id}/disable", headers=bearer(admin.access_token)).ok
    assert eventually(lambda: http.get(url, headers=bearer(disabled.access_token)).status_code == 401)
    assert eventually(lambda: http.get(url, headers=bearer(disabled.api_key)).status_code == 401)
    login = http.post(f"{platform.gateway}/auth/token", json={"email": disabled.email, "password": disabled.password})
    assert login.status_code == 401

    changed = platform.new_client()
    assert http.get(url, headers=bearer(changed.access_token)).status_code == 200
    time.sleep(1.1)  # iat has one-second resolution: a token from the same second as the change is ambiguous
    new_password = "a completely new password"
    body = {"current_password": changed.password, "new_password": new_password}
    assert http.post(f"{platform.gateway}/auth/password", json=body, headers=bearer(changed.access_token)).ok
    assert eventually(lambda: http.get(url, headers=bearer(changed.access_token)).status_code == 401)
    fresh = http.post(f"{platform.gateway}/auth/token", json={"email": changed.email, "password": new_password})
    assert http.get(url, headers=bearer(fresh.json()["access_token"])).status_code == 200


def test_a_demoted_admin_loses_admin_powers_at_the_edge_within_seconds(
    platform: RunningPlatform, http: Http, admin: Admin
) -> None:
    """llm and jobs trust the role in the token. A role change at auth makes the gateways refuse the user's tokens
    with another role and drop their keys' cached tokens; a new login carries the new role."""
    promoted = platform.new_client()
    user_id = jwt.decode(promoted.access_token, options={"verify_signature": False})["sub"]
    users = f"{platform.gateway}/auth/users/{user_id}"
    admin_only = f"{platform.gateway}/v1/usage/all"
    login = {"email": promoted.email, "password": promoted.password}
    assert http.get(admin_only, headers=bearer(promoted.api_key)).status_code == 403  # now cached, as a member
    assert http.request("PATCH", users, json={"role": "admin"}, headers=bearer(admin.access_token)).ok
    as_admin = http.post(f"{platform.gateway}/auth/token", json=login).json()["access_token"]
    assert eventually(lambda: http.get(admin_only, headers=bearer(promoted.api_key)).status_code == 200)
    assert eventually(lambda: http.get(admin_only, headers=bearer(promoted.access_token)).status_code == 401)
    assert http.get(admin_only, headers=bearer(as_admin)).status_code == 200

    assert http.request("PATCH", users, json={"role": "member"}, headers=bearer(admin.access_token)).ok
    assert eventually(lambda: http.get(admin_only, headers=bearer(as_admin)).status_code == 401)
    assert eventually(lambda: http.get(admin_only, headers=bearer(promoted.api_key)).status_code == 403)
    fresh = http.post(f"{platform.gateway}/auth/token", json=login).json()["access_token"]
    assert http.get(admin_only, headers=bearer(fresh)).status_code == 403


PLACEHOLDERS = {
    "key_id": "key_doesnotexist",
    "user_id": "user_doesnotexist",
    "invite_id": "inv_doesnotexist",
    "file_id": "file-doesnotexist",
    "batch_id": "batch_doesnotexist",
}


def concrete(path: str) -> str:
    """A templated path with ids that do not exist."""
    for name, value in PLACEHOLDERS.items():
        path = path.replace("{" + name + "}", value)
    return path


def test_every_documented_route_errs_cleanly(
    platform: RunningPlatform, http: Http, error_check: ErrorCheck, documents: Documents, admin: Admin
) -> None:
    """Each documented route, through the gateway and straight at its service: without credentials, with a
    body that is not JSON, with a JSON body of the wrong type, with ids that do not exist and with a method it does
    not take. Every answer is a 4xx (or success) in the route's shape with nothing leaked."""
    client = platform.new_client()
    before = len(error_check.seen)
    service_url = {name: platform.url(name) for name in ("auth", "llm", "jobs")}
    routes = documents.routes()
    for (method, path), service in routes.items():
        if service == "gateway":
            continue
        url_path = concrete(path)
        for base in (platform.gateway, service_url[service]):
            at_edge = base == platform.gateway
            credential = admin.access_token if at_edge or service != "jobs" else client.access_token
            anonymous = http.request(method, base + url_path)
            assert anonymous.status_code < 500
            for body in (b"{not json", b"[]", b'"a string"', b"null", b"1e999999"):
                answer = http.request(
                    method,
                    base + url_path,
                    data=body,
                    headers={"Content-Type": "application/json", **bearer(credential)},
                )
                assert answer.status_code < 500, (method, base, url_path, body, answer.text[:300])
            wrong = next(verb for verb in ("PATCH", "PUT", "DELETE", "POST", "GET") if (verb, path) not in routes)
            refused = http.request(wrong, base + url_path, headers=bearer(credential))
            assert refused.status_code in (401, 404, 405), (wrong, base, url_path, refused.status_code)
    unknown = {  # paths each process would own if they existed (another service's prefix is not its to shape)
        platform.gateway: ("/v1/nope", "/v1/messages/nope", "/auth/nope", "/nope", "/v1/files/a/b/c"),
        platform.url("llm"): ("/v1/nope", "/v1/messages/nope", "/nope"),
        platform.url("jobs"): ("/v1/nope", "/v1/files/a/b/c", "/nope"),
        platform.url("auth"): ("/auth/nope", "/nope"),
    }
    for base, paths in unknown.items():
        for path in paths:
            answer = http.get(base + path, headers=bearer(admin.access_token))
            assert answer.status_code in (401, 404, 405), (base, path, answer.status_code)
    checked = error_check.seen[before:]
    statuses = Counter(status for _, _, status in checked)
    assert {400, 401, 404, 405} <= set(statuses), statuses
    assert len(checked) >= 2 * len(routes)  # at least the wrong method, at the gateway and at the service


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_upstream_failures_leak_no_provider_detail(
    platform: RunningPlatform, http: Http, client: Client, path: str
) -> None:
    """The provider refusing our key (401), failing (500, 529), answering garbage or with a 400: the client gets a
    clean error in its API's shape and never the provider key (the ErrorCheck holds it as a forbidden value)."""
    model = "gpt-4o-mini" if path == "/v1/chat/completions" else "claude-3-5-haiku-latest"
    for knob in ("error=401", "error=500", "error=529", "error=400", "garbage", "error=403"):
        body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"hi #fake:{knob}"}]}
        answer = http.post(f"{platform.gateway}{path}", json=body, headers=bearer(client.api_key))
        assert answer.status_code >= 400, (knob, answer.text[:300])


def test_a_token_issued_in_the_second_of_a_disable_is_refused(
    platform: RunningPlatform, http: Http, admin: Admin, auth_signing_key: tuple[str, Ed25519PrivateKey]
) -> None:
    """A token auth could have issued just before a disable, in the same second, must be refused like older ones."""
    kid, key = auth_signing_key
    url = f"{platform.gateway}/v1/models"
    for _ in range(10):  # find a disable that started and ended within one clock second
        victim = platform.new_client()
        user_id = jwt.decode(victim.access_token, options={"verify_signature": False})["sub"]
        before = time.time()
        assert http.post(f"{platform.gateway}/auth/users/{user_id}/disable", headers=bearer(admin.access_token)).ok
        if int(before) == int(time.time()):
            break
    else:
        pytest.fail("no disable fitted in one clock second")
    older = forge(key, kid, user_id, iat=int(before) - 1)
    # the event reached every gateway worker once the older token is refused several times in a row
    assert eventually(lambda: all(http.get(url, headers=bearer(older)).status_code == 401 for _ in range(6)))
    same_second = forge(key, kid, user_id, iat=int(before))
    assert http.get(url, headers=bearer(same_second)).status_code == 401
