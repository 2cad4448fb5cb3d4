"""Issue #6 end to end: the official `openai` SDK through the gateway (an OpenAI-routed and an Anthropic-routed
model, idempotent creation, fair scheduling between owners), then "losing nothing": workers SIGKILLed in the middle
of a batch, a crash between writing a batch and publishing it, and a RabbitMQ restart. Extra processes are our own
(free ports, their own names); the shared platform's processes are never touched."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import openai
import pika
import pytest
import requests
from openai.types import Batch
from sqlalchemy import create_engine, text

from parley_kit.testing import ServiceProcess, eventually, free_port, free_ports, python_module, unavailable

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

FINAL = ("completed", "failed", "expired", "cancelled")


def sdk_for(platform: RunningPlatform, client: Client) -> openai.OpenAI:
    """The official SDK pointed at the gateway with the user's API key (its retries off: failures must show)."""
    return openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=30)


def chat_line(custom_id: str, content: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A `/v1/chat/completions` batch line."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def messages_line(custom_id: str, content: str, model: str = "claude-haiku-4-5") -> dict[str, Any]:
    """A `/v1/messages` (Anthropic Messages) batch line."""
    body = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/messages", "body": body}


def upload(sdk: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    """files.create with the lines as JSONL; returns the file id."""
    payload = "\n".join(json.dumps(line) for line in lines).encode()
    return sdk.files.create(file=("input.jsonl", io.BytesIO(payload)), purpose="batch").id


def wait_for(sdk: openai.OpenAI, batch_id: str, timeout: float = 90.0) -> Batch:
    """batches.retrieve until the batch is final (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    batch = sdk.batches.retrieve(batch_id)
    while batch.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch_id)
    return batch


def output_lines(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """files.content of an output or error file, parsed."""
    assert file_id
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines() if line]


def user_id(client: Client) -> str:
    """The client's user id (the `sub` of its access token; only read here, the services verify it)."""
    return jwt.decode(client.access_token, options={"verify_signature": False})["sub"]


def charges(platform: RunningPlatform, client: Client) -> int:
    """Successful usage rows in llm's ledger for the client's user."""
    engine = create_engine(platform.config.database_urls["llm"])
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT count(*) FROM usage_records WHERE user_id = :user AND status = 'ok'"),
                {"user": user_id(client)},
            ).scalar_one()
    finally:
        engine.dispose()


def charges_once_booked(platform: RunningPlatform, client: Client, expected: int, seconds: float = 10) -> int:
    """`charges`, polled until it reaches `expected` or the time is up: llm books a call just after its answer has
    gone out, so a batch can end a moment before its last item's row lands. One too many shows at once."""
    eventually(lambda: charges(platform, client) >= expected, seconds)
    return charges(platform, client)


def test_openai_sdk_runs_a_batch_for_an_openai_routed_model(platform: RunningPlatform, client: Client) -> None:
    sdk = sdk_for(platform, client)
    file_id = upload(sdk, [chat_line(f"chat-{n}", f"Batch line {n}") for n in range(1, 4)])
    batch = sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "a"}
    )
    assert batch.status == "in_progress" and batch.metadata == {"run": "a"}
    batch = wait_for(sdk, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 3, 0)
    output = output_lines(sdk, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["chat-1", "chat-2", "chat-3"]
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    assert batch.usage is not None and batch.usage.total_tokens > 0
    assert charges_once_booked(platform, client, 3) == 3


def test_openai_sdk_runs_a_batch_for_an_anthropic_routed_model(platform: RunningPlatform, client: Client) -> None:
    sdk = sdk_for(platform, client)
    file_id = upload(sdk, [messages_line(f"claude-{n}", f"Hello Claude {n}") for n in range(1, 3)])
    # The SDK's type lists OpenAI's endpoints; Parley also runs Anthropic Messages lines.
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/messages", completion_window="24h")  # type: ignore[arg-type]
    batch = wait_for(sdk, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == 2
    output = output_lines(sdk, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["claude-1", "claude-2"]
    for line in output:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        assert body["type"] == "message" and body["content"][0]["text"]
        assert body["usage"]["output_tokens"] > 0
    assert batch.usage is not None and batch.usage.output_tokens > 0


def test_batch_creation_is_idempotent_through_the_gateway(platform: RunningPlatform, client: Client) -> None:
    sdk = sdk_for(platform, client)
    file_id = upload(sdk, [chat_line("once", "Only once")])
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = sdk.batches.create(**create, extra_headers={"Idempotency-Key": "idem-1"})  # type: ignore[arg-type]
    again = sdk.batches.create(**create, extra_headers={"Idempotency-Key": "idem-1"})  # type: ignore[arg-type]
    assert again.id == first.id
    conflict = requests.post(
        f"{platform.gateway}/v1/batches",
        json={**create, "metadata": {"changed": "yes"}},
        headers={"Authorization": f"Bearer {client.api_key}", "Idempotency-Key": "idem-1"},
        timeout=10,
    )
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    assert wait_for(sdk, first.id).status == "completed"
    assert [batch.id for batch in sdk.batches.list()] == [first.id]
    assert charges_once_booked(platform, client, 1) == 1


def test_a_small_batch_is_not_starved_by_a_large_one(platform: RunningPlatform) -> None:
    """Owner A's large batch is created first; owner B's ten lines still finish while A's is far from done."""
    large_owner, small_owner = platform.new_client(), platform.new_client()
    large_sdk, small_sdk = sdk_for(platform, large_owner), sdk_for(platform, small_owner)
    # One second a line: a window of 64 (four groups of 16, each as slow as its slowest line) is ~64 lines a second.
    large_lines = [chat_line(f"big-{n}", f"Large {n} #fake:latency_ms=1000") for n in range(400)]
    large = large_sdk.batches.create(
        input_file_id=upload(large_sdk, large_lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while large_sdk.batches.retrieve(large.id).request_counts.completed == 0 and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.1)
    small_lines = [chat_line(f"small-{n}", f"Small {n}") for n in range(10)]
    small = small_sdk.batches.create(
        input_file_id=upload(small_sdk, small_lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    small = wait_for(small_sdk, small.id, timeout=60)
    large_now = large_sdk.batches.retrieve(large.id)
    assert small.status == "completed", small
    assert large_now.request_counts is not None
    # Without fairness the ten lines would queue behind all 400; with it, behind one window (64) at most.
    assert large_now.status == "in_progress" and large_now.request_counts.completed < 250, large_now
    large_sdk.batches.cancel(large.id)  # leave the shared worker free for the next tests
    assert wait_for(large_sdk, large.id).status == "cancelled"


@dataclass
class OwnJobs:
    """A jobs API and workers of our own, on their own database and broker names, using the platform's auth and
    llm (so act-as, budgets and the ledger are the real ones)."""

    platform: RunningPlatform
    database_url: str
    log_dir: Path
    amqp_url: str | None = None
    prefix: str = field(default_factory=lambda: f"t6-{uuid.uuid4().hex[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    api: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)

    def env(self, name: str) -> dict[str, str]:
        """A platform process's environment, pointed at our database and broker names."""
        env = dict(self.platform.platform.processes[name].env)
        env.update(
            {
                "JOBS_DATABASE_URL": self.database_url,
                "PARLEY_AMQP_PREFIX": self.prefix,
                "JOBS_WORKER_METRICS_PORT": "0",
                "JOBS_RELAY_INTERVAL": "0.05",
                "JOBS_RELAY_IDLE_INTERVAL": "0.2",
            }
        )
        if self.amqp_url:
            env["PARLEY_AMQP_URL"] = self.amqp_url
        return env | self.extra_env

    def migrate(self) -> None:
        """`python -m parley_jobs migrate` on our database."""
        done = subprocess.run(
            python_module("parley_jobs", "migrate"), env=self.env("jobs"), capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start_api(self) -> str:
        """Our jobs API; returns its base URL."""
        port = free_port()
        env = self.env("jobs") | {
            "JOBS_BIND": f"127.0.0.1:{port}",
            "JOBS_WORKERS": "1",
            "JOBS_METRICS_DIR": str(self.log_dir / f"metrics-{port}"),
        }
        url = f"http://127.0.0.1:{port}"
        self.api = ServiceProcess(
            f"own-jobs-{port}",
            python_module("parley_jobs", "serve"),
            env=env,
            log_dir=self.log_dir,
            ready_url=f"{url}/livez",
        ).start()
        return url

    def start_worker(self) -> ServiceProcess:
        """One more worker process (relay, consumer, dead-letter consumer)."""
        worker = ServiceProcess(
            f"own-worker-{len(self.workers)}",
            python_module("parley_jobs", "worker"),
            env=self.env("jobs-worker"),
            log_dir=self.log_dir,
        )
        worker.launch()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """Stop our processes."""
        for process in [*self.workers, *([self.api] if self.api else [])]:
            if process.process is not None and process.process.poll() is None:
                process.signal(signal.SIGINT)
        for process in [*self.workers, *([self.api] if self.api else [])]:
            process.wait_stopped(10)

    def delete_broker_names(self, amqp_url: str) -> None:
        """Remove our queues and exchange."""
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        for kind, name in (
            ("queue", f"{self.prefix}.jobs.items"),
            ("queue", f"{self.prefix}.jobs.items.dead"),
            ("exchange", f"{self.prefix}.jobs.dlx"),
        ):
            channel = connection.channel()
            try:
                channel.queue_delete(name) if kind == "queue" else channel.exchange_delete(name)
            except pika.exceptions.ChannelClosedByBroker:
                pass
        connection.close()


@pytest.fixture
def own_jobs(platform: RunningPlatform, postgres: Any, amqp_url: str, tmp_path: Path) -> Iterator[OwnJobs]:
    """Our own jobs database (migrated) and processes, stopped and cleaned up afterwards."""
    jobs = OwnJobs(platform, postgres.create_database(f"jobs_{uuid.uuid4().hex[:6]}"), tmp_path)
    jobs.migrate()
    yield jobs
    jobs.stop()
    jobs.delete_broker_names(jobs.amqp_url or amqp_url)


def scalar(database_url: str, query: str, **params: Any) -> Any:
    """One value from a database."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(query), params).scalar_one()
    finally:
        engine.dispose()


def queue_exists(amqp_url: str, queue: str) -> bool:
    """Whether a queue is declared."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


def create_batch(url: str, client: Client, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Upload and create a batch straight at a jobs API with the client's access token."""
    headers = {"Authorization": f"Bearer {client.access_token}"}
    payload = "\n".join(json.dumps(line) for line in lines).encode()
    file = requests.post(
        f"{url}/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", payload)}, headers=headers, timeout=10
    )
    assert file.status_code == 200, file.text
    batch = requests.post(
        f"{url}/v1/batches",
        json={"input_file_id": file.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=headers,
        timeout=10,
    )
    assert batch.status_code == 200, batch.text
    return batch.json()


def wait_batch(url: str, client: Client, batch_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Poll a jobs API until the batch is final."""
    headers = {"Authorization": f"Bearer {client.access_token}"}
    deadline = time.monotonic() + timeout
    batch = requests.get(f"{url}/v1/batches/{batch_id}", headers=headers, timeout=10).json()
    while batch["status"] not in FINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = requests.get(f"{url}/v1/batches/{batch_id}", headers=headers, timeout=10).json()
    return batch


def file_lines(url: str, client: Client, file_id: str) -> list[dict[str, Any]]:
    """An output or error file's lines."""
    response = requests.get(
        f"{url}/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {client.access_token}"}, timeout=10
    )
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_workers_killed_at_random_points_lose_nothing_and_charge_once(
    platform: RunningPlatform, client: Client, tmp_path: Path
) -> None:
    """200 lines; an extra worker (the platform's env) SIGKILLed and restarted at random points until it ends (one
    extra, not several: the machine's PostgreSQL connections are shared by everyone's tests)."""
    sdk = sdk_for(platform, client)
    extra = OwnJobs(platform, platform.config.database_urls["jobs"], tmp_path, prefix=platform.config.amqp_prefix)
    extra.start_worker()
    consuming_since: dict[int, float] = {}
    rng = random.Random()
    # Slow lines: a group ends with its slowest, and a window of 64 is four groups in flight (the kills need time).
    lines = [chat_line(f"line-{n:03d}", f"Line {n} #fake:latency_ms={rng.randint(700, 1500)}") for n in range(200)]
    batch = sdk.batches.create(
        input_file_id=upload(sdk, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    kills = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and kills < 6:
            time.sleep(rng.uniform(0.2, 1.0))
            if sdk.batches.retrieve(batch.id).status in FINAL:
                break
            for worker in extra.workers:  # a worker is worth killing once it consumes (a slow start is likely here)
                if id(worker) not in consuming_since and '"consumer":"jobs-items","queue"' in worker.tail(10**6):
                    consuming_since[id(worker)] = time.monotonic()
            ready = [worker for worker in extra.workers if time.monotonic() - consuming_since.get(id(worker), 1e18) > 1]
            if not ready:
                continue
            victim = rng.choice(ready)
            assert victim.process is not None
            process = victim.process
            victim.signal(signal.SIGKILL)  # no cleanup, no acks, no graceful stop
            process.wait(10)
            kills += 1
            consuming_since.pop(id(victim))
            victim.log_path.write_bytes(b"")  # its next start logs afresh
            victim.launch()
        batch = wait_for(sdk, batch.id, timeout=120)
    finally:
        extra.stop()
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == 200
    output = output_lines(sdk, batch.output_file_id)
    custom_ids = [line["custom_id"] for line in output]
    assert len(custom_ids) == 200 and sorted(custom_ids) == sorted(line["custom_id"] for line in lines)
    assert batch.error_file_id is None
    attempts = scalar(
        platform.config.database_urls["jobs"], "SELECT sum(attempts) FROM batch_items WHERE batch_id = :b", b=batch.id
    )
    assert kills >= 1 and attempts > 200, (kills, attempts)  # some kills hit items in flight: they ran again
    # Exactly one charge per line however often an item ran: llm dedupes on the item id as Idempotency-Key.
    assert charges_once_booked(platform, client, 200) == 200, f"{attempts} attempts over {kills} kills"


def test_a_batch_written_while_no_relay_runs_is_run_by_the_next_worker(
    own_jobs: OwnJobs, client: Client, amqp_url: str
) -> None:
    """Commit happened, publish did not (no relay alive: the state a crash between the two leaves behind)."""
    url = own_jobs.start_api()
    batch = create_batch(url, client, [chat_line(f"late-{n}", f"Late {n}") for n in range(5)])
    assert scalar(own_jobs.database_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 1
    assert scalar(own_jobs.database_url, "SELECT count(*) FROM batch_items WHERE queued_at IS NOT NULL") == 0
    assert not queue_exists(amqp_url, f"{own_jobs.prefix}.jobs.items")  # nothing was ever published
    own_jobs.start_worker()
    done = wait_batch(url, client, batch["id"])
    assert done["status"] == "completed", done
    assert sorted(line["custom_id"] for line in file_lines(url, client, done["output_file_id"])) == [
        f"late-{n}" for n in range(5)
    ]
    assert scalar(own_jobs.database_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# Groups of two, two in flight: a batch of slow lines stays mid-way long enough to take the broker down under it.
SLOW_GROUPS = {"JOBS_ITEM_GROUP": "2", "JOBS_SCHEDULE_WINDOW": "4"}


@dataclass
class OwnRabbit:
    """A RabbitMQ node of our own (its own node name, ports and directories), to stop and start at will."""

    process: ServiceProcess
    env: dict[str, str]
    node: str
    url: str

    def ctl(self, *args: str) -> None:
        """`rabbitmqctl -n <node> …` against our node only."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def wait_accepting(self, timeout: float) -> None:
        """Poll until the node accepts AMQP connections (it dying first fails with its log)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.process is not None and self.process.process.poll() is None, self.process.tail()
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture
def own_rabbit(tmp_path: Path) -> Iterator[OwnRabbit]:
    """Debian's rabbitmq-server as a second node under a temp dir (the shared broker is never touched)."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        unavailable("a second RabbitMQ node", "rabbitmq-server is not installed")
    for attempt in range(3):
        base = tmp_path / f"rabbit-{attempt}"
        base.mkdir()
        (port, dist_port), node = free_ports(2), f"t6-{uuid.uuid4().hex[:8]}@localhost"
        env = {
            "HOME": str(base),  # its own Erlang cookie
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),  # a failed boot's dump stays out of the checkout
        }
        process = ServiceProcess("own-rabbitmq", [str(RABBITMQ_BIN / "rabbitmq-server")], env=env, log_dir=base)
        process.launch()
        rabbit = OwnRabbit(process, process.env, node, f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        try:
            rabbit.wait_accepting(60)
            break
        except AssertionError:
            # A port picked free was taken before the node bound it (another process's outgoing connection can
            # land on it): try again on fresh ports. Anything else is a real failure.
            if attempt == 2 or "could not bind" not in process.tail(200):
                raise
            process.wait_stopped(20)
    try:
        yield rabbit
    finally:
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node, "stop"], env=process.env, capture_output=True, check=False
        )
        process.wait_stopped(20)


def test_a_rabbitmq_restart_mid_batch_loses_nothing_and_charges_once(
    platform: RunningPlatform, postgres: Any, own_rabbit: OwnRabbit, client: Client, tmp_path: Path
) -> None:
    """Our own jobs API and worker on our own broker (the platform's auth and llm): stop_app/start_app mid-batch."""
    jobs = OwnJobs(
        platform,
        postgres.create_database(f"jobs_{uuid.uuid4().hex[:6]}"),
        tmp_path,
        amqp_url=own_rabbit.url,
        extra_env=SLOW_GROUPS,
    )
    jobs.migrate()
    try:
        url = jobs.start_api()
        worker = jobs.start_worker()
        lines = [chat_line(f"rmq-{n:02d}", f"Restart {n} #fake:latency_ms=300") for n in range(60)]
        batch = create_batch(url, client, lines)
        headers = {"Authorization": f"Bearer {client.access_token}"}
        deadline = time.monotonic() + 60
        counts = batch["request_counts"]
        while counts["completed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
            counts = requests.get(f"{url}/v1/batches/{batch['id']}", headers=headers, timeout=10).json()[
                "request_counts"
            ]
        assert 5 <= counts["completed"] < 60, counts  # mid-batch
        own_rabbit.ctl("stop_app")
        deadline = time.monotonic() + 30
        while "broker connection lost" not in worker.tail(10**6) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "broker connection lost" in worker.tail(10**6)
        own_rabbit.ctl("start_app")
        done = wait_batch(url, client, batch["id"], timeout=120)
        assert done["status"] == "completed", (done, worker.tail())
        assert done["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
        output = [line["custom_id"] for line in file_lines(url, client, done["output_file_id"])]
        assert sorted(output) == sorted(line["custom_id"] for line in lines)  # every line, exactly once
        assert charges_once_booked(platform, client, 60) == 60  # nothing charged twice
    finally:
        jobs.stop()
