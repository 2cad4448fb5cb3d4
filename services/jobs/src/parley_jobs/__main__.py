"""`parley-jobs` / `python -m parley_jobs`: serve, migrate, worker."""

from __future__ import annotations

import click
from parley_kit.cli import service_cli
from parley_kit.db import upgrade

from . import MIGRATIONS, ensure_sqlite_directory
from .settings import load_settings

# `migrate` is our own: the SQLite default needs its directory before Alembic can open the file.
cli = service_cli("jobs", app="parley_jobs:create_app()", load_settings=load_settings)


@cli.command(help="Apply the database migrations (Alembic) up to the newest.")
def migrate() -> None:
    """Create the SQLite directory if needed, then upgrade to head."""
    settings = load_settings()
    ensure_sqlite_directory(settings.database_url)
    upgrade(MIGRATIONS, settings.database_url)
    click.echo("jobs: database at head")


@cli.command(help="Run a batch worker: the outbox relay and a RabbitMQ consumer of batch items.")
def worker() -> None:
    """Run until SIGTERM/SIGINT."""
    from .worker import run_worker

    run_worker(load_settings())


if __name__ == "__main__":
    cli()
