"""The official openai SDK against `python -m parley_jobs serve` (real gunicorn process, real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from parley_jobs.settings import JobsSettings
from parley_kit.testing import ServiceProcess, TokenMint, free_port, python_module

from .conftest import chat_line, jsonl


@pytest.fixture
def jobs_url(settings: JobsSettings, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        "PARLEY_ENV": "test",
        "JOBS_BIND": f"127.0.0.1:{port}",
        "JOBS_WORKERS": "1",
        "JOBS_DATABASE_URL": settings.database_url,
        "JOBS_CLIENT_SECRET": "test-secret",
        "JOBS_METRICS_DIR": str(tmp_path / "metrics"),
        "PARLEY_JWKS_URL": settings.jwks_url,
        "PARLEY_AMQP_URL": settings.amqp_url,
    }
    process = ServiceProcess(
        "jobs",
        python_module("parley_jobs", "serve"),
        env=env,
        log_dir=tmp_path,
        ready_url=f"http://127.0.0.1:{port}/readyz",
    ).start()
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


@pytest.mark.integration
def test_the_openai_sdk_uploads_creates_reads_and_cancels(jobs_url: str, token_mint: TokenMint) -> None:
    alice = openai.OpenAI(base_url=jobs_url, api_key=token_mint.mint("alice"), max_retries=0)
    bob = openai.OpenAI(base_url=jobs_url, api_key=token_mint.mint("bob"), max_retries=0)
    with alice, bob:
        check_the_files_and_batch_api(alice, bob)


def check_the_files_and_batch_api(alice: openai.OpenAI, bob: openai.OpenAI) -> None:
    """Upload, read back, create, list, isolation, a refused file, cancel."""
    content = jsonl([chat_line("a"), chat_line("b")])
    file = alice.files.create(file=("in.jsonl", content), purpose="batch")
    assert file.id.startswith("file-") and file.bytes == len(content)
    assert alice.files.content(file.id).read() == content

    batch = alice.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 2
    assert alice.batches.retrieve(batch.id).metadata == {"k": "v"}
    assert [b.id for b in alice.batches.list(limit=10)] == [batch.id]

    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.BadRequestError) as caught:
        alice.files.create(file=("bad.jsonl", b'{"custom_id": "x"}\n'), purpose="batch")
    assert "line 1" in caught.value.message

    cancelled = alice.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.error_file_id
    assert len(alice.files.content(cancelled.error_file_id).read().splitlines()) == 2
