"""Ledger routes: own usage, the admin aggregate (JSON or CSV) and budgets (admins set; owners may read)."""

from __future__ import annotations

import csv
import io
import math
import re
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Literal

import orjson
from flask import Response, g, request
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from parley_kit.errors import BadRequest, Forbidden, NotFound
from parley_kit.tokens import Identity, authenticate

from . import budgets, service
from .budgets import Period, Scope
from .views import LlmState

ADMIN_ROLE = "admin"
CSV_FIELDS = ["date", "model", "requests", "input_tokens", "output_tokens", "cost_usd"]


class UsageQuery(BaseModel):
    """Optional UTC day range (inclusive) and the output format."""

    start: date | None = None
    end: date | None = None
    format: Literal["json", "csv"] = "json"


class UsageRow(BaseModel):
    """Usage of one model on one UTC day (and by one user, in the admin aggregate)."""

    date: str
    user_id: str | None = None
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageList(BaseModel):
    """`GET /v1/usage` and `GET /v1/usage/all`."""

    # `?format=csv` answers the same rows as a CSV file.
    model_config = ConfigDict(openapi_extra={"content": {"text/csv": {"schema": {"type": "string"}}}})

    object: str = "list"
    data: list[UsageRow]


# A limit as text is a plain decimal with at most 9 places, up to 1e9; a JSON number (a binary float) is rounded to
# 9 places. The document states both, so every value it allows is accepted and nothing else.
DECIMAL_TEXT = r"^(1000000000(\.0{1,9})?|[0-9]{1,9}(\.[0-9]{1,9})?)$"
MAX_LIMIT_USD = Decimal("1e9")


def _limit_usd(value: object) -> object:
    """Text must match DECIMAL_TEXT; a finite number becomes a Decimal of at most 9 places (bool is not a number)."""
    if isinstance(value, str):
        if not re.fullmatch(DECIMAL_TEXT, value):
            raise ValueError("a decimal number with at most 9 places, such as 12.50")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError("a finite number")
        number = Decimal(repr(value))
        # Out of range is refused by the bounds below; quantizing 1e300 would overflow the decimal context (a 500).
        return number.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN) if abs(number) <= MAX_LIMIT_USD else number
    return value


LimitUsd = Annotated[
    Decimal,
    BeforeValidator(_limit_usd),
    Field(ge=0, le=MAX_LIMIT_USD, decimal_places=9),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": 1e9},
                {"type": "string", "pattern": DECIMAL_TEXT},
            ],
            "description": "US dollars; a number is rounded to 9 decimal places",
        }
    ),
]


class BudgetIn(BaseModel):
    """A budget's limit and period."""

    limit_usd: LimitUsd
    period: Period = Period.MONTH


class BudgetOut(BaseModel):
    """A budget as it stands now."""

    scope: Scope
    subject_id: str
    period: Period
    limit_usd: float
    spent_usd: float
    reserved_usd: float
    remaining_usd: float
    period_start: str


class BudgetList(BaseModel):
    """`GET /v1/budgets`."""

    object: str = "list"
    data: list[BudgetOut]


class BudgetsQuery(BaseModel):
    """Optional scope filter."""

    scope: Scope | None = None


class UserPath(BaseModel):
    """A user id."""

    user_id: str = Field(min_length=1, max_length=128)


class KeyPath(BaseModel):
    """An API key id."""

    key_id: str = Field(min_length=1, max_length=128)


def register_ledger_routes(app: OpenAPI, state: LlmState) -> None:
    """Mount `/v1/usage…` and `/v1/budgets…`; every one needs a verified bearer token."""
    bp = APIBlueprint(
        "ledger", __name__, url_prefix="/v1", abp_tags=[Tag(name="ledger")], abp_security=[{"bearer": []}]
    )

    @bp.before_request
    def _authenticate() -> None:
        g.identity = authenticate(request, state.verifier)

    def usage_response(query: UsageQuery, *, user_id: str | None) -> Response:
        if query.start and query.end and query.start > query.end:
            raise BadRequest("start must not be after end", param="start")
        with state.db.transaction() as session:
            rows = service.usage_by_day(
                session, user_id=user_id, start=query.start, end=query.end, by_user=user_id is None
            )
        if query.format == "csv":
            return csv_response(rows, ["date", "user_id", *CSV_FIELDS[1:]] if user_id is None else CSV_FIELDS)
        return Response(orjson.dumps({"object": "list", "data": rows}), mimetype="application/json")

    @bp.get("/usage", responses={200: UsageList})
    def usage(query: UsageQuery) -> Response:
        """The caller's usage aggregated by UTC day and model (`?format=csv` for a CSV file)."""
        return usage_response(query, user_id=g.identity.subject)

    @bp.get("/usage/all", responses={200: UsageList})
    def usage_all(query: UsageQuery) -> Response:
        """Everyone's usage by UTC day, user and model (admins only; `?format=csv` for a CSV file)."""
        require_admin(g.identity)
        return usage_response(query, user_id=None)

    @bp.get("/budgets", responses={200: BudgetList})
    def list_budgets(query: BudgetsQuery) -> Response:
        """Every budget (admins only)."""
        require_admin(g.identity)
        with state.db.transaction() as session:
            data = [budgets.describe(b) for b in budgets.list_budgets(session, scope=query.scope)]
        return Response(orjson.dumps({"object": "list", "data": data}), mimetype="application/json")

    def put(scope: Scope, subject_id: str, body: BudgetIn) -> Response:
        require_admin(g.identity)
        with state.db.transaction() as session:
            budget = budgets.put_budget(
                session, scope=scope, subject_id=subject_id, limit_usd=body.limit_usd, period=body.period
            )
            data = budgets.describe(budget)
        state.ledger.directory.invalidate()
        return Response(orjson.dumps(data), mimetype="application/json")

    def get(scope: Scope, subject_id: str) -> Response:
        with state.db.transaction() as session:
            budget = budgets.get_budget(session, scope=scope, subject_id=subject_id)
            data = budgets.describe(budget) if budget else None
        if data is None:
            raise NotFound(f"no budget for this {scope.value}", code="budget_not_found")
        return Response(orjson.dumps(data), mimetype="application/json")

    def delete(scope: Scope, subject_id: str) -> Response:
        require_admin(g.identity)
        with state.db.transaction() as session:
            found = budgets.delete_budget(session, scope=scope, subject_id=subject_id)
        if not found:
            raise NotFound(f"no budget for this {scope.value}", code="budget_not_found")
        state.ledger.directory.invalidate()
        return Response(status=204)

    @bp.put("/budgets/users/<user_id>", responses={200: BudgetOut})
    def put_user_budget(path: UserPath, body: BudgetIn) -> Response:
        """Set a user's budget (admins only)."""
        return put(Scope.USER, path.user_id, body)

    @bp.put("/budgets/keys/<key_id>", responses={200: BudgetOut})
    def put_key_budget(path: KeyPath, body: BudgetIn) -> Response:
        """Set an API key's budget (admins only)."""
        return put(Scope.KEY, path.key_id, body)

    @bp.get("/budgets/users/<user_id>", responses={200: BudgetOut})
    def get_user_budget(path: UserPath) -> Response:
        """A user's budget (admins, or the user; anyone else gets the 404 of a missing budget, not a 403)."""
        if g.identity.subject != path.user_id:
            require_admin_or_hide(g.identity, Scope.USER)
        return get(Scope.USER, path.user_id)

    @bp.get("/budgets/keys/<key_id>", responses={200: BudgetOut})
    def get_key_budget(path: KeyPath) -> Response:
        """An API key's budget (admins, or a caller using that key; anyone else gets the 404 of a missing budget)."""
        if g.identity.key_id != path.key_id:
            require_admin_or_hide(g.identity, Scope.KEY)
        return get(Scope.KEY, path.key_id)

    @bp.delete("/budgets/users/<user_id>", responses={204: None})
    def delete_user_budget(path: UserPath) -> Response:
        """Remove a user's budget (admins only)."""
        return delete(Scope.USER, path.user_id)

    @bp.delete("/budgets/keys/<key_id>", responses={204: None})
    def delete_key_budget(path: KeyPath) -> Response:
        """Remove an API key's budget (admins only)."""
        return delete(Scope.KEY, path.key_id)

    app.register_api(bp)


def require_admin(identity: Identity) -> None:
    """403 unless the token carries the admin role."""
    if not identity.has_role(ADMIN_ROLE):
        raise Forbidden("this needs the admin role", code="admin_only")


def require_admin_or_hide(identity: Identity, scope: Scope) -> None:
    """404 unless the token carries the admin role: a budget that is not the caller's is not shown to exist (BOLA)."""
    if not identity.has_role(ADMIN_ROLE):
        raise NotFound(f"no budget for this {scope.value}", code="budget_not_found")


def csv_response(rows: list[dict], fields: list[str]) -> Response:
    """Rows as a CSV attachment."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return Response(
        out.getvalue(), mimetype="text/csv", headers={"Content-Disposition": 'attachment; filename="usage.csv"'}
    )
