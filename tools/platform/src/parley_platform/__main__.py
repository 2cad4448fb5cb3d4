"""`make run`: the whole platform on this machine, SQLite files, the local RabbitMQ, stopped with Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from pathlib import Path

import pika
import redis

from .launch import Platform, PlatformConfig

BANNER = """
Parley is running.
  Gateway (the only door):  {gateway}
  API docs (Swagger UI):    {auth}/openapi, {llm}/openapi, {jobs}/openapi
  Upstream:                 {upstream}
  Logs:                     {logs}/<service>.log

Get a key (a new user):
  H='content-type: application/json'; ME='{{"email":"me@example.com","password":"correct horse battery"}}'
  curl -s {gateway}/auth/register -H "$H" -d "$ME"
  TOKEN=$(curl -s {gateway}/auth/token -H "$H" -d "$ME" | jq -r .access_token)
  curl -s {gateway}/auth/api-keys -H "$H" -H "authorization: Bearer $TOKEN" -d '{{"name":"laptop"}}'

Then: OpenAI(base_url="{gateway}/v1", api_key="sk-pl-...").  Ctrl-C stops everything.
"""


def dev_secrets(run_dir: Path) -> dict[str, str]:
    """Secrets for this checkout, made once and kept in .run/ (API keys stay valid across restarts)."""
    path = run_dir / "dev-secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    made = {name: secrets.token_urlsafe(32) for name in ("gateway", "jobs", "pepper", "provider")}
    path.write_text(json.dumps(made))
    path.chmod(0o600)
    return made


def broker_reachable(url: str) -> bool:
    """Whether RabbitMQ accepts a connection."""
    params = pika.URLParameters(url)
    params.connection_attempts, params.socket_timeout = 1, 2
    try:
        pika.BlockingConnection(params).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means not reachable
        return False


def redis_reachable(url: str) -> bool:
    """Whether Redis answers a ping."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:  # noqa: BLE001
        return False


def main() -> None:
    """Start everything, print where it is, wait for Ctrl-C, stop everything."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default=".run", type=Path)
    args = parser.parse_args()
    run_dir: Path = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    amqp_url = os.environ.get("PARLEY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    if not broker_reachable(amqp_url):
        sys.exit(
            "RabbitMQ is not reachable at 127.0.0.1:5672 (PARLEY_AMQP_URL): start it with "
            "`rabbitmq-server -detached` or `docker compose up -d rabbitmq`, then `make run` again."
        )
    redis_url = os.environ.get("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_reachable(redis_url):
        print("warning: Redis is not reachable; the gateway keeps rate limits in-process (development only).")
        redis_url = None

    def provider(prefix: str, default_base: str) -> tuple[str, str] | None:
        key = os.environ.get(f"LLM_{prefix}_API_KEY")
        return (os.environ.get(f"LLM_{prefix}_BASE_URL", default_base), key) if key else None

    config = PlatformConfig(
        run_dir=run_dir,
        environment="development",
        database_urls={name: f"sqlite:///{run_dir / name}.db" for name in ("auth", "llm", "jobs")},
        amqp_url=amqp_url,
        amqp_prefix=os.environ.get("PARLEY_AMQP_PREFIX", "parley"),
        secrets=dev_secrets(run_dir),
        redis_url=redis_url,
        openai=provider("OPENAI", "https://api.openai.com/v1"),
        anthropic=provider("ANTHROPIC", "https://api.anthropic.com"),
    )
    platform = Platform(config)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print("Migrating databases and starting the services ...", flush=True)
    try:
        platform.migrate()
        platform.start()
        upstream = (
            "the fake provider at " + config.url("fakeprovider") if config.uses_fake_provider else "real providers"
        )
        print(
            BANNER.format(
                gateway=config.url("gateway"),
                auth=config.url("auth"),
                llm=config.url("llm"),
                jobs=config.url("jobs"),
                upstream=upstream,
                logs=platform.log_dir,
            ),
            flush=True,
        )
        signal.pause()
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        print("\nStopping ...", flush=True)
        platform.stop()


if __name__ == "__main__":
    main()
