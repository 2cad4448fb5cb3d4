"""`python -m parley_llm serve|migrate|check-models`."""

from __future__ import annotations

import click

from parley_kit.cli import service_cli

from . import MIGRATIONS_DIR
from .catalog import CatalogError, load_catalog
from .settings import load_settings

cli = service_cli("llm", app="parley_llm:create_app()", load_settings=load_settings, migrations_dir=MIGRATIONS_DIR)


@cli.command("check-models", help="Validate the models file and list its models.")
def check_models() -> None:
    """Load the models file the way the service does and print what it routes."""
    settings = load_settings()
    try:
        catalog = load_catalog(settings.models_file)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"price version {catalog.price_version}")
    for name, deployment in catalog.models.items():
        targets = ", ".join(
            f"{t.provider.value} {t.upstream_model}" + (f" weight {t.weight}" if len(deployment.targets()) > 1 else "")
            for t in deployment.targets()
        )
        fallbacks = f" → {', '.join(deployment.fallbacks)}" if deployment.fallbacks else ""
        click.echo(f"{name}: {targets} ({deployment.operation.value}){fallbacks}")


if __name__ == "__main__":
    cli()
