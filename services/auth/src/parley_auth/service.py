"""Users, passwords, refresh-token families, API keys and service accounts: plain functions that never commit."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from parley_kit.db import utcnow
from parley_kit.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from parley_kit.ids import new_id
from parley_kit.tokens import SERVICE_ROLE, Identity

from .models import ApiKey, Invite, RefreshToken, User
from .settings import AuthSettings
from .signing import Signer

log = logging.getLogger(__name__)

API_KEY_PREFIX = "sk-pl-"
INVITE_PREFIX = "inv-"
API_KEY_DISPLAY_LENGTH = 12
SERVICE_SUBJECT_PREFIX = "svc:"
LAST_USED_RESOLUTION = timedelta(minutes=1)

# One answer for every failed login, so a caller cannot tell an unknown email from a wrong password.
BAD_CREDENTIALS = "invalid email or password"


# glibc's mallopt(M_MMAP_THRESHOLD): allocations from this size on are mapped and unmapped, never kept in the heap.
_M_MMAP_THRESHOLD = -3
_MAP_FROM_BYTES = 1024 * 1024


@cache
def password_hasher() -> PasswordHasher:
    """argon2id at OWASP's minimum (19 MiB, t=2, p=1).

    Each hash's 19 MiB goes back to the system when it is done: glibc would otherwise raise its mapping threshold
    past 19 MiB after the first free and keep the block in the heap, ~21 MB of every auth worker's RSS after one login
    (~150 MB with eight threads hashing at once). The price: each hash maps fresh pages, ~4 ms more CPU per login (17
    -> 21 ms here). A C library without `mallopt` (musl, macOS) keeps its own ways."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        if not ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MAP_FROM_BYTES):
            log.warning("could not set the C library's mapping threshold: password hashes may stay in the heap")
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


@cache
def dummy_hash() -> str:
    """A hash to verify against for unknown users, so their login costs what a real one does."""
    return password_hasher().hash(secrets.token_urlsafe(16))


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def hash_api_key(key: str, *, pepper: str) -> str:
    """HMAC-SHA256(pepper, key) as hex: a database leak alone does not let anyone test candidate keys."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def new_api_key() -> str:
    """`sk-pl-` + 256 random bits, url-safe."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a login or a refresh hands back."""

    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token with its lifetime (and, for key exchange, whose key it speaks for)."""

    access_token: str
    expires_in: int
    user_id: str | None = None
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedInvite:
    """A new invite's row and its code, which exists only in this response."""

    row: Invite
    code: str


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """A new key's row and its plaintext, which exists only in this response."""

    row: ApiKey
    key: str


# ----- users ------------------------------------------------------------------------------------------------------


def create_user(session: Session, *, email: str, password: str, role: str = "member") -> User:
    """Register a user; the email is stored lower-cased and must be unused (409)."""
    email = email.strip().lower()
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("an account with this email already exists", code="email_taken")
    user = User(
        id=new_id("user"),
        email=email,
        password_hash=password_hasher().hash(password),
        role=role,
        disabled=False,
        created_at=utcnow(),
    )
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:  # a concurrent registration won the race
        raise Conflict("an account with this email already exists", code="email_taken") from exc
    return user


def ensure_admin(session: Session, *, email: str, password: str) -> User | None:
    """Create the first admin unless that email exists; returns the new user, or None when it already did."""
    if session.scalar(select(User.id).where(User.email == email.strip().lower())) is not None:
        return None
    return create_user(session, email=email, password=password, role="admin")


def check_password(session: Session, *, email: str, password: str) -> User | None:
    """The active user behind an email and password, or None; an unknown email costs as much as a wrong password."""
    user = session.scalars(select(User).where(User.email == email.strip().lower())).first()
    hasher = password_hasher()
    try:
        hasher.verify(user.password_hash if user else dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)
    return user


def bad_credentials() -> Unauthorized:
    """The one answer to every failed login."""
    return Unauthorized(BAD_CREDENTIALS, code="invalid_credentials")


def user_for(session: Session, identity: Identity) -> User:
    """The active user a user token speaks for (401 when the account is gone or disabled since it was issued)."""
    if identity.subject.startswith(SERVICE_SUBJECT_PREFIX):
        raise Forbidden("a service account has no user profile", code="user_token_required")
    user = session.get(User, identity.subject)
    if user is None or user.disabled:
        raise Unauthorized("the account is disabled or no longer exists", code="account_disabled")
    return user


def change_password(session: Session, *, user: User, current_password: str, new_password: str) -> None:
    """Replace the password after checking the current one (401), and end every session of the user."""
    try:
        password_hasher().verify(user.password_hash, current_password)
    except (VerificationError, InvalidHashError) as exc:
        raise Unauthorized("the current password is wrong", code="invalid_credentials") from exc
    user.password_hash = password_hasher().hash(new_password)
    _revoke_user_sessions(session, user.id)


def _revoke_user_sessions(session: Session, user_id: str) -> None:
    session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def list_users(session: Session) -> list[User]:
    """Every user, oldest first."""
    return list(session.scalars(select(User).order_by(User.created_at, User.id)))


@dataclass(frozen=True)
class UserChange:
    """What an admin's update changed: the gateways are told of a disable and of a role change."""

    user: User
    newly_disabled: bool  # this call disabled the user
    role_changed: bool


def update_user(
    session: Session, *, user_id: str, acting_admin_id: str, role: str | None, disabled: bool | None
) -> UserChange:
    """Set a user's role and/or disabled flag.

    Disabling ends every session of the user; enabling again does not bring those sessions back (the revoked
    refresh tokens stay revoked: the user logs in anew). An admin cannot demote or disable themselves, so the
    last admin cannot lock everyone out by accident.
    """
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    role_changed = role is not None and role != user.role
    if user_id == acting_admin_id and (disabled or role_changed):
        raise BadRequest("admins cannot disable or demote themselves", param="user_id")
    if role is not None:
        user.role = role
    newly_disabled = bool(disabled) and not user.disabled
    if disabled is not None:
        user.disabled = disabled
    if newly_disabled:
        _revoke_user_sessions(session, user_id)
    return UserChange(user, newly_disabled, role_changed)


def disable_user(session: Session, *, user_id: str, acting_admin_id: str) -> bool:
    """Disable a user and end their sessions; True when this call disabled them (False if already disabled)."""
    return update_user(
        session, user_id=user_id, acting_admin_id=acting_admin_id, role=None, disabled=True
    ).newly_disabled


# ----- invites ----------------------------------------------------------------------------------------------------


def create_invite(
    session: Session, *, settings: AuthSettings, admin: User, expires_at: datetime | None
) -> CreatedInvite:
    """A single-use registration code; only its SHA-256 is stored (256 random bits: nothing to brute-force)."""
    code = INVITE_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = Invite(
        id=new_id("inv"),
        code_hash=_sha256(code),
        created_by=admin.id,
        created_at=now,
        expires_at=expires_at or now + timedelta(seconds=settings.invite_ttl),
    )
    session.add(row)
    session.flush()
    return CreatedInvite(row, code)


def list_invites(session: Session) -> list[Invite]:
    """Every invite, newest first (never the codes: they are not stored)."""
    return list(session.scalars(select(Invite).order_by(Invite.created_at.desc(), Invite.id)))


def revoke_invite(session: Session, *, invite_id: str) -> None:
    """Withdraw an unused invite; 404 when there is none (or it was used or withdrawn already)."""
    row = session.get(Invite, invite_id)
    if row is None or row.used_at is not None or row.revoked_at is not None:
        raise NotFound("no such unused invite", code="invite_not_found")
    row.revoked_at = utcnow()


def redeem_invite(session: Session, *, code: str) -> Invite:
    """Spend an invite for a registration in this transaction; 403 for any unusable code.

    One conditional UPDATE: of two registrations racing with the same code, exactly one changes the row. It runs
    before the account is created, so a caller without a valid code cannot probe which emails are registered.
    """
    now = utcnow()
    code_hash = _sha256(code)
    result = session.execute(
        update(Invite)
        .where(
            Invite.code_hash == code_hash,
            Invite.used_at.is_(None),
            Invite.revoked_at.is_(None),
            Invite.expires_at > now,
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise Forbidden("the invite code is invalid, used or expired", code="invalid_invite")
    return session.scalars(select(Invite).where(Invite.code_hash == code_hash)).one()


def register_user(
    session: Session, *, settings: AuthSettings, email: str, password: str, invite_code: str | None
) -> User:
    """Register a member as the registration mode allows: open, closed (403) or with an invite code (403 without)."""
    if settings.registration == "closed":
        raise Forbidden("registration is closed", code="registration_closed")
    invite = None
    if settings.registration == "invite":
        if invite_code is None:
            raise Forbidden("registration needs an invite code", code="invite_required")
        invite = redeem_invite(session, code=invite_code)
    user = create_user(session, email=email, password=password)
    if invite is not None:
        invite.used_by = user.id
    return user


# ----- sessions: access and refresh tokens ------------------------------------------------------------------------


def _user_access_token(
    session: Session, *, signer: Signer, user: User, ttl: int, key: ApiKey | None = None, actor: str | None = None
) -> str:
    return signer.access_token(
        session,
        subject=user.id,
        roles=[user.role],
        ttl=ttl,
        key_id=key.id if key else None,
        models=key.allowed_models if key else None,
        act={"sub": actor} if actor else None,
    )


def _issue_refresh_token(session: Session, *, settings: AuthSettings, user_id: str, family_id: str) -> str:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        RefreshToken(
            id=new_id("rt"),
            user_id=user_id,
            family_id=family_id,
            token_hash=_sha256(token),  # 256 random bits: a fast hash is enough, nothing to brute-force
            created_at=now,
            expires_at=now + timedelta(seconds=settings.refresh_token_ttl),
        )
    )
    return token


def start_session(session: Session, *, settings: AuthSettings, signer: Signer, user: User) -> TokenPair:
    """A new refresh-token family and an access token for a user who just proved their password."""
    refresh = _issue_refresh_token(session, settings=settings, user_id=user.id, family_id=new_id("fam"))
    access = _user_access_token(session, signer=signer, user=user, ttl=settings.access_token_ttl)
    return TokenPair(access, refresh, settings.access_token_ttl)


def _revoke_family(session: Session, family_id: str) -> None:
    session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def rotate_refresh_token(
    session: Session, *, settings: AuthSettings, signer: Signer, refresh_token: str
) -> TokenPair | None:
    """Spend a refresh token for a new pair; None when refused.

    Presenting a token already spent (or revoked) revokes its whole family: either the holder or a thief replayed
    it, and we cannot tell which (RFC 9700 §4.14.2). The caller commits that revocation before answering 401.
    """
    query = select(RefreshToken).where(RefreshToken.token_hash == _sha256(refresh_token))
    row = session.scalars(query.with_for_update()).first()  # two concurrent rotations: the second sees used_at
    if row is None:
        return None
    now = utcnow()
    if row.used_at is not None or row.revoked_at is not None:
        _revoke_family(session, row.family_id)
        return None
    if row.expires_at <= now:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        _revoke_family(session, row.family_id)
        return None
    row.used_at = now
    refresh = _issue_refresh_token(session, settings=settings, user_id=user.id, family_id=row.family_id)
    access = _user_access_token(session, signer=signer, user=user, ttl=settings.access_token_ttl)
    return TokenPair(access, refresh, settings.access_token_ttl)


def end_session(session: Session, *, refresh_token: str) -> None:
    """Revoke the family of a refresh token (logout); an unknown token is ignored, as RFC 7009 asks."""
    family_id = session.scalar(select(RefreshToken.family_id).where(RefreshToken.token_hash == _sha256(refresh_token)))
    if family_id is not None:
        _revoke_family(session, family_id)


# ----- API keys ---------------------------------------------------------------------------------------------------


def create_api_key(
    session: Session,
    *,
    settings: AuthSettings,
    user: User,
    name: str,
    expires_at: datetime | None,
    allowed_models: list[str] | None,
) -> CreatedApiKey:
    """Mint a key for the user; only its HMAC is stored."""
    key = new_api_key()
    row = ApiKey(
        id=new_id("key"),
        user_id=user.id,
        name=name,
        prefix=key[:API_KEY_DISPLAY_LENGTH],
        key_hash=hash_api_key(key, pepper=settings.api_key_pepper_secret),
        created_at=utcnow(),
        expires_at=expires_at,
        allowed_models=allowed_models,
    )
    session.add(row)
    session.flush()
    return CreatedApiKey(row, key)


def list_api_keys(session: Session, *, user_id: str) -> list[ApiKey]:
    """The user's keys that are not revoked, newest first."""
    query = (
        select(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return list(session.scalars(query))


def revoke_api_key(session: Session, *, user_id: str, key_id: str) -> ApiKey:
    """Revoke one of the user's keys; 404 for a key that is not theirs or already revoked."""
    row = session.get(ApiKey, key_id)
    if row is None or row.user_id != user_id or row.revoked_at is not None:
        raise NotFound("no such API key", code="api_key_not_found")
    row.revoked_at = utcnow()
    return row


def _usable(key: ApiKey, now: datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


def exchange_api_key(session: Session, *, settings: AuthSettings, signer: Signer, key: str) -> IssuedToken:
    """A short-lived access token for the owner of a valid API key; 401 (one answer) for any unusable key."""
    refused = Unauthorized("invalid API key", code="invalid_api_key")
    if not key.startswith(API_KEY_PREFIX):
        raise refused
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(key, pepper=settings.api_key_pepper_secret))
    ).first()
    now = utcnow()
    if row is None or not _usable(row, now):
        raise refused
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        raise refused
    ttl = settings.key_token_ttl
    if row.expires_at is not None:
        ttl = min(ttl, int((row.expires_at - now).total_seconds()))
    if ttl <= 0:
        raise refused
    # One conditional write a minute at most: a busy key must not turn every exchange into a row update.
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == row.id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    token = _user_access_token(session, signer=signer, user=user, ttl=ttl, key=row)
    return IssuedToken(token, ttl, user_id=user.id, key_id=row.id)


# ----- service accounts -------------------------------------------------------------------------------------------


def service_token(
    session: Session, *, settings: AuthSettings, signer: Signer, client_id: str, client_secret: str
) -> IssuedToken:
    """A service token for valid client credentials (compared in constant time, even for unknown clients)."""
    expected = settings.service_clients.get(client_id)
    matches = hmac.compare_digest(
        _sha256(client_secret).encode(), _sha256(expected if expected is not None else secrets.token_hex(16)).encode()
    )
    if expected is None or not matches:
        raise Unauthorized("invalid client credentials", code="invalid_client")
    ttl = settings.access_token_ttl
    token = signer.access_token(session, subject=SERVICE_SUBJECT_PREFIX + client_id, roles=[SERVICE_ROLE], ttl=ttl)
    return IssuedToken(token, ttl)


def require_service(identity: Identity) -> None:
    """Only a service account's own token may call internal endpoints (403 otherwise)."""
    if not identity.is_service or not identity.subject.startswith(SERVICE_SUBJECT_PREFIX):
        raise Forbidden("a service token is required", code="service_token_required")


def act_as(
    session: Session, *, settings: AuthSettings, signer: Signer, caller: Identity, user_id: str, key_id: str | None
) -> IssuedToken:
    """A user token carrying `act: {sub: <calling service>}`; 404 for an unknown or disabled user or unusable key."""
    require_service(caller)
    user = session.get(User, user_id)
    if user is None or user.disabled:
        raise NotFound("no such active user", code="user_not_found")
    key = None
    if key_id is not None:
        key = session.get(ApiKey, key_id)
        if key is None or key.user_id != user.id or not _usable(key, utcnow()):
            raise NotFound("no such active API key for this user", code="api_key_not_found")
    ttl = settings.access_token_ttl
    token = _user_access_token(session, signer=signer, user=user, ttl=ttl, key=key, actor=caller.subject)
    return IssuedToken(token, ttl, user_id=user.id, key_id=key.id if key else None)
