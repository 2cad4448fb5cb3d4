"""Ed25519 signing keys: creation, rotation, the published JWKS, and signing access tokens with the newest key."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from parley_kit.db import Database, utcnow
from parley_kit.ids import new_id
from parley_kit.tokens import ACCESS, ALGORITHMS, TokenVerifier

from .models import SigningKey
from .settings import AuthSettings

# Any constant works: it only has to be the same in every process that bootstraps this database.
BOOTSTRAP_LOCK_ID = 0x5041524C4559  # "PARLEY"


def bootstrap_lock(session: Session) -> None:
    """Serialise start-up bootstrapping across workers and processes for the rest of the transaction.

    PostgreSQL takes a transaction-scoped advisory lock; SQLite needs nothing, since the kit begins every
    transaction IMMEDIATE, which already admits one writer at a time.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": BOOTSTRAP_LOCK_ID})


def add_signing_key(session: Session) -> SigningKey:
    """Generate a new Ed25519 key; being the newest, it signs from now on while older keys keep verifying."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = SigningKey(kid=new_id("kid"), private_key_pem=pem, created_at=utcnow())
    session.add(key)
    session.flush()
    return key


def newest_signing_key(session: Session) -> SigningKey | None:
    """The key that signs: the newest one not retired (kid breaks ties so every process picks the same)."""
    return session.scalars(
        select(SigningKey)
        .where(SigningKey.retired_at.is_(None))
        .order_by(SigningKey.created_at.desc(), SigningKey.kid.desc())
        .limit(1)
    ).first()


def ensure_signing_key(session: Session) -> SigningKey:
    """Make sure a signing key exists; safe when several workers start at once (call after `bootstrap_lock`)."""
    return newest_signing_key(session) or add_signing_key(session)


def public_jwks(session: Session) -> dict[str, list[dict[str, str]]]:
    """The JWKS of every non-retired key: OKP/Ed25519 public keys with `kid`, `alg: EdDSA`, `use: sig`."""
    keys = session.scalars(
        select(SigningKey).where(SigningKey.retired_at.is_(None)).order_by(SigningKey.created_at.desc())
    ).all()
    published = []
    for key in keys:
        private_key = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
        public = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key()))  # type: ignore[arg-type]
        published.append({**public, "kid": key.kid, "alg": "EdDSA", "use": "sig"})
    return {"keys": published}


class Signer:
    """Signs access tokens with the newest key; parsed private keys are cached by kid (keys never change)."""

    def __init__(self, settings: AuthSettings) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._parsed: dict[str, Ed25519PrivateKey] = {}
        self._lock = threading.Lock()

    def access_token(self, session: Session, *, subject: str, roles: list[str], ttl: int, **claims: Any) -> str:
        """An EdDSA access token for `subject`, valid `ttl` seconds, with optional `key_id`/`models`/`act`."""
        key = newest_signing_key(session)
        if key is None:
            raise RuntimeError("no signing key: the start-up bootstrap did not run")
        now = int(time.time())
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "typ": ACCESS,
            "roles": roles,
            **{name: value for name, value in claims.items() if value is not None},
        }
        return jwt.encode(payload, self._private_key(key), algorithm=ALGORITHMS[0], headers={"kid": key.kid})

    def _private_key(self, key: SigningKey) -> Ed25519PrivateKey:
        parsed = self._parsed.get(key.kid)
        if parsed is None:
            loaded = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise RuntimeError(f"signing key {key.kid} is not Ed25519")
            with self._lock:
                parsed = self._parsed.setdefault(key.kid, loaded)
        return parsed


class LocalJwks:
    """Stands in for the kit verifier's HTTP client: answers the JWKS request from this service's own database.

    Auth verifies the tokens it signed with the same code every other service uses, without calling itself.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def json(self, method: str, path: str, **_kwargs: Any) -> tuple[int, Any]:
        """(200, JWKS) for the verifier's refresh; reads the keys in a short transaction of its own."""
        with self._database.transaction() as session:
            return 200, public_jwks(session)


def local_verifier(settings: AuthSettings, database: Database) -> TokenVerifier:
    """A kit TokenVerifier whose keys come straight from the database (a short cooldown: no network to spare)."""
    return TokenVerifier(
        "local://auth/.well-known/jwks.json",
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        refetch_cooldown=1.0,
        client=LocalJwks(database),  # type: ignore[arg-type]
    )
