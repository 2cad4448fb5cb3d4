"""The worker's item handling against the REAL auth process (client credentials and act-as) and the REAL llm process
(on the fake provider), each on its own fresh PostgreSQL database; real PostgreSQL throughout. A small stand-in remains
only where the real processes cannot show the behaviour: counting auth calls (token caching) and seeing the requests
the worker sends to llm (`AuthStandIn`)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pika
import pytest
import requests
import urllib3
from flask.testing import FlaskClient
from sqlalchemy import select

from parley_jobs.credentials import ActAsRefused, ActingTokens
from parley_jobs.models import BatchItem
from parley_jobs.settings import JobsSettings
from parley_jobs.worker import ItemProcessor, build_processor
from parley_kit.amqp import Message
from parley_kit.db import Database
from parley_kit.errors import ServiceUnavailable, UpstreamError
from parley_kit.http import ServiceClient
from parley_kit.service_auth import ServiceTokenSource
from parley_kit.testing import ServiceProcess, free_port, modules_loaded, python_module
from parley_platform import start_service

from .conftest import chat_line, jsonl

ACTING_TOKEN = "acting-token-for-alice"
CLIENT_SECRET = "test-secret"
ADMIN = {"email": "admin@example.com", "password": "admin-password-0123"}


@dataclass
class RealAuth:
    """`python -m parley_auth serve` on its own database: users are registered through its API."""

    url: str

    def new_user(self) -> str:
        """Register a user; returns its id (the `sub` auth puts in its tokens)."""
        credentials = {"email": f"jobs-{uuid.uuid4().hex[:10]}@example.com", "password": "a long enough password"}
        created = requests.post(f"{self.url}/auth/register", json=credentials, timeout=10)
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def disable(self, user_id: str) -> None:
        """Disable a user as the bootstrap admin."""
        token = requests.post(f"{self.url}/auth/token", json=ADMIN, timeout=10).json()["access_token"]
        answer = requests.patch(
            f"{self.url}/auth/users/{user_id}",
            json={"disabled": True},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def real_auth(
    postgres: Any, amqp_url: str, amqp_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealAuth]:
    """auth migrated and served on a free port, with `jobs` as a service client (like the platform runs it)."""
    port, workdir = free_port(), tmp_path_factory.mktemp("auth")
    env = {
        "PARLEY_ENV": "test",
        "AUTH_DATABASE_URL": postgres.create_database(f"jobs_auth_{uuid.uuid4().hex[:6]}"),
        "AUTH_BIND": f"127.0.0.1:{port}",
        "AUTH_WORKERS": "1",
        "AUTH_METRICS_DIR": str(workdir / "metrics"),
        "AUTH_SERVICE_CLIENTS": json.dumps({"jobs": CLIENT_SECRET}),
        "AUTH_API_KEY_PEPPER_SECRET": "jobs-test-pepper-0123456789",
        "AUTH_ADMIN_EMAIL": ADMIN["email"],
        "AUTH_ADMIN_PASSWORD": ADMIN["password"],
        "PARLEY_AMQP_URL": amqp_url,
        "PARLEY_AMQP_PREFIX": f"{amqp_prefix}.{uuid.uuid4().hex[:6]}",
    }
    process = start_service("auth", env, port=port, log_dir=workdir)
    yield RealAuth(f"http://127.0.0.1:{port}")
    process.stop()


@pytest.fixture(scope="module")
def alice(real_auth: RealAuth) -> str:
    """A real user's id."""
    return real_auth.new_user()


class AuthStandIn:
    """A stand-in for what the real processes cannot show: it counts auth calls (client credentials for `jobs`,
    act-as) to prove token caching, and answers as llm to show the headers the worker sends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.llm_requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.calls.append((self.path, body))
                if self.path == "/internal/calls":
                    stand_in.llm_requests.append((dict(self.headers), body))
                status, answer = stand_in.answer(self.path, body, self.headers.get("Authorization", ""))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict[str, Any], authorization: str) -> tuple[int, dict[str, Any]]:
        if path == "/auth/service-token":
            if body == {"client_id": "jobs", "client_secret": "test-secret"}:
                return 200, {"access_token": "svc-token", "token_type": "Bearer", "expires_in": 300}
            return 401, {"detail": "bad client"}
        if path == "/auth/internal/act-as":
            if authorization != "Bearer svc-token":
                return 401, {"detail": "service token required"}
            if body["user_id"] == "disabled-user":
                return 403, {"detail": "user disabled"}
            token = ACTING_TOKEN if body["user_id"] == "alice" else "some-other-token"
            return 200, {"access_token": token, "expires_in": 300}
        if path == "/internal/calls":  # standing in for llm too, to see what the worker sends
            answer = {"object": "chat.completion", "choices": [], "usage": {"total_tokens": 0}}
            data = [{"status_code": 200, "request_id": "req_x", "body": answer} for _ in body["calls"]]
            return 200, {"object": "list", "data": data}
        return 404, {}

    def count(self, path: str) -> int:
        return sum(1 for called, _ in self.calls if called == path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def auth_stand_in() -> Iterator[AuthStandIn]:
    server = AuthStandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fake_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake provider on a free port, accepting any key."""
    port = free_port()
    process = ServiceProcess(
        "fakeprovider",
        python_module("parley_fakeprovider", "--port", str(port)),
        env={"FAKE_PROVIDER_API_KEY": ""},
        log_dir=tmp_path_factory.mktemp("logs"),
        ready_url=f"http://127.0.0.1:{port}/healthz",
    ).start()
    yield f"http://127.0.0.1:{port}"
    process.stop()


def start_llm(
    postgres: Any, real_auth: RealAuth, fake_provider: str, log_dir: Path, **env: str
) -> tuple[ServiceProcess, str]:
    """`python -m parley_llm serve` migrated on a fresh database, verifying the real auth's tokens; and its url."""
    port = free_port()
    values = {
        "PARLEY_ENV": "test",
        "LLM_DATABASE_URL": postgres.create_database(f"jobs_llm_{uuid.uuid4().hex[:6]}"),
        "LLM_BIND": f"127.0.0.1:{port}",
        "LLM_WORKERS": "1",
        "LLM_METRICS_DIR": str(log_dir / "metrics"),
        "LLM_OPENAI_BASE_URL": f"{fake_provider}/v1",
        "LLM_OPENAI_API_KEY": "any-key",
        "LLM_ANTHROPIC_BASE_URL": fake_provider,
        "LLM_ANTHROPIC_API_KEY": "any-key",
        "PARLEY_JWKS_URL": f"{real_auth.url}/.well-known/jwks.json",
        **env,
    }
    return start_service("llm", values, port=port, log_dir=log_dir), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def real_llm(
    postgres: Any, real_auth: RealAuth, fake_provider: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """llm as the platform runs it; its url."""
    # A duplicate waits 1 s (not 60) for a key another request holds, then answers 409 in use.
    process, url = start_llm(
        postgres, real_auth, fake_provider, tmp_path_factory.mktemp("llm"), LLM_IDEMPOTENCY_WAIT="1"
    )
    yield url
    process.stop()


def upstream_calls(fake_provider: str) -> int:
    stats = json.loads(urllib3.request("GET", f"{fake_provider}/_fake/stats").data)
    return sum(stats["requests"].values())


@pytest.fixture
def worker_settings(make_settings: Callable[..., JobsSettings], real_llm: str, real_auth: RealAuth) -> JobsSettings:
    return make_settings(llm_url=real_llm, auth_url=real_auth.url, item_timeout=10, client_secret=CLIENT_SECRET)


@pytest.fixture
def processor(worker_settings: JobsSettings, db: Database) -> ItemProcessor:
    return build_processor(worker_settings, db)


def message(*item_ids: str, delivery_count: int = 0) -> Message:
    """A `batch.items` message of these items, as the relay sends it."""
    return Message(
        id=item_ids[0],
        type="batch.items",
        occurred_at="",
        traceparent=None,
        data={"item_ids": list(item_ids)},
        delivery_count=delivery_count,
        redelivered=delivery_count > 0,
    )


def single_item_message(item_id: str) -> Message:
    """A `batch.item` message: one item, the shape every worker version reads."""
    return Message(
        id=item_id,
        type="batch.item",
        occurred_at="",
        traceparent=None,
        data={"item_id": item_id},
        delivery_count=0,
        redelivered=False,
    )


def new_batch(client: FlaskClient, upload: Callable, auth: Callable, texts: list[str], user: str) -> str:
    file_id = upload(jsonl([chat_line(f"req-{i}", t) for i, t in enumerate(texts, 1)]), user=user).json["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return client.post("/v1/batches", json=body, headers=auth(user)).json["id"]


def items(db: Database, batch_id: str) -> list[BatchItem]:
    with db.transaction() as session:
        query = select(BatchItem).where(BatchItem.batch_id == batch_id).order_by(BatchItem.line)
        return list(session.scalars(query))


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)  # SQLite: `make run`
def test_items_run_as_the_owner_and_the_batch_completes(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    alice: str,
    fake_provider: str,
) -> None:
    batch_id = new_batch(client, upload, auth, ["hello there", "bad one #fake:error=400"], alice)
    ok, refused = items(db, batch_id)
    processor.handle(message(ok.id))
    assert client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json["status"] == "in_progress"
    processor.handle(single_item_message(refused.id))  # as a relay at JOBS_ITEM_GROUP=1 sends it

    ok, refused = items(db, batch_id)
    assert ok.status == "succeeded" and ok.response_status == 200 and ok.attempts == 1
    assert ok.response_body["object"] == "chat.completion" and ok.request_id
    assert refused.status == "failed" and refused.response_status == 400
    assert "error" in refused.response_body

    batch = client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert batch["usage"]["total_tokens"] == ok.response_body["usage"]["total_tokens"] > 0

    calls = upstream_calls(fake_provider)
    processor.handle(message(ok.id, delivery_count=1))  # a redelivery: acked without running it again
    assert upstream_calls(fake_provider) == calls
    assert items(db, batch_id)[0].response_body == ok.response_body


def test_a_group_runs_only_its_unfinished_items_and_a_transient_failure_redelivers_only_those(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    alice: str,
    fake_provider: str,
) -> None:
    batch_id = new_batch(client, upload, auth, ["one", "two", "flaky #fake:error=503", "four"], alice)
    one, two, flaky, four = items(db, batch_id)
    processor.handle(message(one.id))
    one = items(db, batch_id)[0]
    before = upstream_calls(fake_provider)
    with pytest.raises(UpstreamError):  # the flaky item asks for a redelivery, after the others are written
        processor.handle(message(one.id, two.id, flaky.id, four.id))
    retried = upstream_calls(fake_provider) - before  # two, four, and the flaky one with llm's own retries
    one_after, two, flaky, four = items(db, batch_id)
    assert (one_after.response_body, one_after.attempts) == (one.response_body, 1)  # finished: not run again
    assert [two.status, flaky.status, four.status] == ["succeeded", "pending", "succeeded"]
    assert client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json["request_counts"] == {
        "total": 4,
        "completed": 3,
        "failed": 0,
    }

    processor.handle(message(one.id, two.id, flaky.id, four.id, delivery_count=5))  # the last delivery
    assert upstream_calls(fake_provider) - before == 2 * retried - 2  # only the flaky item ran again
    assert [item.status for item in items(db, batch_id)] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert items(db, batch_id)[1].response_body == two.response_body
    batch = client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}


def test_a_group_llm_answered_before_its_worker_died_is_not_charged_again(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    alice: str,
    real_llm: str,
    real_auth: RealAuth,
    fake_provider: str,
) -> None:
    """The first worker's llm request went through, then it died before writing anything: the redelivery gets
    llm's stored answers (keyed by item id), and the provider is not called again."""
    batch_id = new_batch(client, upload, auth, ["one", "two"], alice)
    works = items(db, batch_id)
    calls = [{"path": "/v1/chat/completions", "body": item.body, "idempotency_key": item.id} for item in works]
    headers = {"Authorization": f"Bearer {acting_token(real_auth, alice)}"}
    first = requests.post(f"{real_llm}/internal/calls", json={"calls": calls}, headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    before = upstream_calls(fake_provider)
    processor.handle(message(*(item.id for item in works), delivery_count=1))
    assert upstream_calls(fake_provider) == before
    assert [item.response_body for item in items(db, batch_id)] == [answer["body"] for answer in first.json()["data"]]
    assert client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json["status"] == "completed"


def acting_token(real_auth: RealAuth, user: str) -> str:
    """The act-as token the worker gets for `user`."""
    source = ServiceTokenSource(
        ServiceClient(real_auth.url, name="auth"), client_id="jobs", client_secret=CLIENT_SECRET
    )
    return ActingTokens(source).for_user(user, None)


def test_an_item_an_earlier_deliverys_request_still_runs_is_retried_then_replayed(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    alice: str,
    real_llm: str,
    real_auth: RealAuth,
    fake_provider: str,
) -> None:
    """The first delivery's worker died (or timed out) while llm ran its slow call: the redelivery finds the key held,
    which is no answer for the item (it stays pending, the message is redelivered); once the call ends, its stored
    answer is the item's, charged once."""
    batch_id = new_batch(client, upload, auth, ["slow #fake:latency_ms=4000"], alice)
    (item,) = items(db, batch_id)
    calls = [{"path": "/v1/chat/completions", "body": item.body, "idempotency_key": item.id}]
    headers = {"Authorization": f"Bearer {acting_token(real_auth, alice)}"}
    first: list[requests.Response] = []
    running = threading.Thread(
        target=lambda: first.append(
            requests.post(f"{real_llm}/internal/calls", json={"calls": calls}, headers=headers, timeout=30)
        )
    )
    before = upstream_calls(fake_provider)
    running.start()
    deadline = time.monotonic() + 10
    while upstream_calls(fake_provider) == before and time.monotonic() < deadline:  # the first request holds the key
        time.sleep(0.05)
    with pytest.raises(UpstreamError):
        processor.handle(message(item.id, delivery_count=1))
    assert items(db, batch_id)[0].status == "pending"
    running.join(30)
    processor.handle(message(item.id, delivery_count=2))
    (item,) = items(db, batch_id)
    assert item.status == "succeeded" and item.response_body == first[0].json()["data"][0]["body"]
    assert upstream_calls(fake_provider) - before == 1


def test_a_group_is_one_llm_request_keyed_by_item_ids_with_the_owners_token(
    make_settings: Callable[..., JobsSettings],
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    auth_stand_in: AuthStandIn,
    real_auth: RealAuth,
    alice: str,
) -> None:
    """llm charges an item once however often it is redelivered: it needs a stable key per item. (The stand-in
    answers as llm, to see the requests; the act-as token is the real auth's.)"""
    settings = make_settings(
        llm_url=auth_stand_in.url, auth_url=real_auth.url, item_timeout=10, client_secret=CLIENT_SECRET
    )
    processor = build_processor(settings, db)
    batch_id = new_batch(client, upload, auth, ["one", "two"], alice)
    first, second = items(db, batch_id)
    before = len(auth_stand_in.llm_requests)
    processor.handle(message(first.id, second.id))
    ((headers, body),) = auth_stand_in.llm_requests[before:]
    assert [call["idempotency_key"] for call in body["calls"]] == [first.id, second.id]
    assert [call["body"]["messages"][0]["content"] for call in body["calls"]] == ["one", "two"]
    assert {call["path"] for call in body["calls"]} == {"/v1/chat/completions"}
    # a real act-as token: the owner's, naming the jobs service as the actor
    claims = jwt.decode(headers["Authorization"].removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["sub"] == alice and "jobs" in claims["act"]["sub"]
    assert {item.status for item in items(db, batch_id)} == {"succeeded"}


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)  # SQLite: `make run`
def test_a_dead_lettered_item_is_recorded_failed_once(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    fake_provider: str,
    alice: str,
) -> None:
    batch_id = new_batch(client, upload, auth, ["poison", "fine"], alice)
    poison, fine = items(db, batch_id)
    processor.handle(message(fine.id))
    calls = upstream_calls(fake_provider)
    processor.handle_dead(message(poison.id, delivery_count=6))
    processor.handle_dead(message(poison.id, delivery_count=6))  # a duplicate changes nothing
    processor.handle_dead(message("batch_req_unknown"))  # an unknown item is dropped
    processor.handle_dead(message(poison.id, fine.id, delivery_count=6))  # a group: only the unfinished item counts
    assert upstream_calls(fake_provider) == calls  # never run again
    poison, fine = items(db, batch_id)
    assert poison.status == "failed" and poison.error["code"] == "delivery_limit_exceeded"
    batch = client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = client.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth(alice)).data
    (line,) = [json.loads(row) for row in errors.splitlines()]
    assert line["custom_id"] == "req-1" and line["error"]["code"] == "delivery_limit_exceeded"


def test_a_server_error_is_retried_then_recorded_on_the_last_attempt(
    processor: ItemProcessor, db: Database, client: FlaskClient, upload: Callable, auth: Callable, alice: str
) -> None:
    batch_id = new_batch(client, upload, auth, ["flaky #fake:error=503"], alice)
    (item,) = items(db, batch_id)
    with pytest.raises(UpstreamError):
        processor.handle(message(item.id))
    assert items(db, batch_id)[0].status == "pending"
    processor.handle(message(item.id, delivery_count=5))  # the delivery limit in the settings is 5
    (item,) = items(db, batch_id)
    # llm's answer to the provider's 503 (after its own retries) is the line
    assert (item.status, item.response_status, item.attempts) == ("failed", 502, 2)
    assert item.response_body["error"]["type"] == "server_error"
    assert client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json["status"] == "completed"


def test_a_token_llm_refuses_is_dropped_and_retried(
    make_settings: Callable[..., JobsSettings],
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    alice: str,
    postgres: Any,
    real_auth: RealAuth,
    fake_provider: str,
    tmp_path: Path,
) -> None:
    """An llm that trusts tokens for another audience refuses every act-as token: 401, retried with a fresh token,
    and on the last attempt llm's answer is the line."""
    process, llm_url = start_llm(postgres, real_auth, fake_provider, tmp_path, PARLEY_JWT_AUDIENCE="someone-else")
    try:
        settings = make_settings(llm_url=llm_url, auth_url=real_auth.url, item_timeout=10, client_secret=CLIENT_SECRET)
        processor = build_processor(settings, db)
        batch_id = new_batch(client, upload, auth, ["hi"], alice)
        (item,) = items(db, batch_id)
        with pytest.raises(UpstreamError):
            processor.handle(message(item.id))
        processor.handle(message(item.id, delivery_count=5))
    finally:
        process.stop()
    (item,) = items(db, batch_id)
    assert (item.status, item.response_status, item.attempts) == ("failed", 401, 2)


def test_an_owner_auth_will_not_act_for_fails_the_line(
    processor: ItemProcessor, db: Database, client: FlaskClient, upload: Callable, auth: Callable, real_auth: RealAuth
) -> None:
    disabled = real_auth.new_user()
    real_auth.disable(disabled)
    batch_id = new_batch(client, upload, auth, ["hi"], disabled)
    (item,) = items(db, batch_id)
    processor.handle(message(item.id))
    (item,) = items(db, batch_id)
    assert item.status == "failed" and item.error["code"] == "owner_unauthorized"
    assert item.response_status is None


def test_acting_tokens_are_cached_until_near_expiry(auth_stand_in: AuthStandIn) -> None:
    """The stand-in, because the real auth cannot tell how often it was called."""
    now = [1000.0]
    service_token = ServiceTokenSource(
        ServiceClient(auth_stand_in.url, name="auth"), client_id="jobs", client_secret="test-secret"
    )
    tokens = ActingTokens(service_token, margin=60, clock=lambda: now[0])
    before = (auth_stand_in.count("/auth/service-token"), auth_stand_in.count("/auth/internal/act-as"))
    assert tokens.for_user("alice", "key_1") == ACTING_TOKEN
    assert tokens.for_user("alice", "key_1") == ACTING_TOKEN
    now[0] += 239  # 300 s tokens are renewed 60 s early
    tokens.for_user("alice", "key_1")
    after = (auth_stand_in.count("/auth/service-token"), auth_stand_in.count("/auth/internal/act-as"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    now[0] += 2
    tokens.for_user("alice", "key_1")
    assert auth_stand_in.count("/auth/internal/act-as") - before[1] == 2
    # The service token has its own cache on the real clock: still fresh, not fetched again.
    assert auth_stand_in.count("/auth/service-token") - before[0] == 1
    with pytest.raises(ActAsRefused):
        tokens.for_user("disabled-user", None)


def test_a_wrong_client_secret_is_a_transient_unavailability(real_auth: RealAuth, alice: str) -> None:
    service_token = ServiceTokenSource(
        ServiceClient(real_auth.url, name="auth"), client_id="jobs", client_secret="wrong"
    )
    tokens = ActingTokens(service_token)
    with pytest.raises(ServiceUnavailable, match="authentication is unavailable"):
        tokens.for_user(alice, None)


def test_auth_refuses_to_act_for_an_unknown_user_or_key(real_auth: RealAuth, alice: str) -> None:
    service_token = ServiceTokenSource(
        ServiceClient(real_auth.url, name="auth"), client_id="jobs", client_secret=CLIENT_SECRET
    )
    tokens = ActingTokens(service_token)
    assert jwt.decode(tokens.for_user(alice, None), options={"verify_signature": False})["sub"] == alice
    with pytest.raises(ActAsRefused):
        tokens.for_user("no-such-user", None)
    with pytest.raises(ActAsRefused):
        tokens.for_user(alice, "key_not_hers")


@pytest.mark.integration
def test_the_worker_process_runs_a_batch_end_to_end(
    worker_settings: JobsSettings,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    tmp_path: Path,
    amqp_url: str,
    alice: str,
) -> None:
    """`python -m parley_jobs worker`: relay → RabbitMQ → consumer → real auth → fake llm → files, all processes."""
    batch_id = new_batch(client, upload, auth, ["one", "two", "three #fake:error=422"], alice)
    env = {
        "PARLEY_ENV": "test",
        "JOBS_DATABASE_URL": worker_settings.database_url,
        "JOBS_CLIENT_SECRET": CLIENT_SECRET,
        "JOBS_RELAY_INTERVAL": "0.05",
        "JOBS_RELAY_IDLE_INTERVAL": "0.2",
        "PARLEY_AMQP_URL": amqp_url,
        "PARLEY_AMQP_PREFIX": worker_settings.amqp_prefix,
        "PARLEY_LLM_URL": worker_settings.llm_url,
        "PARLEY_AUTH_URL": worker_settings.auth_url,
        "JOBS_WORKER_METRICS_PORT": str(metrics_port := free_port()),
        "JOBS_STATS_INTERVAL": "0.2",
    }
    worker = ServiceProcess("worker", python_module("parley_jobs", "worker"), env=env, log_dir=tmp_path).start()
    try:
        deadline = time.monotonic() + 30
        batch = client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json
        while batch["status"] != "completed" and time.monotonic() < deadline:
            assert worker.process is not None and worker.process.poll() is None, worker.tail()
            time.sleep(0.1)
            batch = client.get(f"/v1/batches/{batch_id}", headers=auth(alice)).json
        assert batch["status"] == "completed", worker.tail()
        assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        output = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=auth(alice)).data
        assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == ["req-1", "req-2"]
        assert "batch progress 3/3" in worker.tail(200)
        scraped = ""
        # The gauges are refreshed every 0.2 s: wait for a refresh after the batch ended.
        while "\nparley_jobs_oldest_pending_age_seconds 0.0\n" not in scraped and time.monotonic() < deadline:
            time.sleep(0.1)
            scraped = urllib3.request("GET", f"http://127.0.0.1:{metrics_port}/metrics").data.decode()
        assert 'parley_jobs_items_processed_total{outcome="succeeded"} 2.0\n' in scraped
        assert 'parley_jobs_items_processed_total{outcome="failed"} 1.0\n' in scraped
        assert 'parley_jobs_batches_total{status="completed"} 1.0\n' in scraped
        assert 'parley_jobs_queue_depth{queue="items"} 0.0\n' in scraped
        assert 'parley_jobs_queue_depth{queue="dead"} 0.0\n' in scraped
        assert "\nparley_jobs_outbox_lag_seconds 0.0\n" in scraped
    finally:
        worker.stop()
        channel = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
        channel.queue_delete(worker_settings.items_queue)
        channel.queue_delete(f"{worker_settings.items_queue}.dead")
        channel.exchange_delete(worker_settings.dead_letter_exchange)
        channel.connection.close()
    assert worker.process is not None and worker.process.returncode == 0, worker.tail()


def test_the_worker_never_loads_the_web_stack() -> None:
    """The batch worker serves no HTTP: Flask, its OpenAPI extension and the token verifier's JWT library (~20 MB of
    every worker process) are the web app's alone."""
    assert modules_loaded("import parley_jobs.worker", ("flask", "werkzeug", "flask_openapi3", "jwt")) == []
