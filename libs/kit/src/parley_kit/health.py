"""`/livez` (the process answers) and `/readyz` (the dependencies it cannot work without answer)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from flask import Flask, Response

log = logging.getLogger(__name__)

Check = Callable[[], None]


class Health:
    """Named readiness checks; each raises when its dependency is not usable."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add_check(self, name: str, check: Check) -> None:
        """Register a dependency that must answer before the service takes traffic."""
        self._checks[name] = check

    def run(self) -> tuple[bool, dict[str, str]]:
        """Run every check; report each as ok or a short failure, never the exception text (it may hold a URL)."""
        results: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                log.warning("readiness check failed", extra={"check": name, "error.type": type(exc).__name__})
                results[name] = f"failing: {type(exc).__name__}"
        return all(value == "ok" for value in results.values()), results


def init_app(app: Flask) -> Health:
    """Serve the probes and return the Health object so the service can add its checks."""
    health = Health()
    app.extensions["parley_health"] = health

    def livez() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    def readyz() -> Response:
        ready, checks = health.run()
        body = {"status": "ok" if ready else "unavailable", "checks": checks}
        return Response(orjson.dumps(body), status=200 if ready else 503, mimetype="application/json")

    app.add_url_rule("/livez", "livez", livez, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    return health
