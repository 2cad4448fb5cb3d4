"""Thin routes: parse, call a service function inside the route's transaction, shape the response."""

from __future__ import annotations

from flask import Response, request
from flask_openapi3 import APIBlueprint, Tag

from parley_kit.app import model_response
from parley_kit.db import utcnow
from parley_kit.errors import BadRequest, Forbidden, Unauthorized
from parley_kit.openapi import error_responses

from . import service, throttle
from .context import auth_context, caller, interactive_caller
from .events import KEY_REVOKED, PASSWORD_CHANGED, ROLE_CHANGED, USER_DISABLED
from .schemas import (
    ActAsBody,
    ActAsOut,
    AdminUserOut,
    ApiKeyCreateBody,
    ApiKeyCreatedOut,
    ApiKeyList,
    ApiKeyOut,
    ApiKeyPath,
    InviteCreateBody,
    InviteCreatedOut,
    InviteList,
    InviteOut,
    InvitePath,
    Jwks,
    KeyExchangeBody,
    KeyExchangeOut,
    LoginBody,
    PasswordChangeBody,
    RefreshBody,
    RegisterBody,
    ServiceTokenBody,
    ServiceTokenOut,
    TokenPairOut,
    UserList,
    UserOut,
    UserPath,
    UserUpdateBody,
)
from .signing import public_jwks

BEARER = [{"bearer": []}]

accounts = APIBlueprint("accounts", __name__, url_prefix="/auth", abp_tags=[Tag(name="accounts")])
api_keys = APIBlueprint(
    "api_keys", __name__, url_prefix="/auth/api-keys", abp_tags=[Tag(name="api keys")], abp_security=BEARER
)
internal = APIBlueprint("internal", __name__, url_prefix="/auth", abp_tags=[Tag(name="service accounts")])
admin = APIBlueprint("admin", __name__, url_prefix="/auth/users", abp_tags=[Tag(name="admin")], abp_security=BEARER)
invites = APIBlueprint(
    "invites", __name__, url_prefix="/auth/invites", abp_tags=[Tag(name="admin")], abp_security=BEARER
)
keys = APIBlueprint("keys", __name__, abp_tags=[Tag(name="keys")])


def no_content() -> Response:
    """204."""
    return Response(status=204)


def _pair_out(pair: service.TokenPair) -> TokenPairOut:
    return TokenPairOut(access_token=pair.access_token, refresh_token=pair.refresh_token, expires_in=pair.expires_in)


def _refused_refresh() -> Unauthorized:
    return Unauthorized("invalid or expired refresh token", code="invalid_refresh_token")


# ----- accounts ---------------------------------------------------------------------------------------------------


@accounts.post("/register", responses={201: UserOut, **error_responses(403, 409)}, security=[])
def register(body: RegisterBody) -> Response:
    """Create an account: when registration is open, or with an unused invite code when it is by invite."""
    ctx = auth_context()
    with ctx.db.transaction() as session:
        user = service.register_user(
            session, settings=ctx.settings, email=str(body.email), password=body.password, invite_code=body.invite_code
        )
        out = UserOut.model_validate(user, from_attributes=True)
    return model_response(out, 201)


@accounts.post(
    "/token",
    responses={200: TokenPairOut, **error_responses(401, 429)},
    security=[],
    description="Throttled per account and per client address: past the limit, 429 with Retry-After, "
    "even for the right password, until the window passes.",
)
def login(body: LoginBody) -> Response:
    """Log in with email and password: an access token and a refresh token."""
    ctx = auth_context()
    address = throttle.client_address(
        request.remote_addr, request.headers.get("X-Forwarded-For"), ctx.settings.trusted_proxies
    )
    attempt = throttle.LoginAttempt(email=body.email, address=address)
    with ctx.db.transaction() as session:
        throttle.check(session, settings=ctx.settings, attempt=attempt)
        user = service.check_password(session, email=body.email, password=body.password)
        if user is not None:
            throttle.forget_account(session, attempt=attempt)
            pair = service.start_session(session, settings=ctx.settings, signer=ctx.signer, user=user)
    if user is None:
        # Its own transaction: the failure must be counted although this request answers with an error.
        with ctx.db.transaction() as session:
            throttle.record_failure(session, settings=ctx.settings, attempt=attempt)
        raise service.bad_credentials()
    return model_response(_pair_out(pair))


@accounts.post("/refresh", responses={200: TokenPairOut, **error_responses(401)}, security=[])
def refresh(body: RefreshBody) -> Response:
    """Spend a refresh token for a new pair; a replayed one revokes its whole family."""
    ctx = auth_context()
    with ctx.db.transaction() as session:
        pair = service.rotate_refresh_token(
            session, settings=ctx.settings, signer=ctx.signer, refresh_token=body.refresh_token
        )
    if pair is None:  # raised only now, so a family revocation is committed first
        raise _refused_refresh()
    return model_response(_pair_out(pair))


@accounts.post("/logout", responses={204: None}, security=[])
def logout(body: RefreshBody) -> Response:
    """Revoke the session (refresh-token family) the token belongs to."""
    with auth_context().db.transaction() as session:
        service.end_session(session, refresh_token=body.refresh_token)
    return no_content()


@accounts.get("/me", responses={200: UserOut}, security=BEARER)
def me() -> Response:
    """The caller's own account."""
    identity = caller()
    with auth_context().db.transaction() as session:
        out = UserOut.model_validate(service.user_for(session, identity), from_attributes=True)
    return model_response(out)


@accounts.post("/password", responses={204: None}, security=BEARER)
def change_password(body: PasswordChangeBody) -> Response:
    """Change the caller's password; every session (refresh-token family) ends."""
    identity = interactive_caller()
    ctx = auth_context()
    with ctx.db.transaction() as session:
        user = service.user_for(session, identity)
        service.change_password(
            session, user=user, current_password=body.current_password, new_password=body.new_password
        )
    ctx.events.publish(PASSWORD_CHANGED, {"user_id": identity.subject})
    return no_content()


# ----- API keys ---------------------------------------------------------------------------------------------------


@api_keys.post("", responses={201: ApiKeyCreatedOut})
def create_api_key(body: ApiKeyCreateBody) -> Response:
    """Create an API key; the key itself is in this response only."""
    identity = interactive_caller()
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise BadRequest("expires_at must be in the future", param="expires_at")
    ctx = auth_context()
    with ctx.db.transaction() as session:
        user = service.user_for(session, identity)
        created = service.create_api_key(
            session,
            settings=ctx.settings,
            user=user,
            name=body.name,
            expires_at=body.expires_at,
            allowed_models=body.allowed_models,
        )
        out = ApiKeyCreatedOut(
            id=created.row.id,
            name=created.row.name,
            prefix=created.row.prefix,
            key=created.key,
            created_at=created.row.created_at,
            expires_at=created.row.expires_at,
        )
    return model_response(out, 201)


@api_keys.get("", responses={200: ApiKeyList})
def list_api_keys() -> Response:
    """The caller's active API keys (never the keys themselves)."""
    identity = interactive_caller()
    with auth_context().db.transaction() as session:
        user = service.user_for(session, identity)
        rows = service.list_api_keys(session, user_id=user.id)
        out = ApiKeyList(data=[ApiKeyOut.model_validate(row, from_attributes=True) for row in rows])
    return model_response(out)


@api_keys.delete("/<key_id>", responses={204: None})
def revoke_api_key(path: ApiKeyPath) -> Response:
    """Revoke one of the caller's keys and tell the gateways to drop it."""
    identity = interactive_caller()
    ctx = auth_context()
    with ctx.db.transaction() as session:
        user = service.user_for(session, identity)
        row = service.revoke_api_key(session, user_id=user.id, key_id=path.key_id)
        event = {"key_id": row.id, "user_id": row.user_id}
    ctx.events.publish(KEY_REVOKED, event)  # after the commit: subscribers must never see a revocation undone
    return no_content()


# ----- service accounts -------------------------------------------------------------------------------------------


@internal.post("/service-token", responses={200: ServiceTokenOut, **error_responses(401)}, security=[])
def service_token(body: ServiceTokenBody) -> Response:
    """Client credentials → a service token (`sub: svc:<client_id>`, roles `[service]`)."""
    ctx = auth_context()
    with ctx.db.transaction() as session:
        issued = service.service_token(
            session,
            settings=ctx.settings,
            signer=ctx.signer,
            client_id=body.client_id,
            client_secret=body.client_secret,
        )
    return model_response(ServiceTokenOut(access_token=issued.access_token, expires_in=issued.expires_in))


@internal.post("/internal/key-exchange", responses={200: KeyExchangeOut}, security=BEARER)
def key_exchange(body: KeyExchangeBody) -> Response:
    """An API key → a short-lived token for its owner (services only)."""
    service.require_service(caller())
    ctx = auth_context()
    with ctx.db.transaction() as session:
        issued = service.exchange_api_key(session, settings=ctx.settings, signer=ctx.signer, key=body.key)
    assert issued.user_id is not None and issued.key_id is not None
    return model_response(
        KeyExchangeOut(
            access_token=issued.access_token,
            expires_in=issued.expires_in,
            user_id=issued.user_id,
            key_id=issued.key_id,
        )
    )


@internal.post("/internal/act-as", responses={200: ActAsOut, **error_responses(404)}, security=BEARER)
def act_as(body: ActAsBody) -> Response:
    """A token for a user carrying the calling service as `act` (services only)."""
    identity = caller()
    ctx = auth_context()
    with ctx.db.transaction() as session:
        issued = service.act_as(
            session,
            settings=ctx.settings,
            signer=ctx.signer,
            caller=identity,
            user_id=body.user_id,
            key_id=body.key_id,
        )
    return model_response(ActAsOut(access_token=issued.access_token, expires_in=issued.expires_in))


# ----- admin ------------------------------------------------------------------------------------------------------


def _require_admin(session_user_role: str) -> None:
    if session_user_role != "admin":
        raise Forbidden("admins only", code="admin_required")


@admin.get("", responses={200: UserList})
def list_users() -> Response:
    """Every user (admins only)."""
    identity = interactive_caller()
    with auth_context().db.transaction() as session:
        _require_admin(service.user_for(session, identity).role)
        out = UserList(data=[AdminUserOut.model_validate(u, from_attributes=True) for u in service.list_users(session)])
    return model_response(out)


@admin.patch("/<user_id>", responses={200: AdminUserOut})
def update_user(path: UserPath, body: UserUpdateBody) -> Response:
    """Set a user's role and/or disable or re-enable them (admins only); disabling ends their sessions, and a new
    role ends the user's tokens with the old one at the gateways."""
    identity = interactive_caller()
    ctx = auth_context()
    with ctx.db.transaction() as session:
        _require_admin(service.user_for(session, identity).role)
        change = service.update_user(
            session, user_id=path.user_id, acting_admin_id=identity.subject, role=body.role, disabled=body.disabled
        )
        out = AdminUserOut.model_validate(change.user, from_attributes=True)
    if change.newly_disabled:
        ctx.events.publish(USER_DISABLED, {"user_id": path.user_id})
    if change.role_changed:  # tokens carry the role: the gateways refuse those with another one
        ctx.events.publish(ROLE_CHANGED, {"user_id": path.user_id, "role": change.user.role})
    return model_response(out)


@admin.post("/<user_id>/disable", responses={204: None})
def disable_user(path: UserPath) -> Response:
    """Disable a user, end their sessions and tell the gateways (admins only; same as PATCH `{disabled: true}`)."""
    identity = interactive_caller()
    ctx = auth_context()
    with ctx.db.transaction() as session:
        _require_admin(service.user_for(session, identity).role)
        changed = service.disable_user(session, user_id=path.user_id, acting_admin_id=identity.subject)
    if changed:
        ctx.events.publish(USER_DISABLED, {"user_id": path.user_id})
    return no_content()


# ----- invites ----------------------------------------------------------------------------------------------------


@invites.post("", responses={201: InviteCreatedOut})
def create_invite(body: InviteCreateBody) -> Response:
    """Create a single-use registration code (admins only); the code is in this response only."""
    identity = interactive_caller()
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise BadRequest("expires_at must be in the future", param="expires_at")
    ctx = auth_context()
    with ctx.db.transaction() as session:
        admin_user = service.user_for(session, identity)
        _require_admin(admin_user.role)
        created = service.create_invite(session, settings=ctx.settings, admin=admin_user, expires_at=body.expires_at)
        out = InviteCreatedOut(
            id=created.row.id,
            code=created.code,
            created_at=created.row.created_at,
            expires_at=created.row.expires_at,
        )
    return model_response(out, 201)


@invites.get("", responses={200: InviteList})
def list_invites() -> Response:
    """Every invite, used or not (admins only; never the codes)."""
    identity = interactive_caller()
    with auth_context().db.transaction() as session:
        _require_admin(service.user_for(session, identity).role)
        rows = service.list_invites(session)
        out = InviteList(data=[InviteOut.model_validate(row, from_attributes=True) for row in rows])
    return model_response(out)


@invites.delete("/<invite_id>", responses={204: None})
def revoke_invite(path: InvitePath) -> Response:
    """Withdraw an unused invite (admins only)."""
    identity = interactive_caller()
    with auth_context().db.transaction() as session:
        _require_admin(service.user_for(session, identity).role)
        service.revoke_invite(session, invite_id=path.invite_id)
    return no_content()


# ----- keys -------------------------------------------------------------------------------------------------------


@keys.get("/.well-known/jwks.json", responses={200: Jwks}, security=[])
def jwks() -> Response:
    """The public keys that verify access tokens."""
    with auth_context().db.transaction() as session:
        body = Jwks.model_validate(public_jwks(session))
    response = model_response(body)
    response.headers["Cache-Control"] = "public, max-age=60"
    return response


BLUEPRINTS = (accounts, api_keys, internal, admin, invites, keys)
