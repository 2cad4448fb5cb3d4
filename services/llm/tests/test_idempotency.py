"""Idempotency-Key on completions and messages (Flask test client, PostgreSQL, the real fake provider)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import urllib3

CHAT = "/v1/chat/completions"


def chat(text: str = "hello there") -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def upstream_chats(fake_provider: str) -> int:
    stats = urllib3.PoolManager().request("GET", f"{fake_provider}/_fake/stats").json()
    return stats["requests"].get("POST /v1/chat/completions", 0)


def test_same_key_and_body_replays_without_a_second_charge(client: Any, rows, fake_provider: str) -> None:  # type: ignore[no-untyped-def]
    before = upstream_chats(fake_provider)
    first = client.post(CHAT, json=chat(), headers={"Idempotency-Key": "k-1"})
    again = client.post(CHAT, json=chat(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"
    assert upstream_chats(fake_provider) - before == 1
    assert len(rows()) == 1


def test_same_key_other_body_is_409(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    assert client.post(CHAT, json=chat("one"), headers={"Idempotency-Key": "k-2"}).status_code == 200
    reused = client.post(CHAT, json=chat("two"), headers={"Idempotency-Key": "k-2"})
    assert reused.status_code == 409 and reused.get_json()["error"]["code"] == "idempotency_key_reused"
    assert len(rows()) == 1


def test_keys_are_per_user(app, make_client, token_mint, client: Any, user: str) -> None:  # type: ignore[no-untyped-def]
    assert client.post(CHAT, json=chat("mine"), headers={"Idempotency-Key": "shared"}).status_code == 200
    other = make_client(app, token_mint.mint(f"{user}-other"))
    answer = other.post(CHAT, json=chat("theirs"), headers={"Idempotency-Key": "shared"})
    assert answer.status_code == 200 and "Idempotent-Replayed" not in answer.headers


def test_a_failed_first_attempt_does_not_stick(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    body = chat("x #fake:error=400")
    assert client.post(CHAT, json=body, headers={"Idempotency-Key": "k-3"}).status_code == 400
    assert client.post(CHAT, json=body, headers={"Idempotency-Key": "k-3"}).status_code == 400
    assert [r["status"] for r in rows()] == ["error", "error"]  # ran twice, charged nothing


def test_messages_are_idempotent_too(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    first = client.post("/v1/messages", json=body, headers={"Idempotency-Key": "m-1"})
    again = client.post("/v1/messages", json=body, headers={"Idempotency-Key": "m-1"})
    assert first.status_code == again.status_code == 200 and first.data == again.data
    assert len(rows()) == 1


def test_concurrent_duplicates_make_one_upstream_call(client: Any, rows, fake_provider: str) -> None:  # type: ignore[no-untyped-def]
    before = upstream_chats(fake_provider)
    body = chat("slow please #fake:latency_ms=300")
    start = threading.Barrier(5, timeout=10)
    answers: list[Any] = []

    def call() -> None:
        start.wait()
        answers.append(client.post(CHAT, json=body, headers={"Idempotency-Key": "k-race"}))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 5
    assert len({a.data for a in answers}) == 1
    assert upstream_chats(fake_provider) - before == 1
    assert len(rows()) == 1


def test_streams_and_overlong_keys(client: Any) -> None:  # type: ignore[no-untyped-def]
    assert client.post(CHAT, json=chat(), headers={"Idempotency-Key": "x" * 256}).status_code == 400
    streamed = client.post(CHAT, json=chat() | {"stream": True}, headers={"Idempotency-Key": "s-1"})
    assert streamed.status_code == 200 and streamed.mimetype == "text/event-stream"


@pytest.mark.parametrize("key", ["k-4"])
def test_replay_survives_a_new_app(make_app, make_client, token_mint, user: str, key: str) -> None:  # type: ignore[no-untyped-def]
    first = make_client(make_app(), token_mint.mint(user)).post(CHAT, json=chat(), headers={"Idempotency-Key": key})
    second = make_client(make_app(), token_mint.mint(user)).post(CHAT, json=chat(), headers={"Idempotency-Key": key})
    assert second.headers.get("Idempotent-Replayed") == "true" and second.data == first.data


def test_a_claim_is_finished_on_a_fresh_connection_when_its_own_is_killed(postgres) -> None:  # type: ignore[no-untyped-def]
    """The answer is made; storing it loses its connection (PostgreSQL kills the backend): the store is retried, so a
    redelivered duplicate gets the replay instead of waiting on a claim left pending."""
    from parley_kit.db import Database, upgrade
    from parley_kit.testing import backend_killed_at
    from parley_llm import MIGRATIONS_DIR, idempotency

    url = postgres.create_database("llm_claim_retry")
    upgrade(MIGRATIONS_DIR, url)
    db = Database(url)
    try:
        with db.transaction() as session:
            assert idempotency.claim(session, user_id="u", key="k", fingerprint="f")
        with backend_killed_at(db.engine, "UPDATE idempotency_keys") as killed:
            idempotency.finish_claim(
                db, lambda session: idempotency.store(session, user_id="u", key="k", status=200, body=b"{}")
            )
        assert killed, "the backend was never killed: the test did not test anything"
        with db.transaction() as session:
            record = idempotency.lookup(session, user_id="u", key="k")
            assert record is not None and record.state == "done" and record.response_body == b"{}"
    finally:
        db.dispose()


def test_replays_and_refusals_on_sqlite(tmp_path, make_app, make_client, token_mint) -> None:  # type: ignore[no-untyped-def]
    """`make run`'s SQLite: the claim is SQLite's own INSERT ... ON CONFLICT DO NOTHING, in a transaction."""
    from parley_kit.db import upgrade
    from parley_llm import MIGRATIONS_DIR

    url = f"sqlite:///{tmp_path}/llm.db"
    upgrade(MIGRATIONS_DIR, url)
    client = make_client(make_app(database_url=url), token_mint.mint("sqlite-idempotency"))
    first = client.post(CHAT, json=chat(), headers={"Idempotency-Key": "q-1"})
    again = client.post(CHAT, json=chat(), headers={"Idempotency-Key": "q-1"})
    assert first.status_code == again.status_code == 200
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"
    reused = client.post(CHAT, json=chat("other"), headers={"Idempotency-Key": "q-1"})
    assert reused.status_code == 409 and reused.get_json()["error"]["code"] == "idempotency_key_reused"
    failed = chat("x #fake:error=400")
    assert client.post(CHAT, json=failed, headers={"Idempotency-Key": "q-2"}).status_code == 400
    assert client.post(CHAT, json=failed, headers={"Idempotency-Key": "q-2"}).status_code == 400  # released: ran again
    [row] = client.get("/v1/usage").get_json()["data"]
    assert row["requests"] == 3  # the first chat once, the failed one twice


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_key_is_claimed_by_one_of_many_at_once_and_taken_over_only_when_stale(
    backend: str, postgres, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from parley_kit.db import Database, run_statement, upgrade
    from parley_llm import MIGRATIONS_DIR, idempotency

    url = postgres.create_database("llm_claims") if backend == "postgresql" else f"sqlite:///{tmp_path}/llm.db"
    upgrade(MIGRATIONS_DIR, url)
    db = Database(url)
    try:
        start = threading.Barrier(8, timeout=30)
        won: list[bool] = []

        def claim() -> None:
            start.wait()
            won.append(run_statement(db.engine, lambda c: idempotency.claim(c, user_id="u", key="k", fingerprint="f")))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(won) == [False] * 7 + [True]
        record = run_statement(db.engine, lambda c: idempotency.lookup(c, user_id="u", key="k"))
        assert record is not None and (record.state, record.request_hash) == ("pending", "f")
        # Another request's take-over needs the claim exactly as it read it: a claim renewed meanwhile is not taken.
        assert run_statement(db.engine, functools.partial(idempotency.take_over, record=record, fingerprint="g"))
        assert not run_statement(db.engine, functools.partial(idempotency.take_over, record=record, fingerprint="h"))
        idempotency.finish_claim(db, lambda c: idempotency.store(c, user_id="u", key="k", status=200, body=b'{"a":1}'))
        stored = run_statement(db.engine, lambda c: idempotency.lookup(c, user_id="u", key="k"))
        assert stored is not None and (stored.state, stored.request_hash, stored.response_body) == (
            "done",
            "g",
            b'{"a":1}',
        )
        assert idempotency.replay(stored).get_data() == b'{"a":1}'
        idempotency.finish_claim(db, lambda c: idempotency.release(c, user_id="u", key="k"))
        assert run_statement(db.engine, lambda c: idempotency.lookup(c, user_id="u", key="k")) is None
    finally:
        db.dispose()
