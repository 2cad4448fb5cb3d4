"""What one auth process holds (built by the app factory after fork) and how a route reaches it."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app, request

from parley_kit.db import Database
from parley_kit.errors import Forbidden
from parley_kit.tokens import Identity, TokenVerifier, authenticate

from .events import IdentityEvents
from .settings import AuthSettings
from .signing import Signer

EXTENSION = "parley_auth"


@dataclass(frozen=True, slots=True)
class AuthContext:
    """The process's settings, database, signer, verifier and event publisher."""

    settings: AuthSettings
    db: Database
    signer: Signer
    verifier: TokenVerifier
    events: IdentityEvents


def auth_context() -> AuthContext:
    """The context of the app serving this request."""
    return current_app.extensions[EXTENSION]


def caller() -> Identity:
    """The verified identity behind the request's bearer token (401 without a valid one)."""
    return authenticate(request, auth_context().verifier)


def interactive_caller() -> Identity:
    """A user's own token: not a service's, nor one minted from an API key or for a service acting as the user."""
    identity = caller()
    if identity.key_id is not None or identity.actor is not None:
        raise Forbidden("this needs the user's own login token", code="user_token_required")
    return identity
