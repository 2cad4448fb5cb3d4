"""`python -m parley_auth` / `parley-auth`: serve, migrate, create-admin, rotate-keys."""

from __future__ import annotations

from pathlib import Path

import click

from parley_kit.cli import service_cli
from parley_kit.db import Database
from parley_kit.errors import Conflict

from .settings import AuthSettings, load_settings


def _settings() -> AuthSettings:
    settings = load_settings()
    return settings


cli = service_cli(
    "auth",
    app="parley_auth:create_app()",
    load_settings=_settings,
    migrations_dir=Path(__file__).parent / "migrations",
)


@cli.command("create-admin", help="Create an admin account (fails if the email is taken).")
@click.option("--email", required=True)
@click.option("--password", required=True, prompt=True, hide_input=True, confirmation_prompt=True)
def create_admin(email: str, password: str) -> None:
    """Create an admin user."""
    from pydantic import TypeAdapter, ValidationError

    from . import service
    from .schemas import RegisterBody

    try:
        TypeAdapter(RegisterBody).validate_python({"email": email, "password": password})
    except ValidationError as exc:
        fields = ", ".join(str(error["loc"][0]) for error in exc.errors(include_input=False))
        raise click.ClickException(f"invalid {fields}") from exc
    database = Database(_settings().database_url)
    try:
        with database.transaction() as session:
            user = service.create_user(session, email=email, password=password, role="admin")
            user_id = user.id
    except Conflict as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        database.dispose()
    click.echo(f"auth: created admin {user_id}")


@cli.command("rotate-keys", help="Add a new signing key; it signs from now on and older keys keep verifying.")
def rotate_keys() -> None:
    """Add a signing key."""
    from .signing import add_signing_key

    database = Database(_settings().database_url)
    try:
        with database.transaction() as session:
            kid = add_signing_key(session).kid
    finally:
        database.dispose()
    click.echo(f"auth: new signing key {kid}")


if __name__ == "__main__":
    cli()
