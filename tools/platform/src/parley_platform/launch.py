"""One definition of how the platform's processes are configured, started in order, and stopped."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pika

from parley_kit.processes import ServiceProcess, python_module

SERVICES_WITH_DATABASES = ("auth", "llm", "jobs")


@dataclass(frozen=True)
class PlatformConfig:
    """Everything that differs between `make run`, an integration test run and a benchmark."""

    run_dir: Path
    environment: str
    database_urls: dict[str, str]
    amqp_url: str
    amqp_prefix: str
    secrets: dict[str, str]
    ports: dict[str, int] = field(
        default_factory=lambda: {"gateway": 8080, "auth": 8081, "llm": 8082, "jobs": 8083, "fakeprovider": 8090}
    )
    redis_url: str | None = None
    redis_prefix: str = "parley:"
    openai: tuple[str, str] | None = None  # (base_url, api_key) of a real upstream; None = the fake provider
    anthropic: tuple[str, str] | None = None
    # One process per service on a developer's machine: gevent serves thousands of connections per process, and on 2
    # cores one gateway and one llm worker carry the full path with ~17% less CPU per request than two of each
    # (bench/README.md, session 5), with two processes fewer at idle. Deployments set `*_WORKERS` per host.
    workers: dict[str, int] = field(default_factory=lambda: {"gateway": 1, "auth": 1, "llm": 1, "jobs": 1})
    log_level: str = "INFO"
    logstash: tuple[str, int] | None = None
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        """The local base URL of a process."""
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def uses_fake_provider(self) -> bool:
        """Whether any provider is stood in for by the fake provider."""
        return self.openai is None or self.anthropic is None


class Platform:
    """The platform's processes, in start order: fake provider, auth, llm, jobs API, jobs worker, gateway."""

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.log_dir = config.run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, ServiceProcess] = {}
        for name, argv, ready in self._plan():
            self.processes[name] = ServiceProcess(
                name, argv, env=self._env(name), log_dir=self.log_dir, ready_url=ready
            )

    def _plan(self) -> list[tuple[str, list[str], str | None]]:
        config = self.config
        plan: list[tuple[str, list[str], str | None]] = []
        if config.uses_fake_provider:
            plan.append(
                (
                    "fakeprovider",
                    python_module(
                        "parley_fakeprovider", "--host", "127.0.0.1", "--port", str(config.ports["fakeprovider"])
                    ),
                    f"{config.url('fakeprovider')}/healthz",
                )
            )
        for name in ("auth", "llm", "jobs"):
            plan.append((name, python_module(f"parley_{name}", "serve"), f"{config.url(name)}/readyz"))
        plan.append(("jobs-worker", python_module("parley_jobs", "worker"), None))
        plan.append(("gateway", python_module("parley_gateway", "serve"), f"{config.url('gateway')}/readyz"))
        return plan

    def _env(self, name: str) -> dict[str, str]:
        config = self.config
        service = "jobs" if name == "jobs-worker" else name
        env = {
            "PARLEY_ENV": config.environment,
            "PARLEY_LOG_LEVEL": config.log_level,
            "PARLEY_AMQP_URL": config.amqp_url,
            "PARLEY_AMQP_PREFIX": config.amqp_prefix,
            "PARLEY_JWKS_URL": f"{config.url('auth')}/.well-known/jwks.json",
            "PARLEY_AUTH_URL": config.url("auth"),
            "PARLEY_LLM_URL": config.url("llm"),
            "PARLEY_JOBS_URL": config.url("jobs"),
        }
        if config.logstash:
            env["PARLEY_LOGSTASH_HOST"], env["PARLEY_LOGSTASH_PORT"] = config.logstash[0], str(config.logstash[1])
        if service in config.ports and name != "fakeprovider":
            prefix = service.upper()
            env[f"{prefix}_BIND"] = f"127.0.0.1:{config.ports[service]}"
            env[f"{prefix}_METRICS_DIR"] = str(config.run_dir / "metrics" / name)
            env[f"{prefix}_WORKERS"] = str(config.workers.get(service, 1))
        if service in config.database_urls:
            env[f"{service.upper()}_DATABASE_URL"] = config.database_urls[service]
        secrets = config.secrets
        if service == "auth":
            env["AUTH_SERVICE_CLIENTS"] = json.dumps({"gateway": secrets["gateway"], "jobs": secrets["jobs"]})
            env["AUTH_API_KEY_PEPPER_SECRET"] = secrets["pepper"]
        elif service == "gateway":
            env["GATEWAY_CLIENT_SECRET"] = secrets["gateway"]
            if config.redis_url:
                env["GATEWAY_REDIS_URL"] = config.redis_url
                env["GATEWAY_REDIS_PREFIX"] = config.redis_prefix
        elif service == "jobs":
            env["JOBS_CLIENT_SECRET"] = secrets["jobs"]
        elif service == "llm":
            fake = (f"{config.url('fakeprovider')}/v1", secrets["provider"])
            env["LLM_OPENAI_BASE_URL"], env["LLM_OPENAI_API_KEY"] = config.openai or fake
            env["LLM_ANTHROPIC_BASE_URL"], env["LLM_ANTHROPIC_API_KEY"] = config.anthropic or (
                config.url("fakeprovider"),
                secrets["provider"],
            )
        elif service == "fakeprovider":
            env["FAKE_PROVIDER_API_KEY"] = secrets["provider"]
        env.update(config.extra_env.get(name, {}))
        return env

    def migrate(self) -> None:
        """Bring every service database to the newest schema (the three in parallel: each is its own database)."""
        running = {
            name: subprocess.Popen(
                python_module(f"parley_{name}", "migrate"),
                env=self.processes[name].env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in SERVICES_WITH_DATABASES
        }
        failures = []
        for name, process in running.items():
            output, _ = process.communicate()
            if process.returncode != 0:
                failures.append(f"{name} migrations failed:\n{output}")
        if failures:
            raise RuntimeError("\n".join(failures))

    def start(self, timeout: float = 90.0) -> None:
        """Start every process at once (they only need each other at request time) and wait until all are ready;
        stop them all if one fails."""
        try:
            for process in self.processes.values():
                process.launch()
            for process in self.processes.values():
                if process.ready_url:
                    process.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process at once. SIGINT is gunicorn's quick shutdown (SIGTERM would wait out idle keep-alive
        connections) and the jobs worker's graceful stop; what is still running after `timeout` is killed."""
        for process in self.processes.values():
            process.signal(signal.SIGINT)
        for process in self.processes.values():
            process.wait_stopped(timeout)

    def __enter__(self) -> Platform:
        self.migrate()
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_service(name: str, env: dict[str, str], *, port: int, log_dir: Path, timeout: float = 90.0) -> ServiceProcess:
    """One service on its own, migrated then served and ready: for tests that need a real peer (auth, say) without
    the whole platform. `env` must bind it to `port` (e.g. AUTH_BIND) and name its database."""
    process = ServiceProcess(
        name,
        python_module(f"parley_{name}", "serve"),
        env=env,
        log_dir=log_dir,
        cwd=log_dir,
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
    if name in SERVICES_WITH_DATABASES:
        migrated = subprocess.run(
            python_module(f"parley_{name}", "migrate"),
            env=process.env,
            cwd=log_dir,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"{name} migrations failed:\n{migrated.stdout}\n{migrated.stderr}")
    return process.start(timeout)


# Every queue and exchange the platform's services declare under the AMQP prefix (docs/design.md).
PLATFORM_QUEUES = ("jobs.items", "jobs.items.dead")
PLATFORM_EXCHANGES = ("events", "jobs.dlx")


def delete_broker_names(amqp_url: str, prefix: str, *, extra_queues: tuple[str, ...] = ()) -> None:
    """Remove the queues and exchanges a run under `prefix` declared, so runs never leave names behind."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for queue in (*PLATFORM_QUEUES, *extra_queues):
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                connection.channel().queue_delete(f"{prefix}.{queue}")
        for exchange in PLATFORM_EXCHANGES:
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                connection.channel().exchange_delete(f"{prefix}.{exchange}")
    finally:
        connection.close()
