"""The worker's item handling against the fake provider (standing in for llm, which speaks the same OpenAI wire
format) and a small stand-in for auth's service-token and act-as endpoints; real PostgreSQL throughout."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pika
import pytest
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
from parley_kit.testing import ServiceProcess, free_port, python_module

from .conftest import chat_line, jsonl

ACTING_TOKEN = "acting-token-for-alice"


class AuthStandIn:
    """auth's two internal endpoints: client credentials for `jobs`, act-as for known users; counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.calls.append((self.path, body))
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
def fake_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake provider on a free port, accepting only the act-as token the stand-in auth gives alice."""
    port = free_port()
    process = ServiceProcess(
        "fakeprovider",
        python_module("parley_fakeprovider", "--port", str(port)),
        env={"FAKE_PROVIDER_API_KEY": ACTING_TOKEN},
        log_dir=tmp_path_factory.mktemp("logs"),
        ready_url=f"http://127.0.0.1:{port}/healthz",
    ).start()
    yield f"http://127.0.0.1:{port}"
    process.stop()


def llm_calls(fake_llm: str) -> int:
    stats = json.loads(urllib3.request("GET", f"{fake_llm}/_fake/stats").data)
    return sum(stats["requests"].values())


@pytest.fixture
def worker_settings(make_settings: Callable[..., JobsSettings], fake_llm: str, auth_stand_in: AuthStandIn):
    return make_settings(llm_url=fake_llm, auth_url=auth_stand_in.url, item_timeout=10)


@pytest.fixture
def processor(worker_settings: JobsSettings, db: Database) -> ItemProcessor:
    return build_processor(worker_settings, db)


def message(item_id: str, delivery_count: int = 0) -> Message:
    return Message(
        id=item_id,
        type="batch.item",
        occurred_at="",
        traceparent=None,
        data={"item_id": item_id},
        delivery_count=delivery_count,
        redelivered=delivery_count > 0,
    )


def new_batch(client: FlaskClient, upload: Callable, auth: Callable, texts: list[str], user: str = "alice") -> str:
    file_id = upload(jsonl([chat_line(f"req-{i}", t) for i, t in enumerate(texts, 1)]), user=user).json["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return client.post("/v1/batches", json=body, headers=auth(user)).json["id"]


def items(db: Database, batch_id: str) -> list[BatchItem]:
    with db.transaction() as session:
        query = select(BatchItem).where(BatchItem.batch_id == batch_id).order_by(BatchItem.line)
        return list(session.scalars(query))


def test_items_run_as_the_owner_and_the_batch_completes(
    processor: ItemProcessor,
    db: Database,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    auth_stand_in: AuthStandIn,
    fake_llm: str,
) -> None:
    batch_id = new_batch(client, upload, auth, ["hello there", "bad one #fake:error=400"])
    ok, refused = items(db, batch_id)
    acting_before = auth_stand_in.count("/auth/internal/act-as")
    processor.handle(message(ok.id))
    assert client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json["status"] == "in_progress"
    processor.handle(message(refused.id))
    assert auth_stand_in.count("/auth/internal/act-as") - acting_before <= 1  # cached per owner
    assert ("/auth/internal/act-as", {"user_id": "alice", "key_id": None}) in auth_stand_in.calls

    ok, refused = items(db, batch_id)
    assert ok.status == "succeeded" and ok.response_status == 200 and ok.attempts == 1
    assert ok.response_body["object"] == "chat.completion" and ok.request_id
    assert refused.status == "failed" and refused.response_status == 400
    assert "error" in refused.response_body

    batch = client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert batch["usage"]["total_tokens"] == ok.response_body["usage"]["total_tokens"] > 0

    calls = llm_calls(fake_llm)
    processor.handle(message(ok.id, delivery_count=1))  # a redelivery: acked without running it again
    assert llm_calls(fake_llm) == calls
    assert items(db, batch_id)[0].response_body == ok.response_body


def test_a_server_error_is_retried_then_recorded_on_the_last_attempt(
    processor: ItemProcessor, db: Database, client: FlaskClient, upload: Callable, auth: Callable
) -> None:
    batch_id = new_batch(client, upload, auth, ["flaky #fake:error=503"])
    (item,) = items(db, batch_id)
    with pytest.raises(UpstreamError):
        processor.handle(message(item.id))
    assert items(db, batch_id)[0].status == "pending"
    processor.handle(message(item.id, delivery_count=5))  # the delivery limit in the settings is 5
    (item,) = items(db, batch_id)
    assert (item.status, item.response_status, item.attempts) == ("failed", 503, 2)
    assert client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json["status"] == "completed"


def test_a_token_llm_refuses_is_dropped_and_retried(
    processor: ItemProcessor, db: Database, client: FlaskClient, upload: Callable, auth: Callable
) -> None:
    # The stand-in gives bob a token the fake provider does not accept: llm answers 401.
    batch_id = new_batch(client, upload, auth, ["hi"], user="bob")
    (item,) = items(db, batch_id)
    with pytest.raises(UpstreamError):
        processor.handle(message(item.id))
    processor.handle(message(item.id, delivery_count=5))
    assert items(db, batch_id)[0].response_status == 401


def test_an_owner_auth_will_not_act_for_fails_the_line(
    processor: ItemProcessor, db: Database, client: FlaskClient, upload: Callable, auth: Callable
) -> None:
    batch_id = new_batch(client, upload, auth, ["hi"], user="disabled-user")
    (item,) = items(db, batch_id)
    processor.handle(message(item.id))
    (item,) = items(db, batch_id)
    assert item.status == "failed" and item.error["code"] == "owner_unauthorized"
    assert item.response_status is None


def test_acting_tokens_are_cached_until_near_expiry(auth_stand_in: AuthStandIn) -> None:
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


def test_a_wrong_client_secret_is_a_transient_unavailability(auth_stand_in: AuthStandIn) -> None:
    service_token = ServiceTokenSource(
        ServiceClient(auth_stand_in.url, name="auth"), client_id="jobs", client_secret="wrong"
    )
    tokens = ActingTokens(service_token)
    with pytest.raises(ServiceUnavailable, match="authentication is unavailable"):
        tokens.for_user("alice", None)


@pytest.mark.integration
def test_the_worker_process_runs_a_batch_end_to_end(
    worker_settings: JobsSettings,
    client: FlaskClient,
    upload: Callable,
    auth: Callable,
    tmp_path: Path,
    amqp_url: str,
) -> None:
    """`python -m parley_jobs worker`: relay → RabbitMQ → consumer → fake llm → files, with real processes."""
    batch_id = new_batch(client, upload, auth, ["one", "two", "three #fake:error=422"])
    env = {
        "PARLEY_ENV": "test",
        "JOBS_DATABASE_URL": worker_settings.database_url,
        "JOBS_CLIENT_SECRET": "test-secret",
        "JOBS_RELAY_INTERVAL": "0.05",
        "PARLEY_AMQP_URL": amqp_url,
        "PARLEY_AMQP_PREFIX": worker_settings.amqp_prefix,
        "PARLEY_LLM_URL": worker_settings.llm_url,
        "PARLEY_AUTH_URL": worker_settings.auth_url,
    }
    worker = ServiceProcess("worker", python_module("parley_jobs", "worker"), env=env, log_dir=tmp_path).start()
    try:
        deadline = time.monotonic() + 30
        batch = client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json
        while batch["status"] != "completed" and time.monotonic() < deadline:
            assert worker.process is not None and worker.process.poll() is None, worker.tail()
            time.sleep(0.1)
            batch = client.get(f"/v1/batches/{batch_id}", headers=auth("alice")).json
        assert batch["status"] == "completed", worker.tail()
        assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        output = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=auth("alice")).data
        assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == ["req-1", "req-2"]
        assert "batch progress 3/3" in worker.tail(200)
    finally:
        worker.stop()
        channel = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
        channel.queue_delete(worker_settings.items_queue)
        channel.queue_delete(f"{worker_settings.items_queue}.dead")
        channel.exchange_delete(worker_settings.dead_letter_exchange)
        channel.connection.close()
    assert worker.process is not None and worker.process.returncode == 0, worker.tail()
