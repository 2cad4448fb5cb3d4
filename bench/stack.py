"""Everything a benchmark run starts and stops: nginx (static upstream + floor proxy), the platform on PostgreSQL
databases of its own (with the fake provider), and a registered user with an API key."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from bench.measure import process_stats
from parley_kit.processes import ServiceProcess, free_ports
from parley_kit.testing import PostgresServer
from parley_platform import Platform, PlatformConfig, delete_broker_names

# A real chat.completion body (the fake provider's answer, frozen), so llm parses usage exactly as from a provider.
STATIC_COMPLETION = {
    "id": "chatcmpl-bench0000000000000000000",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Parley static benchmark answer", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    "system_fingerprint": "fp_bench",
}

NGINX_CONF = """
daemon off;
master_process on;
worker_processes {workers};
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream static_answer {{
        server 127.0.0.1:{static_port};
        keepalive 256;
    }}
    # The upstream for overhead runs: one static chat.completion for any path and method.
    server {{
        listen 127.0.0.1:{static_port};
        location = /healthz {{ return 200 "ok"; }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
    # The floor: a proxy hop as Debian's nginx does it out of the box (`proxy_pass` alone: HTTP/1.0 and a new
    # connection to the upstream per request). The issue's reference: it measured 11,900 req/s here; this does ~11k.
    server {{
        listen 127.0.0.1:{floor_port};
        location / {{
            proxy_pass http://127.0.0.1:{static_port};
        }}
    }}
    # Beside it, a tuned proxy (keep-alive to the upstream): ~4x the floor's req/s, the cheapest hop there is.
    server {{
        listen 127.0.0.1:{floor_keepalive_port};
        location / {{
            proxy_pass http://static_answer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""

SERVICES = ("gateway", "auth", "llm", "jobs", "fakeprovider")

# Rate limits stay on (the Redis check runs on every request, as in production), with ceilings no benchmark reaches:
# a benchmark measures the cost of the check, not the refusals. `--env` overrides these.
BENCH_ENV = {
    "gateway": {
        "GATEWAY_RATE_LIMIT_KEY_RPM": "1000000000",
        "GATEWAY_RATE_LIMIT_KEY_TPM": "1000000000000",
        "GATEWAY_RATE_LIMIT_USER_RPM": "1000000000",
        "GATEWAY_RATE_LIMIT_USER_TPM": "1000000000000",
    },
}
DATABASES = ("auth", "llm", "jobs")


@dataclass(frozen=True)
class Backing:
    """Where the backing services are (PostgreSQL admin URL, RabbitMQ, Redis)."""

    postgres_url: str
    amqp_url: str
    redis_url: str


@dataclass
class Credentials:
    """The benchmark user: password login for real access tokens (llm path) and an API key (full path)."""

    email: str
    password: str
    api_key: str


class Stack:
    """nginx + the whole platform, started on free loopback ports, stopped (and its databases dropped) on exit."""

    def __init__(self, run_dir: Path, backing: Backing, *, extra_env: dict[str, dict[str, str]] | None = None) -> None:
        self.run_dir = run_dir
        self.backing = backing
        self.run_id = uuid.uuid4().hex[:8]
        self.amqp_prefix = f"parley-bench-{self.run_id}"
        self.redis_prefix = f"parley-bench-{self.run_id}:"
        self.postgres = PostgresServer(backing.postgres_url)
        names = (*SERVICES, "static", "floor", "floor_keepalive")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.secrets = {name: secrets.token_urlsafe(32) for name in ("gateway", "jobs", "pepper", "provider")}
        self.extra_env = {
            name: {**BENCH_ENV.get(name, {}), **(extra_env or {}).get(name, {})}
            for name in {*BENCH_ENV, *(extra_env or {})}
        }
        self.nginx: ServiceProcess | None = None
        self.platform: Platform | None = None
        self.config: PlatformConfig | None = None
        self.credentials: Credentials | None = None

    # ----- addresses -------------------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        """Base URL of a process (`static`, `floor` and `floor_keepalive` are nginx's servers)."""
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def provider_key(self) -> str:
        """The key the fake provider requires (for direct stream and slow-upstream runs)."""
        return self.secrets["provider"]

    # ----- start / stop ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """nginx first (it is llm's upstream), then the platform with llm's OpenAI provider on the static answer."""
        self._start_nginx()
        databases = {name: self.postgres.create_database(f"bench_{self.run_id}_{name}") for name in DATABASES}
        self.config = PlatformConfig(
            run_dir=self.run_dir,
            environment="production",
            database_urls=databases,
            amqp_url=self.backing.amqp_url,
            amqp_prefix=self.amqp_prefix,
            secrets=self.secrets,
            ports={name: self.ports[name] for name in SERVICES},
            redis_url=self.backing.redis_url,
            redis_prefix=self.redis_prefix,
            openai=(f"{self.url('static')}/v1", self.secrets["provider"]),
            log_level="WARNING",
            extra_env=self.extra_env,
        )
        self.platform = Platform(self.config)
        self.platform.migrate()
        self.platform.start()
        self.credentials = self._register()

    def _start_nginx(self) -> None:
        nginx_dir = self.run_dir / "nginx"
        nginx_dir.mkdir(parents=True, exist_ok=True)
        conf = NGINX_CONF.format(
            run=nginx_dir,
            workers="auto",
            static_port=self.ports["static"],
            floor_port=self.ports["floor"],
            floor_keepalive_port=self.ports["floor_keepalive"],
            body=json.dumps(STATIC_COMPLETION, separators=(",", ":")),
        )
        (nginx_dir / "nginx.conf").write_text(conf)
        self.nginx = ServiceProcess(
            "nginx",
            ["nginx", "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-e", str(nginx_dir / "error.log")],
            env={},
            log_dir=self.run_dir / "logs",
            ready_url=f"{self.url('static')}/healthz",
        )
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.nginx.start(timeout=15)

    def point_llm_at(self, upstream: str) -> None:
        """Restart llm with its OpenAI provider at `static` (nginx) or `fakeprovider` (streams, slow upstream)."""
        assert self.platform is not None
        llm = self.platform.processes["llm"]
        llm.stop(signum=signal.SIGINT)
        llm.env["LLM_OPENAI_BASE_URL"] = f"{self.url(upstream)}/v1"
        llm.launch()
        llm.wait_ready(60)

    def stop(self) -> None:
        """Stop every process, then drop this run's databases, broker names and Redis keys."""
        if self.platform is not None:
            self.platform.stop()
        if self.nginx is not None:
            self.nginx.stop(signum=signal.SIGQUIT)
        with contextlib.suppress(Exception):
            self.postgres.drop_all()
        with contextlib.suppress(Exception):
            delete_broker_names(self.backing.amqp_url, self.amqp_prefix, extra_queues=("bench.raw",))
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(self.backing.redis_url)
            for key in client.scan_iter(f"{self.redis_prefix}*"):
                client.delete(key)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.print_log_tails()
            self.stop()
            raise
        return self

    def print_log_tails(self, lines: int = 30) -> None:
        """The end of every process's log on stderr (the run folder is temporary: say why before it goes)."""
        processes = dict(self.platform.processes) if self.platform else {}
        if self.nginx is not None:
            processes["nginx"] = self.nginx
        for name, process in processes.items():
            print(f"----- {name} log (last {lines} lines) -----\n{process.tail(lines)}", file=sys.stderr)

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ----- identities ------------------------------------------------------------------------------------------

    def _register(self) -> Credentials:
        gateway = self.url("gateway")
        email, password = f"bench-{self.run_id}@example.com", secrets.token_urlsafe(16)
        registered = requests.post(f"{gateway}/auth/register", json={"email": email, "password": password}, timeout=10)
        registered.raise_for_status()
        token = self.access_token_for(email, password)
        key = requests.post(
            f"{gateway}/auth/api-keys",
            json={"name": "bench"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        key.raise_for_status()
        return Credentials(email, password, key.json()["key"])

    def access_token_for(self, email: str, password: str) -> str:
        """A fresh user access token from auth (minutes-long: fetched again before each llm-path scenario)."""
        answer = requests.post(
            f"{self.url('gateway')}/auth/token", json={"email": email, "password": password}, timeout=10
        )
        answer.raise_for_status()
        return answer.json()["access_token"]

    def access_token(self) -> str:
        """A fresh access token for the benchmark user."""
        assert self.credentials is not None
        return self.access_token_for(self.credentials.email, self.credentials.password)

    # ----- processes -------------------------------------------------------------------------------------------

    def process_groups(self) -> dict[str, int]:
        """Each platform process's group id (= its leader's pid: every one is started in a new session)."""
        assert self.platform is not None
        return {
            name: process.process.pid
            for name, process in self.platform.processes.items()
            if process.process is not None and process.process.poll() is None
        }

    def worker_pids(self, name: str) -> list[int]:
        """The gunicorn workers of a service (children of its master)."""
        master = self.process_groups()[name]
        return [pid for pid, ppid in _parents().items() if ppid == master]


def _parents() -> dict[int, int]:
    """pid → parent pid for every process on the machine."""
    return {pid: int(stat[1]) for pid, stat in process_stats()}


def run_quiet(argv: list[str]) -> str:
    """A short command's combined output ('' if it cannot run)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()
