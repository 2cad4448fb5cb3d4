"""Every service's command line: `migrate` and `serve` (gunicorn with the kit's hooks)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import click

from .db import upgrade
from .settings import ServiceSettings


def raise_open_files_limit() -> None:
    """Thousands of long-lived client and upstream connections need more descriptors than the usual soft limit;
    gunicorn's workers inherit the raised limit through exec and fork."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def service_cli(
    name: str, *, app: str, load_settings: Callable[[], ServiceSettings], migrations_dir: Path | None = None
) -> click.Group:
    """A click group `parley-<name>` with `serve` and, for services with a database, `migrate`."""

    @click.group(name=f"parley-{name}", help=f"Parley {name} service.")
    def cli() -> None:
        pass

    if migrations_dir is not None:

        @cli.command(help="Apply the database migrations (Alembic) up to the newest.")
        def migrate() -> None:
            settings = load_settings()
            upgrade(migrations_dir, settings.database_url)  # type: ignore[attr-defined]
            click.echo(f"{name}: database at head")

    @cli.command(help="Run the service under gunicorn.")
    def serve() -> None:
        settings = load_settings()
        raise_open_files_limit()
        # prometheus_client picks multiprocess mode at import: the variable must be set, and the directory
        # emptied of a previous run's files, before gunicorn imports anything.
        metrics_dir = Path(settings.metrics_path)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:parley_kit.gunicorn_hooks",
            "--bind",
            settings.bind,
            "--workers",
            str(settings.workers),
            "--worker-class",
            settings.worker_class,
            "--threads",
            str(settings.threads),
            "--worker-connections",
            str(settings.worker_connections),
            "--name",
            f"parley-{name}",
            app,
        ]
        os.execv(sys.executable, argv)

    return cli
