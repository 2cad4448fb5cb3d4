"""`python -m parley_gateway serve` (gunicorn, gevent workers). The gateway owns no database: no `migrate`."""

from __future__ import annotations

from parley_kit.cli import service_cli

from .settings import GatewaySettings

cli = service_cli("gateway", app="parley_gateway:create_app()", load_settings=GatewaySettings)

if __name__ == "__main__":
    cli()
