"""The model catalogue: public model names → provider deployments and prices, loaded from `models.yaml`."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MILLION = Decimal(1_000_000)


class Provider(StrEnum):
    """An upstream API family (also the `gen_ai.provider.name` value)."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class Operation(StrEnum):
    """What a deployment can do."""

    CHAT = "chat"
    EMBEDDINGS = "embeddings"


class Price(BaseModel):
    """USD per one million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)


class Target(BaseModel):
    """One upstream deployment behind a public name, chosen by weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Provider
    upstream_model: str = Field(min_length=1)
    weight: int = Field(1, ge=1)


class Deployment(BaseModel):
    """Where a public model name is served: its primary deployment, its other deployments and its fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    provider: Provider
    upstream_model: str = Field(min_length=1)
    weight: int = Field(1, ge=1)
    operation: Operation = Operation.CHAT
    created: int = 0
    price: Price | None = None
    # The most output tokens one call may ask for (the provider's own ceiling): larger `max_tokens` is a 400 here,
    # before a budget reservation or a provider call.
    max_output_tokens: int | None = Field(None, ge=1)
    deployments: tuple[Target, ...] = ()
    fallbacks: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _primary_from_deployments(cls, data: Any) -> Any:
        """`deployments:` alone is enough: the first one is the primary (it names the provider for the API)."""
        if isinstance(data, dict) and data.get("deployments") and "provider" not in data:
            first = data["deployments"][0]
            if isinstance(first, dict):
                data = {**data, "provider": first.get("provider"), "upstream_model": first.get("upstream_model")}
        return data

    @property
    def key(self) -> str:
        """The breaker's name for this upstream deployment (`provider:upstream_model`)."""
        return f"{self.provider.value}:{self.upstream_model}"

    def targets(self) -> tuple[Deployment, ...]:
        """Every upstream deployment of this name as a Deployment (the name's price and operation kept)."""
        if not self.deployments:
            return (self,)
        return tuple(
            self.model_copy(
                update={
                    "provider": t.provider,
                    "upstream_model": t.upstream_model,
                    "weight": t.weight,
                    "deployments": (),
                }
            )
            for t in self.deployments
        )

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        """The USD cost of a call at this deployment's price."""
        if self.price is None:
            return Decimal(0)
        return (self.price.input * input_tokens + self.price.output * output_tokens) / MILLION


class Catalog(BaseModel):
    """Every public model and the price-table version that prices them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    price_version: str = Field(min_length=1)
    models: dict[str, Deployment]

    @model_validator(mode="before")
    @classmethod
    def _merge_prices(cls, data: Any) -> Any:
        """Accept the file layout (`prices:` with `price_version` + per-model entries, and `models:`)."""
        if not isinstance(data, dict) or "prices" not in data:
            return data
        prices = dict(data.get("prices") or {})
        version = prices.pop("price_version", None)
        models = data.get("models")
        if not isinstance(models, dict) or not models:
            raise ValueError("models: at least one model is required")
        merged: dict[str, Any] = {}
        for name, entry in models.items():
            if not isinstance(entry, dict):
                raise ValueError(f"models.{name}: expected a mapping")
            if name not in prices:
                raise ValueError(f"prices.{name}: every model needs a price")
            merged[name] = {**entry, "name": name, "price": prices.pop(name)}
        if prices:
            raise ValueError(f"prices: no model named {', '.join(sorted(map(str, prices)))}")
        return {"price_version": version, "models": merged}

    @model_validator(mode="after")
    def _check_fallbacks(self) -> Catalog:
        """Fallbacks name other models of the same operation."""
        for name, deployment in self.models.items():
            for fallback in deployment.fallbacks:
                other = self.models.get(fallback)
                if other is None or fallback == name:
                    raise ValueError(f"models.{name}.fallbacks: no other model named {fallback}")
                if other.operation is not deployment.operation:
                    raise ValueError(f"models.{name}.fallbacks: {fallback} is not a {deployment.operation.value} model")
        return self

    def get(self, name: str) -> Deployment | None:
        """The deployment behind a public name, if any."""
        return self.models.get(name)


class CatalogError(RuntimeError):
    """The models file cannot be used; the message says where and why."""


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate the models file; a bad file raises CatalogError with a clear message."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read models file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"models file {path} is not valid YAML: {exc}") from exc
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise CatalogError(f"models file {path} is invalid: {problems}") from exc
