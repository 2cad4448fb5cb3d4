"""A tiny service built with the kit: the app the error, health and metrics tests exercise (also under gunicorn)."""

from __future__ import annotations

import os
import time

from flask_openapi3 import APIBlueprint
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from parley_kit.app import create_service_app
from parley_kit.cli import service_cli
from parley_kit.errors import Conflict, ErrorShape
from parley_kit.settings import ServiceSettings


class SampleSettings(ServiceSettings):
    """Settings of the sample service (`KITSAMPLE_*`)."""

    model_config = SettingsConfigDict(
        env_prefix="KITSAMPLE_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "kitsample"
    worker_class: str = "sync"  # type: ignore[assignment]
    item_delay_s: float = 0.0


class ItemPath(BaseModel):
    """An item in the path."""

    item_id: str = Field(min_length=1, max_length=64)


class ItemBody(BaseModel):
    """A new item."""

    name: str = Field(min_length=1, max_length=40)
    quantity: int = Field(ge=1)


def shape_for_path(path: str) -> ErrorShape:
    """OpenAI shape under /v1/chat, Anthropic under /v1/messages, problem+json elsewhere."""
    if path.startswith("/v1/chat/"):
        return ErrorShape.OPENAI
    if path.startswith("/v1/messages"):
        return ErrorShape.ANTHROPIC
    return ErrorShape.PROBLEM


def create_app(settings: SampleSettings | None = None):  # type: ignore[no-untyped-def]
    """The sample app: one route per error shape plus an item route used for metrics."""
    settings = settings or SampleSettings()
    app, health = create_service_app(settings, __name__, title="kit sample", shape_for_path=shape_for_path)
    api = APIBlueprint("sample", __name__, url_prefix="/v1")

    @api.get("/items/<item_id>")
    def get_item(path: ItemPath) -> dict:
        if settings.item_delay_s:
            time.sleep(settings.item_delay_s)  # keeps a sync worker busy so the other one takes the next request
        return {"id": path.item_id, "pid": os.getpid()}

    for prefix in ("/items", "/chat/completions", "/messages"):
        endpoint = prefix.strip("/").replace("/", "_")

        def create(body: ItemBody) -> tuple[dict, int]:
            return {"name": body.name, "quantity": body.quantity}, 201

        def boom() -> dict:
            raise RuntimeError("secret-token-abc at /srv/parley/app.py line 12")

        def conflict() -> dict:
            raise Conflict("already there", headers={"Retry-After": "3"})

        def database_down() -> dict:
            from sqlalchemy import create_engine

            # Nothing listens on port 1: the database is down (or not yet up), as during a restart or a failover.
            with create_engine("postgresql+psycopg://parley@127.0.0.1:1/parley").connect():
                return {}

        api.post(prefix, endpoint=f"create_{endpoint}")(create)
        api.get(f"{prefix}/boom", endpoint=f"boom_{endpoint}")(boom)
        api.get(f"{prefix}/conflict", endpoint=f"conflict_{endpoint}")(conflict)
        api.get(f"{prefix}/database-down", endpoint=f"database_down_{endpoint}")(database_down)

    app.register_api(api)
    app.extensions["sample_health"] = health
    return app


cli = service_cli("kitsample", app="kit_sample_app:create_app()", load_settings=SampleSettings)

if __name__ == "__main__":
    cli()
