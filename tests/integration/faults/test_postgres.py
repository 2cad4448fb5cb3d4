"""Fault 2: PostgreSQL connections of the platform's own databases (auth, llm, jobs, chosen by name) terminated with
pg_terminate_backend while chat completions, API-key creations and batch creations run through the gateway. Each
request is answered (200/201 after a retry) or refused with a clear 503 in the route's shape, never a 500; nothing is
half-written (no batch without its items, no key the client was told failed, no usage row twice or without its
call); and once the killing stops, every kind of request succeeds again. And the llm database away altogether (a
proxy turning connections away): calls answered meanwhile are booked once it is back."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from parley_kit.testing import PostgresServer, TokenMint, eventually

from .conftest import (
    RawUpstream,
    TcpProxy,
    assert_openai_error,
    assert_problem,
    batches_e2e,
    call,
    figure,
    query,
    start_own_llm,
    user_of,
)

if TYPE_CHECKING:
    from tests.integration.conftest import RunningPlatform

SECONDS = 6.0
# Each loop sends at most this many requests a second, so that chats and key creations stay well inside the gateway's
# per-key (600/min) and per-user (1200/min) limits on a fast machine: a 429 here would be the limiter, not the fault.
PER_SECOND = 40


class Killer:
    """Terminates every backend of the named databases at random 50-250 ms intervals, on its own thread."""

    def __init__(self, admin_url: str, databases: list[str]) -> None:
        self._engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
        self._databases = databases
        self._stop = threading.Event()
        self.killed = 0
        self.rounds = 0
        self._thread = threading.Thread(target=self._run, name="pg-killer", daemon=True)

    def _run(self) -> None:
        rng = random.Random()
        with self._engine.connect() as connection:
            while not self._stop.wait(rng.uniform(0.05, 0.25)):
                killed = connection.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = ANY(:names) AND pid <> pg_backend_pid()"
                    ),
                    {"names": self._databases},
                ).scalar_one()
                self.killed += killed
                self.rounds += 1

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._engine.dispose()


def batch_lines(tag: str) -> bytes:
    """A three-line chat batch file."""
    lines = [batches_e2e.chat_line(f"{tag}-{n}", f"pg fault {tag} {n}") for n in range(3)]
    return "\n".join(json.dumps(line) for line in lines).encode()


def failure_code(line: dict[str, Any]) -> str:
    """Why a batch line failed: its error code, or its answer's status and error code."""
    if line.get("error"):
        return str(line["error"].get("code"))
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    return f"{response.get('status_code')}:{(body.get('error') or {}).get('code')}"


def test_connections_killed_mid_request_are_retried_or_a_clear_503_and_nothing_is_half_written(
    platform: RunningPlatform, postgres: PostgresServer
) -> None:
    client = platform.new_client()
    gateway = platform.gateway
    key = {"Authorization": f"Bearer {client.api_key}"}
    bearer = {"Authorization": f"Bearer {client.access_token}"}
    outcomes: dict[str, Counter[int]] = {"chat": Counter(), "key": Counter(), "file": Counter(), "batch": Counter()}
    chat_ok: list[str] = []
    keys_ok: list[str] = []
    batches_ok: list[str] = []
    unexpected: list[str] = []

    def chat(n: int) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"pg fault chat {n}"}]}
        response = requests.post(f"{gateway}/v1/chat/completions", json=body, headers=key, timeout=60)
        outcomes["chat"][response.status_code] += 1
        if response.status_code == 200:
            chat_ok.append(response.json()["id"])
        else:
            checked(lambda: assert_openai_error(response, 503), "chat", response)

    def new_key(n: int) -> None:
        response = requests.post(f"{gateway}/auth/api-keys", json={"name": f"pg-{n}"}, headers=bearer, timeout=60)
        outcomes["key"][response.status_code] += 1
        if response.status_code == 201:
            keys_ok.append(response.json()["id"])
        else:
            checked(lambda: assert_problem(response, 503), "key", response)

    def new_batch(n: int) -> None:
        file = requests.post(
            f"{gateway}/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", batch_lines(f"b{n}"))},
            headers=key,
            timeout=60,
        )
        outcomes["file"][file.status_code] += 1
        if file.status_code != 200:
            checked(lambda: assert_openai_error(file, 503), "file", file)
            return
        create = {"input_file_id": file.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = requests.post(f"{gateway}/v1/batches", json=create, headers=key, timeout=60)
        outcomes["batch"][batch.status_code] += 1
        if batch.status_code == 200:
            batches_ok.append(batch.json()["id"])
        else:
            checked(lambda: assert_openai_error(batch, 503), "batch", batch)
        time.sleep(1.0)  # a few batches are enough, and each must be waited for below

    def checked(check: Callable[[], Any], what: str, response: requests.Response) -> None:
        try:
            check()
        except AssertionError:
            unexpected.append(f"{what}: {response.status_code} {response.text[:300]}")

    def loop(work: Callable[[int], None], deadline: float) -> None:
        n = 0
        while (started := time.monotonic()) < deadline:
            try:
                work(n)
            except requests.RequestException as exc:  # a dropped connection is as bad as a 500
                unexpected.append(f"{work.__name__}: {type(exc).__name__}: {exc}")
            n += 1
            time.sleep(max(0.0, started + 1 / PER_SECOND - time.monotonic()))

    databases = [make_url(platform.config.database_urls[name]).database for name in ("auth", "llm", "jobs")]
    with Killer(postgres.admin_url, databases) as killer:  # type: ignore[arg-type]
        deadline = time.monotonic() + SECONDS
        threads = [threading.Thread(target=loop, args=(work, deadline)) for work in (chat, new_key, new_batch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    stopped = time.monotonic()

    # Recovery: each kind of request succeeds again without anyone restarting anything.
    assert eventually(lambda: requests.get(f"{gateway}/readyz", timeout=10).status_code == 200, 30)
    chat(-1)
    new_key(-1)
    new_batch(-1)
    recovered = time.monotonic() - stopped
    assert chat_ok[-1:] and keys_ok[-1:] and batches_ok[-1:], (outcomes, unexpected)
    assert not unexpected, (outcomes, sorted({u[:200] for u in unexpected}))

    # Nothing half-written.
    user = user_of(client.access_token)
    jobs_db, llm_db, auth_db = (platform.config.database_urls[name] for name in ("jobs", "llm", "auth"))
    for batch_id, total, items in query(
        jobs_db,
        "SELECT b.id, b.total, (SELECT count(*) FROM batch_items i WHERE i.batch_id = b.id) FROM batches b"
        " WHERE b.owner = :user",
        user=user,
    ):
        assert total == items == 3, (batch_id, total, items)
    stored_batches = {row[0] for row in query(jobs_db, "SELECT id FROM batches WHERE owner = :user", user=user)}
    assert stored_batches == set(batches_ok), (stored_batches ^ set(batches_ok), outcomes)
    stored_keys = {row[0] for row in query(auth_db, "SELECT id FROM api_keys WHERE user_id = :user", user=user)}
    assert stored_keys == {client.key_id, *keys_ok}, (stored_keys ^ {client.key_id, *keys_ok}, outcomes)
    # Every batch (made while connections were dying, run by a worker whose connections died too) finishes, each
    # line answered once.
    sdk = batches_e2e.sdk_for(platform, client)
    waited = time.monotonic()
    lines_failed = 0
    failed_codes: Counter[str] = Counter()
    for batch_id in batches_ok:
        batch = batches_e2e.wait_for(sdk, batch_id, timeout=90)
        assert batch.status == "completed", batch
        answered = batches_e2e.output_lines(sdk, batch.output_file_id) if batch.output_file_id else []
        failed = batches_e2e.output_lines(sdk, batch.error_file_id) if batch.error_file_id else []
        custom_ids = sorted(line["custom_id"] for line in answered + failed)
        assert len(custom_ids) == 3 and len(set(custom_ids)) == 3, (custom_ids, failed)
        lines_failed += len(failed)
        failed_codes.update(failure_code(line) for line in failed)
    waited = time.monotonic() - waited
    # One usage row per call: the chats answered 200 plus the batch lines answered. None twice: at most one row per
    # 200 or batch line (a line that failed in the end may still have been charged once before its result was lost).
    # None lost: at least one row per 200 and answered line. (A batch's lines share the creating request's id, so the
    # counts are the check, not request_id uniqueness.)
    answered_calls = len(chat_ok) + 3 * len(batches_ok) - lines_failed

    def booked() -> list[Any]:
        return query(llm_db, "SELECT request_id FROM usage_records WHERE user_id = :user AND status = 'ok'", user=user)

    eventually(lambda: len(booked()) >= answered_calls, 10)  # llm books a call just after its answer has gone out
    rows = booked()
    assert len(rows) <= answered_calls + lines_failed, (len(rows), len(chat_ok), len(batches_ok), lines_failed)
    lost = max(0, answered_calls - len(rows))
    figure(
        "postgres-terminate-backend",
        seconds=SECONDS,
        kill_rounds=killer.rounds,
        backends_killed=killer.killed,
        outcomes={name: dict(counter) for name, counter in outcomes.items()},
        batch_lines_failed=lines_failed,
        failed_line_codes=dict(failed_codes),
        usage_rows=len(rows),
        answered_but_not_charged=lost,
        seconds_to_recover=round(recovered, 2),
        seconds_until_batches_done=round(waited, 1),
    )
    assert lost == 0, f"{lost} of {answered_calls} answered calls have no usage row"


def test_calls_answered_while_the_ledger_database_is_away_are_booked_once_it_is_back(
    postgres: PostgresServer, token_mint: TokenMint, raw_upstream: RawUpstream, tmp_path: Path
) -> None:
    """llm's database goes away (a TCP proxy of ours in front of it cuts every connection and turns new ones away)
    while calls keep being answered (who has budgets is cached, and a call needs nothing else from it). Their usage
    rows wait in the worker and are written once the database is back: every answered call booked exactly once."""
    proxy = TcpProxy(make_url(postgres.admin_url).port or 5432)
    user = f"faults-pg-away-{uuid.uuid4().hex[:8]}"
    token = token_mint.mint(user)
    llm = None
    try:
        llm = start_own_llm(
            postgres,
            token_mint,
            tmp_path,
            raw_upstream.url,
            database_port=proxy.port,
            LLM_BUDGET_CACHE_SECONDS="300",  # the cache of who has budgets outlives the outage
        )
        assert call(llm, token, "openai", "", stream=False).status_code == 200
        assert len(llm.usage(user, 1)) == 1
        proxy.refuse()
        statuses = Counter(call(llm, token, "openai", "", stream=False).status_code for _ in range(10))
        time.sleep(1.0)  # the rows' writes fail meanwhile, and are kept
        booked_while_away = len(query(llm.database_url, "SELECT 1 FROM usage_records WHERE user_id = :u", u=user))
        proxy.resume()
        rows = llm.usage(user, 1 + statuses[200], seconds=20)
        time.sleep(0.5)  # a second write of the same rows would show by now
        rows = llm.usage(user, 1 + statuses[200])
    finally:
        if llm is not None:
            llm.process.stop(timeout=10, signum=signal.SIGTERM)
        proxy.close()
    figure("pg_away", statuses=dict(statuses), booked_while_away=booked_while_away, booked_after=len(rows))
    assert statuses == {200: 10}
    assert booked_while_away == 1
    assert len(rows) == 11  # (a row twice is refused by the call id's unique index: not counted on here)
