"""50 simultaneous $0.10 requests against a $1.00 budget on the real llm process (3 gevent workers, PostgreSQL)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import urllib3
from sqlalchemy import create_engine, text

USER = "race-user"  # conftest.RACE_USER: its $1.00 budget exists before the served workers start
CALLS = 50


@pytest.fixture
def race(llm, llm_db):  # type: ignore[no-untyped-def]
    """(llm process, database URL)."""
    return llm, llm_db


def budget_row(url: str) -> dict:
    engine = create_engine(url)
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT spent_nusd, reserved_nusd, limit_nusd FROM budgets WHERE subject_id = :u"), {"u": USER}
        ).one()
        charged = connection.execute(
            text("SELECT count(*), coalesce(sum(cost_usd), 0) FROM usage_records WHERE user_id = :u"), {"u": USER}
        ).one()
    engine.dispose()
    return {"spent": row[0], "reserved": row[1], "limit": row[2], "rows": charged[0], "cost": charged[1]}


def test_fifty_concurrent_dimes_against_one_dollar(race, token_mint) -> None:  # type: ignore[no-untyped-def]
    llm, url = race
    http = urllib3.PoolManager(maxsize=CALLS)
    headers = {"Authorization": f"Bearer {token_mint.mint(USER)}", "Content-Type": "application/json"}
    body = b'{"model":"dime-gpt","max_tokens":1,"messages":[{"role":"user","content":"a dime please"}]}'
    start = threading.Barrier(CALLS, timeout=30)
    statuses: list[int] = []

    def call() -> None:
        start.wait()
        response = http.request("POST", f"{llm.base_url}/v1/chat/completions", body=body, headers=headers)
        statuses.append(response.status)
        if response.status == 429:
            assert response.json()["error"]["code"] == "insufficient_quota"

    threads = [threading.Thread(target=call) for _ in range(CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted = statuses.count(200)
    assert len(statuses) == CALLS and set(statuses) <= {200, 429}, statuses
    assert 1 <= admitted <= 10, statuses
    # Settling happens after each answer is sent: poll until every reservation is back.
    deadline = time.monotonic() + 15
    while (state := budget_row(url))["reserved"] != 0 or state["rows"] < admitted:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["spent"] == admitted * 100_000_000 <= state["limit"]
    assert state["rows"] == admitted and state["cost"] == Decimal("0.1") * admitted
    metrics = http.request("GET", f"{llm.base_url}/metrics").data.decode()
    [remaining] = [line for line in metrics.splitlines() if line.startswith("parley_budget_remaining_usd ")]
    assert 0 <= float(remaining.split()[1]) <= 1.0
