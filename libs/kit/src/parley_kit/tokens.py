"""Access-token verification against auth's cached JWKS (RFC 8725: pinned algorithms, checked iss/aud/exp/typ)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import jwt
from flask import Request

from .errors import Unauthorized
from .http import ServiceClient

log = logging.getLogger(__name__)

ACCESS = "access"
SERVICE_ROLE = "service"
ALGORITHMS = ("EdDSA",)
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti", "typ"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified access token speaks for."""

    subject: str
    roles: tuple[str, ...]
    token_id: str
    expires_at: int
    key_id: str | None = None
    actor: str | None = None
    models: tuple[str, ...] | None = None

    @property
    def is_service(self) -> bool:
        """A service account's own token (client credentials), not a user's."""
        return SERVICE_ROLE in self.roles and self.actor is None

    def has_role(self, role: str) -> bool:
        """Whether the token carries the role."""
        return role in self.roles


def identity_from_claims(claims: dict) -> Identity:
    """Build an Identity from verified claims."""
    act = claims.get("act")
    models = claims.get("models")
    return Identity(
        subject=str(claims["sub"]),
        roles=tuple(claims.get("roles") or ()),
        token_id=str(claims["jti"]),
        expires_at=int(claims["exp"]),
        key_id=claims.get("key_id"),
        actor=act.get("sub") if isinstance(act, dict) else None,
        models=tuple(models) if isinstance(models, list) else None,
    )


class TokenVerifier:
    """Verifies EdDSA access tokens; keys come from the JWKS, refetched on an unknown `kid` once per cooldown.

    PyJWKClient refetches on every unknown kid, which lets an attacker make us hammer auth: hence our own cache.
    A verified token is remembered until it expires, so the hot path pays for the signature check once.
    """

    def __init__(
        self,
        jwks_url: str,
        *,
        issuer: str,
        audience: str,
        leeway: int = 10,
        refetch_cooldown: float = 30.0,
        cache_size: int = 50_000,
        client: ServiceClient | None = None,
    ) -> None:
        base, _, path = jwks_url.partition("://")
        host, _, rest = path.partition("/")
        self._client = client or ServiceClient(f"{base}://{host}", name="auth", connect_timeout=1.0, read_timeout=3.0)
        self._jwks_path = "/" + rest
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._cooldown = refetch_cooldown
        self._cache_size = cache_size
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()
        # Keyed by (expected type, token): a token verified as one type must never pass as another from the cache.
        self._verified: dict[tuple[str, str], Identity] = {}

    def verify(self, token: str, *, expected_type: str = ACCESS) -> Identity:
        """Return the token's identity or raise Unauthorized with a reason safe to show."""
        known = self._verified.get((expected_type, token))
        if known is not None and known.expires_at + self._leeway > time.time():
            return known
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token", code="invalid_token") from exc
        if header.get("alg") not in ALGORITHMS:
            raise Unauthorized("token algorithm not accepted", code="invalid_token")
        key = self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(ALGORITHMS),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid token", code="invalid_token") from exc
        if claims.get("typ") != expected_type:
            raise Unauthorized("wrong token type", code="invalid_token")
        identity = identity_from_claims(claims)
        self._remember((expected_type, token), identity)
        return identity

    def _key(self, kid: object) -> jwt.PyJWK:
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id", code="invalid_token")
        key = self._keys.get(kid)
        if key is None:
            self._refresh()
            key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("unknown signing key", code="invalid_token")
        return key

    def _refresh(self) -> None:
        """Refetch the JWKS unless we did within the cooldown (one fetch at a time)."""
        with self._lock:
            if time.monotonic() - self._fetched_at < self._cooldown:
                return
            self._fetched_at = time.monotonic()
            try:
                status, body = self._client.json("GET", self._jwks_path)
                if status != 200 or not isinstance(body, dict):
                    raise ValueError(f"JWKS answered {status}")
                keys = {}
                for item in body.get("keys", []):
                    if item.get("kid") and item.get("alg") in ALGORITHMS:
                        keys[item["kid"]] = jwt.PyJWK.from_dict(item)
                self._keys = keys
            except Exception:
                log.warning("could not refresh the JWKS", exc_info=True)

    def _remember(self, key: tuple[str, str], identity: Identity) -> None:
        if len(self._verified) >= self._cache_size:
            now = time.time()
            self._verified = {t: i for t, i in self._verified.items() if i.expires_at > now}
            if len(self._verified) >= self._cache_size:
                self._verified.pop(next(iter(self._verified)))
        self._verified[key] = identity

    def forget_all(self) -> None:
        """Drop every remembered verification (e.g. after a revocation event)."""
        self._verified = {}


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer …` header, if any."""
    return parse_bearer(request.headers.get("Authorization", ""))


def parse_bearer(value: str) -> str | None:
    """The token of an `Authorization` header's value if it is `Bearer …`."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(request: Request, verifier: TokenVerifier) -> Identity:
    """The verified identity behind the request's bearer token, or 401."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing bearer token", code="missing_token")
    return verifier.verify(token)
