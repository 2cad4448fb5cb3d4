"""`parley-jobs` / `python -m parley_jobs`: serve, migrate, worker."""

from __future__ import annotations

from parley_kit.cli import service_cli

from . import MIGRATIONS
from .settings import load_settings

cli = service_cli("jobs", app="parley_jobs:create_app()", load_settings=load_settings, migrations_dir=MIGRATIONS)


@cli.command(help="Run a batch worker: the outbox relay and a RabbitMQ consumer of batch items.")
def worker() -> None:
    """Run until SIGTERM/SIGINT."""
    from .worker import run_worker

    run_worker(load_settings())


if __name__ == "__main__":
    cli()
