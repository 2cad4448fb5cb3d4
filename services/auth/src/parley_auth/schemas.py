"""Request and response bodies, declared once: flask-openapi3 validates with them and documents them at /openapi."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, EmailStr, Field, StringConstraints, model_validator

Password = Annotated[str, Field(min_length=8, max_length=256, description="8 to 256 characters")]
# Names are stripped before the length check, so the document says what that means: at least one non-space.
ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"\S")]
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class RegisterBody(BaseModel):
    """A new account; `invite_code` is required when registration is by invite only."""

    email: EmailStr = Field(max_length=320)
    password: Password
    invite_code: str | None = Field(None, min_length=1, max_length=200)


class LoginBody(BaseModel):
    """Credentials; any failure past the shape is the same 401."""

    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=256)


class PasswordChangeBody(BaseModel):
    """The current password and its replacement."""

    current_password: str = Field(min_length=1, max_length=256)
    new_password: Password


class RefreshBody(BaseModel):
    """An opaque refresh token from a login or an earlier refresh."""

    refresh_token: str = Field(min_length=1, max_length=200)


class ServiceTokenBody(BaseModel):
    """Client credentials of a service account."""

    client_id: str = Field(min_length=1, max_length=100)
    client_secret: str = Field(min_length=1, max_length=500)


class KeyExchangeBody(BaseModel):
    """An API key a client presented to the gateway."""

    key: str = Field(min_length=1, max_length=200)


class ActAsBody(BaseModel):
    """Whom a service acts for, and optionally through which of their keys (its models and budget then apply)."""

    user_id: Identifier
    key_id: Identifier | None = None


class ApiKeyCreateBody(BaseModel):
    """A new API key: a name, an optional expiry (aware, in the future) and optional allowed models."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"\S")]
    expires_at: AwareDatetime | None = None
    allowed_models: list[ModelName] | None = Field(None, min_length=1, max_length=200)


class ApiKeyPath(BaseModel):
    """An API key id in the path."""

    key_id: Identifier


class UserPath(BaseModel):
    """A user id in the path."""

    user_id: Identifier


class UserUpdateBody(BaseModel):
    """What an admin changes about a user: the role, the disabled flag, or both."""

    # The document states the validator's rule: at least one of the two, and not null.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["role"], "properties": {"role": {"enum": ["admin", "member"]}}},
                {"required": ["disabled"], "properties": {"disabled": {"type": "boolean"}}},
            ]
        },
    )

    role: Literal["admin", "member"] | None = None
    disabled: bool | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> UserUpdateBody:
        if self.role is None and self.disabled is None:
            raise ValueError("give role, disabled or both")
        return self


class InviteCreateBody(BaseModel):
    """A new invite; without `expires_at` it lasts the configured invite lifetime."""

    expires_at: AwareDatetime | None = None


class InvitePath(BaseModel):
    """An invite id in the path."""

    invite_id: Identifier


class InviteOut(BaseModel):
    """An invite as listed: never the code."""

    id: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None
    revoked_at: datetime | None


class InviteCreatedOut(BaseModel):
    """A new invite; `code` is shown this once and never again."""

    id: str
    code: str
    created_at: datetime
    expires_at: datetime


class InviteList(BaseModel):
    """Every invite (admins only)."""

    object: Literal["list"] = "list"
    data: list[InviteOut]


class UserOut(BaseModel):
    """A user as the user sees themselves."""

    id: str
    email: str
    role: str
    created_at: datetime


class AdminUserOut(UserOut):
    """A user as an admin sees them."""

    disabled: bool


class UserList(BaseModel):
    """Every user (admins only)."""

    object: Literal["list"] = "list"
    data: list[AdminUserOut]


class TokenPairOut(BaseModel):
    """An access token and the refresh token that renews it."""

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: int


class ServiceTokenOut(BaseModel):
    """A service account's access token."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: int


class KeyExchangeOut(BaseModel):
    """A short-lived user token standing for an API key."""

    access_token: str
    expires_in: int
    user_id: str
    key_id: str


class ActAsOut(BaseModel):
    """A user token carrying the calling service as `act`."""

    access_token: str
    expires_in: int


class ApiKeyOut(BaseModel):
    """An API key as listed: never the key or its hash."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None


class ApiKeyCreatedOut(BaseModel):
    """A new API key; `key` is shown this once and never again."""

    id: str
    name: str
    prefix: str
    key: str
    created_at: datetime
    expires_at: datetime | None


class ApiKeyList(BaseModel):
    """The caller's active API keys."""

    object: Literal["list"] = "list"
    data: list[ApiKeyOut]


class Jwk(BaseModel):
    """A public Ed25519 key."""

    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str
    kid: str
    alg: Literal["EdDSA"]
    use: Literal["sig"]


class Jwks(BaseModel):
    """The keys that verify access tokens."""

    keys: list[Jwk]
