"""Access-token verification against a real JWKS endpoint (the `token_mint` fixture) and the attacks it refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flask import Flask

from parley_kit import tokens
from parley_kit.errors import Unauthorized
from parley_kit.testing import TokenMint


class CountingMint(TokenMint):
    """A TokenMint that counts the JWKS requests it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.jwks_requests = 0
        mint = self
        base = self._server.RequestHandlerClass

        class Counting(base):  # type: ignore[valid-type, misc]
            def do_GET(self) -> None:
                with lock:
                    mint.jwks_requests += 1
                super().do_GET()

        lock = threading.Lock()
        self._server.RequestHandlerClass = Counting


@pytest.fixture
def counting_mint() -> Iterator[CountingMint]:
    """A fresh mint whose JWKS requests are counted."""
    mint = CountingMint()
    yield mint
    mint.close()


@pytest.fixture
def foreign_mint() -> Iterator[TokenMint]:
    """Another signer: its tokens must never verify against the first mint's JWKS."""
    mint = TokenMint()
    yield mint
    mint.close()


def verifier_for(mint: TokenMint, **kwargs: object) -> tokens.TokenVerifier:
    """A verifier trusting the mint's JWKS, as a service builds it from settings."""
    return tokens.TokenVerifier(mint.jwks_url, issuer=mint.issuer, audience=mint.audience, **kwargs)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(mint: TokenMint, **overrides: object) -> dict:
    """A full, valid claim set (keys set to None are left out)."""
    now = int(time.time())
    claims = {
        "iss": mint.issuer,
        "aud": mint.audience,
        "sub": "user-1",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "roles": ["member"],
        **overrides,
    }
    return {key: value for key, value in claims.items() if value is not None}


def refused(verifier: tokens.TokenVerifier, token: str, code: str = "invalid_token") -> Unauthorized:
    """Assert the token is refused with a 401 and return the error."""
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(token)
    assert caught.value.status == 401
    assert caught.value.code == code
    return caught.value


def test_valid_token_gives_the_identity(token_mint: TokenMint) -> None:
    verifier = verifier_for(token_mint)
    token = token_mint.mint(
        "user-42", roles=("member", "admin"), key_id="key-7", models=["gpt-x", "claude-y"], act={"sub": "svc:jobs"}
    )
    identity = verifier.verify(token)
    assert identity.subject == "user-42"
    assert identity.roles == ("member", "admin")
    assert identity.key_id == "key-7"
    assert identity.models == ("gpt-x", "claude-y")
    assert identity.actor == "svc:jobs"
    assert identity.has_role("admin") and not identity.has_role("service")
    assert identity.expires_at > time.time()
    assert len(identity.token_id) == 32
    assert not identity.is_service


def test_service_token_identity(token_mint: TokenMint) -> None:
    identity = verifier_for(token_mint).verify(token_mint.mint("svc:jobs", roles=("service",)))
    assert identity.is_service
    assert identity.key_id is None and identity.models is None and identity.actor is None


def test_alg_none_refused(token_mint: TokenMint) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": token_mint.kid}
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_for(token_mint)).encode())}."
    error = refused(verifier_for(token_mint), token)
    assert error.detail == "token algorithm not accepted"


@pytest.mark.parametrize("key_form", ["pem", "raw"])
def test_hs256_signed_with_the_public_key_refused(token_mint: TokenMint, key_form: str) -> None:
    """The classic key-confusion attack: HMAC keyed with the (public) verification key."""
    public = token_mint.private_key.public_key()
    secret = (
        public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        if key_form == "pem"
        else public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": token_mint.kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_for(token_mint)).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    refused(verifier_for(token_mint), f"{signing_input}.{b64(signature)}")


def test_header_alg_eddsa_with_tampered_payload_refused(token_mint: TokenMint) -> None:
    token = token_mint.mint("user-1")
    header, _payload, signature = token.split(".")
    forged = b64(json.dumps(claims_for(token_mint, sub="admin", roles=["admin"])).encode())
    refused(verifier_for(token_mint), f"{header}.{forged}.{signature}")


def test_foreign_key_with_the_same_kid_refused(token_mint: TokenMint, foreign_mint: TokenMint) -> None:
    foreign_mint.kid = token_mint.kid
    refused(verifier_for(token_mint), foreign_mint.mint("user-1"))


def test_unknown_kid_refused(token_mint: TokenMint, foreign_mint: TokenMint) -> None:
    error = refused(verifier_for(token_mint), foreign_mint.mint("user-1"))
    assert error.detail == "unknown signing key"


def test_missing_kid_refused(token_mint: TokenMint) -> None:
    token = jwt.encode(claims_for(token_mint), token_mint.private_key, algorithm="EdDSA")
    assert refused(verifier_for(token_mint), token).detail == "token has no key id"


def test_unknown_kids_fetch_the_jwks_at_most_once_per_cooldown(counting_mint: CountingMint) -> None:
    verifier = verifier_for(counting_mint, refetch_cooldown=30.0)
    verifier.verify(counting_mint.mint("user-1"))
    assert counting_mint.jwks_requests == 1

    def attack(results: list[int]) -> None:
        for _ in range(25):
            header = {"alg": "EdDSA", "typ": "JWT", "kid": uuid.uuid4().hex}
            token = jwt.encode(claims_for(counting_mint), counting_mint.private_key, algorithm="EdDSA", headers=header)
            try:
                verifier.verify(token)
            except Unauthorized:
                results.append(1)

    results: list[int] = []
    threads = [threading.Thread(target=attack, args=(results,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200  # every random kid refused ...
    assert counting_mint.jwks_requests == 1  # ... without a single extra JWKS fetch


def test_unknown_kid_refetches_after_the_cooldown(counting_mint: CountingMint) -> None:
    verifier = verifier_for(counting_mint, refetch_cooldown=0.2)
    stranger = jwt.encode(claims_for(counting_mint), counting_mint.private_key, algorithm="EdDSA", headers={"kid": "x"})
    refused(verifier, stranger)
    refused(verifier, stranger)
    assert counting_mint.jwks_requests == 1
    started = time.monotonic()
    deadline = started + 5
    while counting_mint.jwks_requests < 2 and time.monotonic() < deadline:
        refused(verifier, stranger)
    assert counting_mint.jwks_requests == 2
    assert time.monotonic() - started >= 0.15


def test_first_burst_of_valid_tokens_fetches_once(counting_mint: CountingMint) -> None:
    verifier = verifier_for(counting_mint)
    minted = [counting_mint.mint(f"user-{n}") for n in range(16)]
    identities: list[tokens.Identity] = []
    threads = [threading.Thread(target=lambda t=t: identities.append(verifier.verify(t))) for t in minted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i.subject for i in identities) == sorted(f"user-{n}" for n in range(16))
    assert counting_mint.jwks_requests == 1


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"aud": "someone-else"}, "invalid_token"),
        ({"aud": ["other", "another"]}, "invalid_token"),
        ({"iss": "evil-issuer"}, "invalid_token"),
        ({"exp": int(time.time()) - 60}, "token_expired"),  # beyond the 10 s leeway
        ({"typ": "refresh"}, "invalid_token"),
        ({"typ": None}, "invalid_token"),
        ({"jti": None}, "invalid_token"),
        ({"exp": None}, "invalid_token"),
        ({"iat": None}, "invalid_token"),
        ({"sub": None}, "invalid_token"),
        ({"iat": int(time.time()) + 3600}, "invalid_token"),  # issued in the future
    ],
)
def test_bad_claims_refused(token_mint: TokenMint, overrides: dict, code: str) -> None:
    claims = claims_for(token_mint, **overrides)
    if "exp" in overrides and overrides["exp"] is not None:
        claims["iat"] = overrides["exp"] - 300
    token = jwt.encode(claims, token_mint.private_key, algorithm="EdDSA", headers={"kid": token_mint.kid})
    refused(verifier_for(token_mint), token, code)


def test_expired_within_leeway_accepted(token_mint: TokenMint) -> None:
    token = token_mint.mint("user-1", ttl=-3)
    assert verifier_for(token_mint, leeway=10).verify(token).subject == "user-1"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJFZERTQSJ9.x.y", "\u00e9\u00e9.\u00e9.\u00e9", "x" * 10_000],
)
def test_malformed_strings_refused(token_mint: TokenMint, token: str) -> None:
    refused(verifier_for(token_mint), token)


def test_garbage_payload_with_a_known_kid_refused(token_mint: TokenMint) -> None:
    header = b64(json.dumps({"alg": "EdDSA", "kid": token_mint.kid}).encode())
    refused(verifier_for(token_mint), f"{header}.%%%.AAAA")


def test_verified_token_cache_skips_reverification(token_mint: TokenMint, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = verifier_for(token_mint)
    token = token_mint.mint("user-1")
    first = verifier.verify(token)
    decodes: list[str] = []
    real_decode = jwt.decode
    monkeypatch.setattr(tokens.jwt, "decode", lambda *a, **k: decodes.append("x") or real_decode(*a, **k))
    assert verifier.verify(token) is first
    assert decodes == []
    verifier.forget_all()
    again = verifier.verify(token)
    assert again == first and again is not first
    assert decodes == ["x"]


def test_cache_does_not_bypass_the_expected_type(token_mint: TokenMint) -> None:
    verifier = verifier_for(token_mint)
    token = token_mint.mint("user-1")
    verifier.verify(token)
    with pytest.raises(Unauthorized):
        verifier.verify(token, expected_type="refresh")


def test_cache_stays_bounded(token_mint: TokenMint) -> None:
    verifier = verifier_for(token_mint, cache_size=5)
    for number in range(12):
        verifier.verify(token_mint.mint(f"user-{number}"))
    assert len(verifier._verified) <= 5


def test_unreachable_jwks_refuses_rather_than_failing(token_mint: TokenMint) -> None:
    verifier = tokens.TokenVerifier(
        "http://127.0.0.1:9/.well-known/jwks.json", issuer=token_mint.issuer, audience=token_mint.audience
    )
    assert refused(verifier, token_mint.mint("user-1")).detail == "unknown signing key"


def test_authenticate_reads_the_bearer_header(token_mint: TokenMint) -> None:
    verifier = verifier_for(token_mint)
    app = Flask(__name__)
    token = token_mint.mint("user-9")
    with app.test_request_context(headers={"Authorization": f"Bearer {token}"}):
        from flask import request

        assert tokens.authenticate(request, verifier).subject == "user-9"
    for headers in ({}, {"Authorization": f"Basic {token}"}, {"Authorization": "Bearer "}, {"Authorization": token}):
        with app.test_request_context(headers=headers):
            from flask import request

            with pytest.raises(Unauthorized) as caught:
                tokens.authenticate(request, verifier)
            assert caught.value.code == "missing_token"
