"""Fault 1: RabbitMQ (our own node, its own port) stopped and started with `rabbitmqctl stop_app` / `start_app`.
tests/integration/test_batches_e2e.py restarts it once mid-batch; here the broker is already down when the batch is
created (the API must still accept it: the outbox holds the publish) and goes down a second time mid-batch. Every line
is answered exactly once and charged once in llm's ledger; the time from `start_app` to the next line done is
measured."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from parley_kit.testing import eventually

from .conftest import batches_e2e, figure

if TYPE_CHECKING:
    from tests.integration.conftest import Client, RunningPlatform

LINES = 40


def completed(url: str, client: Client, batch_id: str) -> int:
    """Lines done so far."""
    headers = {"Authorization": f"Bearer {client.access_token}"}
    batch = requests.get(f"{url}/v1/batches/{batch_id}", headers=headers, timeout=10).json()
    return batch["request_counts"]["completed"] + batch["request_counts"]["failed"]


def test_a_broker_down_at_creation_and_again_mid_batch_loses_nothing_and_charges_once(
    platform: RunningPlatform, postgres: Any, own_rabbit: Any, client: Client, tmp_path: Path
) -> None:
    jobs = batches_e2e.OwnJobs(
        platform,
        postgres.create_database(f"jobs_{uuid.uuid4().hex[:6]}"),
        tmp_path,
        amqp_url=own_rabbit.url,
        extra_env=batches_e2e.SLOW_GROUPS,
    )
    jobs.migrate()
    try:
        url = jobs.start_api()
        worker = jobs.start_worker()
        assert eventually(lambda: '"consumer":"jobs-items"' in worker.tail(10**6), 60), worker.tail()

        def losses() -> int:
            return worker.tail(10**6).count("broker connection lost")

        own_rabbit.ctl("stop_app")  # down before the batch exists
        assert eventually(lambda: losses() >= 1, 30), worker.tail()
        lines = [batches_e2e.chat_line(f"rmq-{n:02d}", f"Flap {n} #fake:latency_ms=300") for n in range(LINES)]
        batch = batches_e2e.create_batch(url, client, lines)  # accepted while the broker is down
        time.sleep(1)  # a relay tick or more with nowhere to publish
        assert completed(url, client, batch["id"]) == 0
        down_at_creation = batches_e2e.scalar(
            jobs.database_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        own_rabbit.ctl("start_app")
        started = time.monotonic()
        assert eventually(lambda: completed(url, client, batch["id"]) >= 5, 90), worker.tail()
        first_recovery = time.monotonic() - started

        done_before = completed(url, client, batch["id"])
        assert done_before < LINES, "the batch ended before the second outage"
        own_rabbit.ctl("stop_app")  # down again, mid-batch
        assert eventually(lambda: losses() >= 2, 30), worker.tail()
        own_rabbit.ctl("start_app")
        started = time.monotonic()
        done = batches_e2e.wait_batch(url, client, batch["id"], timeout=120)
        second_recovery = time.monotonic() - started
        assert done["status"] == "completed", (done, worker.tail())
        assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        output = [line["custom_id"] for line in batches_e2e.file_lines(url, client, done["output_file_id"])]
        assert sorted(output) == sorted(line["custom_id"] for line in lines)  # every line, exactly once
        assert batches_e2e.charges(platform, client) == LINES  # one charge per line
        attempts = batches_e2e.scalar(
            jobs.database_url, "SELECT sum(attempts) FROM batch_items WHERE batch_id = :b", b=batch["id"]
        )
        figure(
            "rabbitmq-stop-start",
            outages=2,
            unpublished_while_down=down_at_creation,
            lines=LINES,
            answered_once=len(set(output)),
            charges=LINES,
            item_attempts=attempts,
            seconds_start_app_to_5_lines=round(first_recovery, 2),
            seconds_start_app_to_batch_done=round(second_recovery, 2),
        )
    finally:
        jobs.stop()
