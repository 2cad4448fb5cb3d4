"""`/docs`: one Swagger UI over every service's OpenAPI (auth, llm, jobs) with a selector; documents cached."""

from __future__ import annotations

import logging
import re
import threading
import time
from http import HTTPStatus
from typing import Any, Literal

import orjson
from flask import Response
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel

from parley_kit.errors import ServiceUnavailable
from parley_kit.http import ServiceClient

from .routing import Upstream, match

log = logging.getLogger(__name__)

SPEC_PATH = "/openapi/openapi.json"
SPEC_TIMEOUT = (1.0, 3.0)
DOCUMENTED = (Upstream.AUTH, Upstream.LLM, Upstream.JOBS)

# Swagger UI's assets are the ones flask-openapi3 already serves under /openapi/swagger/.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>Parley API</title>
<link rel="stylesheet" type="text/css" href="/openapi/swagger/css/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/openapi/swagger/js/swagger-ui-bundle.js"></script>
<script src="/openapi/swagger/js/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({
  urls: %(urls)s,
  "urls.primaryName": "llm",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout"
});
</script>
</body>
</html>
"""


class SpecPath(BaseModel):
    """Which service's OpenAPI document."""

    service: Literal["auth", "llm", "jobs"]


class SpecCache:
    """Each service's OpenAPI document, fetched on first use and kept `ttl` seconds; a stale copy beats none."""

    def __init__(self, clients: dict[Upstream, ServiceClient], *, ttl: float) -> None:
        self._clients = clients
        self._ttl = ttl
        self._documents: dict[Upstream, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, service: Upstream) -> bytes:
        """The service's OpenAPI JSON; 503 when it cannot be fetched and nothing is cached."""
        cached = self._documents.get(service)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        with self._lock:
            try:
                document = self._fetch(service)
            except Exception as exc:
                if cached is not None:
                    return cached[1]
                log.warning("could not fetch an OpenAPI document", extra={"error.type": type(exc).__name__})
                raise ServiceUnavailable(f"the {service.value} service's API description is unavailable") from exc
            self._documents[service] = (time.monotonic(), document)
            return document

    def _fetch(self, service: Upstream) -> bytes:
        status, body = self._clients[service].json("GET", SPEC_PATH, timeout=SPEC_TIMEOUT)
        if status != 200 or not isinstance(body, dict) or "openapi" not in body:
            raise ServiceUnavailable(f"{service.value} answered its OpenAPI document with {status}")
        return orjson.dumps(edge_view(body))


def edge_view(document: dict[str, Any]) -> dict[str, Any]:
    """A service's document as the gateway serves it: without the paths the edge refuses (internal auth routes
    answer 404 here), and with the errors the edge itself adds (429 past a rate limit, 413 past the body limit),
    in the shape the service documents for that operation's errors."""
    paths = {}
    for path, item in document.get("paths", {}).items():
        route = match(re.sub(r"\{[^}/]+\}", "x", path))  # a concrete path stands for the template
        if route is None:
            continue
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            error = responses.get("400")
            if error is None:
                continue
            added = [413] if "requestBody" in operation else []
            if route.limited:
                added.append(429)
            for status in added:
                responses.setdefault(str(status), {**error, "description": HTTPStatus(status).phrase})
        paths[path] = item
    return {**document, "paths": paths}


def docs_blueprint(specs: SpecCache) -> APIBlueprint:
    """The `/docs` page and the per-service documents it shows."""
    blueprint = APIBlueprint("docs", __name__, url_prefix="/docs", abp_tags=[Tag(name="docs")], doc_ui=False)
    urls = orjson.dumps([{"url": f"/docs/{service.value}.json", "name": service.value} for service in DOCUMENTED])
    page = (PAGE % {"urls": urls.decode()}).encode()

    @blueprint.get("")
    def index() -> Response:
        """Swagger UI with a selector over auth, llm and jobs."""
        return Response(page, mimetype="text/html")

    @blueprint.get("/<service>.json")
    def spec(path: SpecPath) -> Response:
        """One service's OpenAPI document (cached)."""
        return Response(specs.get(Upstream(path.service)), mimetype="application/json")

    return blueprint
