"""Budgets: admin routes, reserve → settle → refund through the API (PostgreSQL and SQLite), usage exports.

Costs are exact: a price table where one output token costs $0.10 and every call asks for max_tokens=1.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from parley_kit.db import Database, upgrade
from parley_kit.errors import BudgetExceeded
from parley_kit.testing import backend_killed_at
from parley_llm import MIGRATIONS_DIR, budgets
from parley_llm.budgets import Period, Scope


def dime_chat(text: str = "hello") -> dict:
    return {"model": "dime-gpt", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}


def dime_message(text: str = "hello") -> dict:
    return {"model": "dime-claude", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def dime_app(request, make_app, dime_file: str, postgres, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The llm app with the dime price table, on PostgreSQL and on SQLite."""
    if request.param == "postgresql":
        url = postgres.create_database("llm_budgets")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('budgets')}/llm.db"
    upgrade(MIGRATIONS_DIR, url)
    return make_app(database_url=url, models_file=dime_file)


@pytest.fixture
def admin(dime_app, make_client, token_mint) -> Any:  # type: ignore[no-untyped-def]
    return make_client(dime_app, token_mint.mint("the-admin", roles=["admin"]))


def put_budget(admin: Any, who: str, limit: str, period: str = "month") -> Any:
    return admin._client.put(f"/v1/budgets/{who}", json={"limit_usd": limit, "period": period}, headers=admin.headers)


def test_user_budget_admits_what_it_covers_then_429_in_each_apis_shape(
    dime_app, admin, make_client, token_mint, user: str
) -> None:  # type: ignore[no-untyped-def]
    assert put_budget(admin, f"users/{user}", "0.25").status_code == 200
    member = make_client(dime_app, token_mint.mint(user, key_id=f"{user}-k"))
    assert member.post("/v1/chat/completions", json=dime_chat()).status_code == 200
    assert member.post("/v1/messages", json=dime_message()).status_code == 200
    refused = member.post("/v1/chat/completions", json=dime_chat())
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "insufficient_quota"
    assert refused.get_json()["error"]["type"] == "insufficient_quota"
    refused = member.post("/v1/messages", json=dime_message())
    assert refused.status_code == 429 and refused.get_json()["type"] == "error"
    budget = member.get(f"/v1/budgets/users/{user}").get_json()  # owners may read their own
    assert budget["spent_usd"] == pytest.approx(0.2) and budget["reserved_usd"] == 0
    assert budget["remaining_usd"] == pytest.approx(0.05) and budget["period"] == "month"


def test_failed_calls_are_refunded(dime_app, admin, make_client, token_mint, user: str) -> None:  # type: ignore[no-untyped-def]
    assert put_budget(admin, f"users/{user}", "0.10", "day").status_code == 200
    member = make_client(dime_app, token_mint.mint(user))
    for _ in range(3):  # each failure releases its reservation: the next call still fits
        assert member.post("/v1/chat/completions", json=dime_chat("x #fake:error=400")).status_code == 400
    assert member.post("/v1/chat/completions", json=dime_chat()).status_code == 200
    assert member.post("/v1/chat/completions", json=dime_chat()).status_code == 429
    budget = admin.get(f"/v1/budgets/users/{user}").get_json()
    assert budget["spent_usd"] == pytest.approx(0.1) and budget["reserved_usd"] == 0


def test_key_budget_applies_to_that_key_only(dime_app, admin, make_client, token_mint, user: str) -> None:  # type: ignore[no-untyped-def]
    key = f"{user}-key"
    assert put_budget(admin, f"keys/{key}", "0.10", "total").status_code == 200
    with_key = make_client(dime_app, token_mint.mint(user, key_id=key))
    other_key = make_client(dime_app, token_mint.mint(user, key_id=f"{key}-2"))
    assert with_key.post("/v1/chat/completions", json=dime_chat()).status_code == 200
    assert with_key.post("/v1/chat/completions", json=dime_chat()).status_code == 429
    assert other_key.post("/v1/chat/completions", json=dime_chat()).status_code == 200
    assert with_key.get(f"/v1/budgets/keys/{key}").get_json()["spent_usd"] == pytest.approx(0.1)


def test_budget_routes_are_for_admins(dime_app, admin, make_client, token_mint, user: str) -> None:  # type: ignore[no-untyped-def]
    member = make_client(dime_app, token_mint.mint(user))
    assert put_budget(member, f"users/{user}", "100").status_code == 403
    assert member.get("/v1/budgets").status_code == 403
    assert member.get("/v1/budgets/users/someone-else").status_code == 404  # not theirs: not shown to exist
    assert member.get("/v1/usage/all").status_code == 403
    assert put_budget(admin, f"users/{user}", "-1").status_code == 400
    assert put_budget(admin, f"users/{user}", "1", "week").status_code == 400
    assert admin.get("/v1/budgets/users/nobody-has-this").status_code == 404
    assert put_budget(admin, f"users/{user}", "1").status_code == 200
    listed = admin.get("/v1/budgets?scope=user").get_json()["data"]
    assert any(b["subject_id"] == user and b["limit_usd"] == 1 for b in listed)
    assert admin._client.delete(f"/v1/budgets/users/{user}", headers=admin.headers).status_code == 204


def test_usage_and_admin_aggregate_with_csv(dime_app, admin, make_client, token_mint, user: str) -> None:  # type: ignore[no-untyped-def]
    member = make_client(dime_app, token_mint.mint(user))
    assert member.post("/v1/chat/completions", json=dime_chat()).status_code == 200
    own = member.get("/v1/usage").get_json()["data"]
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in own] == [("dime-gpt", 1, 0.1)]
    exported = member.get("/v1/usage?format=csv")
    assert exported.mimetype == "text/csv"
    [row] = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert row["model"] == "dime-gpt" and row["requests"] == "1" and "user_id" not in row
    everyone = list(csv.DictReader(io.StringIO(admin.get("/v1/usage/all?format=csv").get_data(as_text=True))))
    assert any(r["user_id"] == user and r["model"] == "dime-gpt" for r in everyone)
    assert any(r["user_id"] == user for r in admin.get("/v1/usage/all").get_json()["data"])
    assert member.get("/v1/usage?format=xml").status_code == 400


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger_db(request, postgres, tmp_path):  # type: ignore[no-untyped-def]
    """A bare migrated database (PostgreSQL and SQLite) for the budget statements themselves."""
    if request.param == "postgresql":
        url = postgres.create_database("llm_budget_stmts")
    else:
        url = f"sqlite:///{tmp_path}/b.db"
    upgrade(MIGRATIONS_DIR, url)
    db = Database(url)
    yield db
    db.dispose()


def test_a_new_period_starts_from_zero_inside_the_reserving_statement(ledger_db: Database) -> None:
    day = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
    with ledger_db.transaction() as session:
        budget = budgets.put_budget(
            session, scope=Scope.USER, subject_id="u", limit_usd=Decimal("1"), period=Period.DAY
        )
        budget.period_start, budget.spent_nusd = day.replace(hour=0), budgets.to_nano(Decimal("1"))
    subjects = [("user", "u")]
    with ledger_db.engine.begin() as connection, pytest.raises(BudgetExceeded):
        budgets.reserve(connection, subjects=subjects, estimate_nusd=1, now=day)
    next_day = day + timedelta(hours=2)
    with ledger_db.engine.begin() as connection:
        held = budgets.reserve(connection, subjects=subjects, estimate_nusd=400, now=next_day)
        assert held is not None
        budgets.settle(connection, held, cost_nusd=300, now=next_day)
    with ledger_db.transaction() as session:
        budget = budgets.get_budget(session, scope=Scope.USER, subject_id="u")
        assert budget is not None
        assert (budget.spent_nusd, budget.reserved_nusd) == (300, 0)
        assert budget.period_start == datetime(2026, 4, 1, tzinfo=UTC)


def test_who_has_a_budget_is_cached_until_invalidated(ledger_db: Database) -> None:
    directory = budgets.BudgetDirectory(ledger_db.engine, ttl=3600)
    assert directory.subjects_for("cached", "k") == ()
    with ledger_db.transaction() as session:
        budgets.put_budget(session, scope=Scope.KEY, subject_id="k", limit_usd=Decimal("1"), period=Period.TOTAL)
    assert directory.subjects_for("cached", "k") == ()  # no round trip within the TTL
    directory.invalidate()
    assert directory.subjects_for("cached", "k") == (("key", "k"),)
    assert budgets.BudgetDirectory(ledger_db.engine, ttl=0).subjects_for("a", None) == (("user", "a"),)


def ledger_call(ledger_db: Database, user: str) -> tuple[Any, Any, Any]:
    """A Ledger on `ledger_db`, a call context of `user` holding a reservation on its $1 budget, and its record."""
    from parley_llm.catalog import load_catalog
    from parley_llm.relay import CallContext, Ledger

    catalog = load_catalog(MIGRATIONS_DIR.parent / "models.yaml")
    ledger = Ledger(ledger_db.engine, catalog.price_version)
    with ledger_db.transaction() as session:
        budgets.put_budget(session, scope=Scope.USER, subject_id=user, limit_usd=Decimal("1"), period=Period.TOTAL)
    ctx = CallContext("req_x", user, None, catalog.get("gpt-4o-mini"), "chat", {"messages": []}, 0.0)
    ledger.reserve(ctx)
    assert ctx.reservation is not None
    record = ctx.new_record()
    record.input_tokens, record.output_tokens = 1000, 1000
    return ledger, ctx, record


def ledger_state(ledger_db: Database, user: str) -> tuple[int, int, int]:
    """(usage rows, spent nano-USD, reserved nano-USD) of a user."""
    from sqlalchemy import text

    with ledger_db.engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM usage_records WHERE user_id = :u"), {"u": user}).scalar()
    with ledger_db.transaction() as session:
        budget = budgets.get_budget(session, scope=Scope.USER, subject_id=user)
        assert budget is not None
        return int(rows or 0), budget.spent_nusd, budget.reserved_nusd


def test_a_settlement_is_written_once_however_often_it_is_retried(ledger_db: Database) -> None:
    """The row's call id: a second write of the same call (a retry after an ambiguous commit) adds no row and does
    not settle the budget twice."""
    ledger, ctx, record = ledger_call(ledger_db, "once")
    reservation = ctx.reservation
    ledger.settle(ctx, record)
    written = ledger_state(ledger_db, "once")
    assert written[0] == 1 and written[1] > 0 and written[2] == 0
    ctx.reservation = reservation  # as if the commit's answer had been lost and the write ran again
    ledger.settle(ctx, record)
    assert ledger_state(ledger_db, "once") == written


def test_a_usage_write_that_loses_its_connection_is_retried(postgres) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL kills the backend under the usage INSERT: the ledger retries on a fresh connection, and the call is
    charged once, with its budget settled."""
    url = postgres.create_database("llm_settle_retry")
    upgrade(MIGRATIONS_DIR, url)
    db = Database(url)
    try:
        ledger, ctx, record = ledger_call(db, "killed")
        with backend_killed_at(db.engine, "INSERT INTO usage_records") as killed:
            ledger.settle(ctx, record)
        assert killed, "the backend was never killed: the test did not test anything"
        rows, spent, reserved = ledger_state(db, "killed")
        assert (rows, reserved) == (1, 0) and spent > 0
    finally:
        db.dispose()


def test_many_usage_rows_are_written_in_one_statement_each_call_once(ledger_db: Database) -> None:
    """The group commit's write: every row with its exact values (PostgreSQL through one JSON parameter), a call
    whose row is already there, or repeated in the batch, written once."""
    from sqlalchemy import event, text

    from parley_llm import service
    from parley_llm.catalog import load_catalog

    deployment = load_catalog(MIGRATIONS_DIR.parent / "models.yaml").get("gpt-4o-mini")
    created = datetime(2026, 11, 22, 7, 30, 1, 123456, tzinfo=UTC)

    def row(n: int, key_id: str | None) -> dict[str, Any]:
        cost = Decimal("0.000012345") * n
        return service.usage_row(
            call_id=f"call_{n}", request_id=f"req_{n}", user_id="many", key_id=key_id, operation="chat",
            deployment=deployment, input_tokens=n, output_tokens=2 * n, cost_usd=cost, latency_ms=n,
            status="ok" if n % 2 else "error", price_version="v-test",
        ) | {"created_at": created + timedelta(seconds=n)}  # fmt: skip

    with ledger_db.engine.begin() as connection:
        service.record_usages(connection, [row(1, "key_1")])
    batch = [row(n, None if n % 3 else f"key_{n}") for n in range(1, 301)]
    statements: list[bool] = []  # executemany or not, per statement sent
    listen = event.listens_for(ledger_db.engine, "before_cursor_execute")
    listen(lambda _conn, _cursor, _sql, _params, _context, executemany: statements.append(executemany))
    with ledger_db.engine.begin() as connection:
        service.record_usages(connection, [*batch, batch[5]])  # call_1 is there already; call_6 twice
    if ledger_db.engine.dialect.name == "postgresql":  # one statement, not a pipeline of a Bind/Execute per row
        assert statements == [False]
    with ledger_db.engine.connect() as connection:
        stored = connection.execute(
            text(
                "SELECT call_id, request_id, user_id, key_id, operation, model, provider, upstream_model, input_tokens,"
                " output_tokens, cost_usd, latency_ms, status, price_version, created_at FROM usage_records"
                " WHERE user_id = 'many' ORDER BY input_tokens"
            )
        ).all()
    assert len(stored) == 300
    first = row(1, "key_1")
    for got, want in zip(stored, [first, *batch[1:]], strict=True):
        values = dict(got._mapping)
        created_at = values.pop("created_at")
        if isinstance(created_at, str):  # SQLite through a text query: the stored text, UTC
            created_at = datetime.fromisoformat(created_at).replace(tzinfo=UTC)
        assert created_at == want["created_at"]
        assert Decimal(str(values.pop("cost_usd"))) == want["cost_usd"]
        assert values == {k: v for k, v in want.items() if k not in ("created_at", "cost_usd")}
