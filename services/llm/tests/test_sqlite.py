"""The same app on SQLite (the `make run` default): migrations apply and the ledger works."""

from __future__ import annotations

from pathlib import Path

from parley_kit.db import upgrade
from parley_llm import MIGRATIONS_DIR


def test_sqlite_ledger_round_trip(tmp_path: Path, make_app, make_client, token_mint) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/sub/llm.db"
    (tmp_path / "sub").mkdir()
    upgrade(MIGRATIONS_DIR, url)
    app = make_app(database_url=url)
    client = make_client(app, token_mint.mint("sqlite-user"))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert client.post("/v1/chat/completions", json=body | {"stream": True}).status_code == 200
    [row] = client.get("/v1/usage").get_json()["data"]
    assert row["requests"] == 2 and row["output_tokens"] == 32 and row["cost_usd"] > 0
