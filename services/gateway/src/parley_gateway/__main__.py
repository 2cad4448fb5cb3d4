"""`python -m parley_gateway serve` (gunicorn, gevent workers). The gateway owns no database: no `migrate`."""

from __future__ import annotations

import functools
import resource
from collections.abc import Callable
from typing import Any

from parley_kit.cli import service_cli

from .settings import GatewaySettings


def raise_open_files_limit() -> None:
    """Thousands of client connections plus their upstream connections need more descriptors than the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _with_raised_limit(serve: Callable[..., Any]) -> Callable[..., Any]:
    """`serve` execs gunicorn, whose workers inherit the limit raised here."""

    @functools.wraps(serve)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raise_open_files_limit()
        return serve(*args, **kwargs)

    return wrapper


cli = service_cli("gateway", app="parley_gateway:create_app()", load_settings=GatewaySettings)
cli.commands["serve"].callback = _with_raised_limit(cli.commands["serve"].callback)  # type: ignore[arg-type]

if __name__ == "__main__":
    cli()
