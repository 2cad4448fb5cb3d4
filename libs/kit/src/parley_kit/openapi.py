"""OpenAPI documents that tell the truth about errors.

flask-openapi3 documents only the statuses a route lists, plus a 400 in its own shape (a JSON array of
`ValidationErrorModel`) that no Parley service ever sends. Clients and contract tests read the document, so every
operation here lists the errors it can answer — 400 always, 401/403 when it needs a bearer token, 404 when its path
names a resource, and whatever the route adds — each in the shape of its route (problem+json, OpenAI or Anthropic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Literal

from flask_openapi3 import OpenAPI
from pydantic import BaseModel

from .errors import ErrorShape


class FieldError(BaseModel):
    """One failed field of a 400."""

    loc: str
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, as every Parley service renders errors outside the OpenAI/Anthropic routes."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class OpenAIErrorDetail(BaseModel):
    """The inside of an OpenAI error."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error shape, on the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    """The inside of an Anthropic error."""

    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error shape, on /v1/messages."""

    type: Literal["error"]
    error: AnthropicErrorDetail


SHAPES: dict[ErrorShape, tuple[type[BaseModel], str]] = {
    ErrorShape.PROBLEM: (Problem, "application/problem+json"),
    ErrorShape.OPENAI: (OpenAIError, "application/json"),
    ErrorShape.ANTHROPIC: (AnthropicError, "application/json"),
}
REF = "#/components/schemas/{model}"


def error_responses(*statuses: int) -> dict[int, dict[str, str]]:
    """A route's extra error statuses for `responses=`; the body shape is filled in for the route's error shape."""
    return {status: {"description": HTTPStatus(status).phrase} for status in statuses}


def _secured(operation: dict[str, Any]) -> bool:
    return any(requirement for requirement in operation.get("security") or [])


def _has_path_parameter(operation: dict[str, Any]) -> bool:
    return any(parameter.get("in") == "path" for parameter in operation.get("parameters") or [])


def document_errors(spec: dict[str, Any], shape_for_path: Callable[[str], ErrorShape]) -> None:
    """Give every operation of `spec` its error responses in its route's shape (in place)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("ValidationErrorModel", None)  # flask-openapi3's; replaced below on every operation
    for model, _ in SHAPES.values():
        document = model.model_json_schema(ref_template=REF)
        schemas.update(document.pop("$defs", {}))
        schemas[model.__name__] = document
    for path, item in spec.get("paths", {}).items():
        model, media_type = SHAPES[shape_for_path(path)]
        content = {media_type: {"schema": {"$ref": REF.format(model=model.__name__)}}}
        for operation in item.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            statuses: Iterable[int] = [400]
            if _secured(operation):
                statuses = [*statuses, 401, 403]
            if _has_path_parameter(operation):
                statuses = [*statuses, 404]
            for status in statuses:
                responses.setdefault(str(status), {"description": HTTPStatus(status).phrase})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = content


class ServiceOpenAPI(OpenAPI):
    """flask-openapi3's app whose generated document lists each operation's errors in the route's shape."""

    def __init__(self, *args: Any, shape_for_path: Callable[[str], ErrorShape], **kwargs: Any) -> None:
        self.parley_shape_for_path = shape_for_path
        super().__init__(*args, **kwargs)

    def generate_spec_json(self) -> None:
        """The generated document, with the error responses made true."""
        super().generate_spec_json()
        document_errors(self.spec_json, self.parley_shape_for_path)
