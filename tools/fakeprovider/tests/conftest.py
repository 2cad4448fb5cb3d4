"""Fixtures: the real fake provider under gunicorn in a subprocess, and official SDK clients for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import anthropic
import openai
import pytest
import requests

API_KEY = "sk-test-key"


def _free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeServer:
    """A running fake provider process and a small control client for it."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        """Wrap the base URL and process."""
        self.url = url
        self.proc = proc
        self.http = requests.Session()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Replace the process-wide knobs via POST /_fake/config."""
        response = self.http.post(f"{self.url}/_fake/config", json=knobs, timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """GET /_fake/stats."""
        return self.http.get(f"{self.url}/_fake/stats", timeout=5).json()

    def reset(self) -> None:
        """Clear global knobs and counters."""
        self.configure()
        self.http.post(f"{self.url}/_fake/stats/reset", timeout=5).raise_for_status()

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """Poll the stats until `condition` holds (the server counts asynchronously to the client)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if condition(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; stats: {stats}")
            time.sleep(0.02)


@contextmanager
def _serve(extra_env: dict[str, str] | None = None) -> Iterator[FakeServer]:
    """Run ``python -m parley_fakeprovider`` on a free port until /healthz answers."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_PROVIDER_")}
    env.update(extra_env or {})
    command = [sys.executable, "-m", "parley_fakeprovider", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*command, "--workers", "1"], env=env, stdout=log, stderr=log)
        server = FakeServer(f"http://127.0.0.1:{port}", proc)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if server.http.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"fake provider did not start:\n{log.read().decode(errors='replace')}")
                time.sleep(0.05)
            yield server
        finally:
            server.http.close()
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[FakeServer]:
    """One fake provider for the whole session (no key required)."""
    with _serve() as server:
        yield server


@pytest.fixture
def serve() -> Callable[..., AbstractContextManager[FakeServer]]:
    """Start an extra fake provider with extra environment variables (a context manager)."""
    return _serve


@pytest.fixture
def fake(shared_server: FakeServer) -> FakeServer:
    """The shared fake provider with default knobs and zeroed counters."""
    shared_server.reset()
    return shared_server


@pytest.fixture
def oai(fake: FakeServer) -> Iterator[openai.OpenAI]:
    """Official OpenAI client pointed at the fake provider."""
    with openai.OpenAI(base_url=f"{fake.url}/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
def claude(fake: FakeServer) -> Iterator[anthropic.Anthropic]:
    """Official Anthropic client pointed at the fake provider."""
    with anthropic.Anthropic(base_url=fake.url, api_key=API_KEY, max_retries=0, timeout=30) as client:
        yield client
