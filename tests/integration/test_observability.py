"""Issue #7, live: a real Prometheus (Debian's package) scrapes the running platform with deploy/prometheus's jobs
and rules, and every query behind the Grafana dashboards returns data; the ECS records every process ships to the
Logstash stand-in share one trace.id along a request (gateway → llm) and along a batch item (worker → llm)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import openai
import pytest
import requests
import yaml

from parley_kit.testing import ServiceProcess, free_port

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


def load_opslib() -> ModuleType:
    """tests/ops/opslib.py (metric names in PromQL, the pending list), loaded by path: test folders are no packages."""
    spec = importlib.util.spec_from_file_location("parley_opslib", ROOT / "tests" / "ops" / "opslib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


opslib = load_opslib()

# The explicit allow-list: metrics the dashboards use that no service exports yet (tests/ops/pending_metrics.yaml,
# which tests/ops forces to shrink as soon as a metric appears in the code). A query reading one of them is still
# run (it must be valid) but may come back empty.
PENDING: dict[str, str] = opslib.pending_metrics()
# Exported, but only once something happens that a healthy test platform must not do. Also a list that must shrink:
# the test fails when one of these starts returning data (remove it here then).
NOT_EXERCISED: dict[str, str] = {
    "parley_circuit_open": "llm sets it only when a circuit opens or closes (it should start every deployment at 0)",
}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until `condition()` is truthy (returning it) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


# --- Prometheus ----------------------------------------------------------------------------------------------------


def prometheus_binary() -> str:
    """Debian's prometheus server binary (package `prometheus`, installed by `make system-deps`)."""
    found = shutil.which("prometheus")
    if found:
        return found
    message = "prometheus is not installed (Debian package prometheus: make system-deps)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def live_config(platform: RunningPlatform, own_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the same jobs and rules, pointed at this platform's ports, every 1 s."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(path) for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))]
    targets = {name: platform.config.ports[name] for name in ("gateway", "auth", "llm", "jobs")}
    targets["jobs-worker"] = platform.worker_metrics_port
    targets["prometheus"] = own_port
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        assert name in targets, f"the live test does not know where {name} runs"
        jobs.append({"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{targets[name]}"]}]})
    config["scrape_configs"] = jobs
    return config


def unix_time(rfc3339: str) -> float:
    """Seconds since the epoch of a UTC RFC 3339 time as Prometheus writes it (up to nine fractional digits)."""
    whole, _, fraction = rfc3339.removesuffix("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float(f"0.{fraction or 0}")


class Prometheus:
    """A running Prometheus and its HTTP query API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (fails on a query error)."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scrape_health(self) -> list[str]:
        """Each target's last scrape: job, health, duration, error (for failure messages)."""
        targets = requests.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return [
            f"{t['labels']['job']}: {t['health']} {t['lastScrapeDuration']:.3f}s {t['lastError']}".strip()
            for t in targets
        ]

    def has_data(self, expr: str) -> bool:
        """Whether the query returns at least one series with a finite value."""
        return any(math.isfinite(float(sample["value"][1])) for sample in self.query(expr))

    def scraped_since(self, moment: float, jobs: set[str]) -> bool:
        """Whether each of `jobs` has had a successful scrape that started after `moment` (unix seconds): its
        samples hold everything that happened before then. Targets are scraped on schedules of their own, so one
        target's fresh sample says nothing about another's."""
        fresh = {s["metric"]["job"] for s in self.query("timestamp(up == 1)") if float(s["value"][1]) > moment}
        return jobs <= fresh

    def evaluated_since(self, moment: float) -> bool:
        """Whether every rule group has been evaluated at a timestamp after `moment`. A group's evaluation timestamp
        is the latest tick of its interval, so one that started more than an interval after `moment` is later."""
        groups = requests.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return bool(groups) and all(unix_time(g["lastEvaluation"]) > moment + g["interval"] for g in groups)


@pytest.fixture(scope="module")
def prometheus(platform: RunningPlatform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus on a free port with its own storage, scraping the platform; stopped at teardown."""
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(live_config(platform, port)))
    process = ServiceProcess(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.console.templates=/usr/share/prometheus/consoles",
            "--web.console.libraries=/usr/share/prometheus/console_libraries",
        ],
        env={},
        log_dir=work,
        ready_url=f"http://127.0.0.1:{port}/-/ready",
    )
    process.start(timeout=30)
    try:
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        process.stop()


def openai_client(platform: RunningPlatform, client: Client) -> openai.OpenAI:
    """The official SDK at the gateway, retries off. Use it in a `with` block: a client left to the garbage collector
    can leave its socket unclosed, a ResourceWarning that warnings-as-errors turns into a failed session."""
    return openai.OpenAI(base_url=f"{platform.gateway}/v1", api_key=client.api_key, max_retries=0, timeout=30)


def run_batch(platform: RunningPlatform, client: Client, lines: int) -> Any:
    """A chat batch of `lines` items through files → batches → workers, waited on until it ends."""
    with openai_client(platform, client) as sdk:
        payload = "\n".join(
            json.dumps(
                {
                    "custom_id": f"line-{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Item {n}"}]},
                }
            )
            for n in range(lines)
        ).encode()
        uploaded = sdk.files.create(file=("input.jsonl", io.BytesIO(payload)), purpose="batch")
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

        def finished() -> Any:
            current = sdk.batches.retrieve(batch.id)
            return current if current.status in ("completed", "failed", "expired", "cancelled") else None

        done = wait_for(finished, f"batch {batch.id}", timeout=60)
        assert done.status == "completed", done
        return done


def one_round(platform: RunningPlatform, client: Client) -> None:
    """Every kind of call the dashboards chart: completions (plain, streamed), a message, an upstream failure, a
    refused key, a batch."""
    with openai_client(platform, client) as sdk:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Stream, please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        assert list(stream)
        headers = {"x-api-key": client.api_key, "anthropic-version": "2023-06-01"}
        message = requests.post(
            f"{platform.gateway}/v1/messages",
            json={"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]},
            headers=headers,
            timeout=30,
        )
        assert message.status_code == 200, message.text
        # An upstream failure (the fake provider's in-band knob): error_type on the GenAI metrics, a 5xx on the routes.
        # Two attempts per call stay below the circuit breaker's five consecutive failures.
        with pytest.raises(openai.APIStatusError) as failed:
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Fail please #fake:error=500"}]
            )
        assert failed.value.status_code >= 500
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Fine again"}])
        # A made-up key: an authentication failure at the edge.
        refused = requests.get(
            f"{platform.gateway}/v1/models", headers={"Authorization": f"Bearer sk-pl-{'A' * 43}"}, timeout=10
        )
        assert refused.status_code == 401
        run_batch(platform, client, lines=1)


def batches_seen(prometheus: Prometheus) -> float:
    """Batches finished, as Prometheus last scraped them."""
    result = prometheus.query("sum(parley_jobs_batches_total)")
    return float(result[0]["value"][1]) if result else 0.0


def scraped_jobs() -> set[str]:
    """The job names of deploy/prometheus/prometheus.yml."""
    return {
        job["job_name"] for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }


@pytest.fixture(scope="module")
def traffic(platform: RunningPlatform, prometheus: Prometheus) -> None:
    """Two rounds of use, each followed by a fresh scrape of every target, then an evaluation of every rule group.

    A series is born at its first event, so its first sample already holds it: a rate (and the quantiles and ratios
    built on it) needs a later, higher sample. Each round therefore waits until every target (not just one: each has
    its own scrape schedule) has been scraped after it; otherwise a series touched only by these rounds, such as the
    streams' time to first chunk, could be first scraped after both, stay flat, and chart nothing (issue #7)."""
    client = platform.new_client()
    jobs = scraped_jobs()
    one_round(platform, client)
    moment = time.time()
    wait_for(lambda: prometheus.scraped_since(moment, jobs), "every target scraped after the first round")
    first = batches_seen(prometheus)
    one_round(platform, client)
    moment = time.time()
    wait_for(
        lambda: prometheus.scraped_since(moment, jobs) and batches_seen(prometheus) > first,
        "every target scraped after the second round",
    )
    scraped = time.time()
    wait_for(lambda: prometheus.evaluated_since(scraped), "every rule group evaluated after the second round's scrapes")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every panel query, Grafana variables substituted."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "5m").replace("$__range", "10m")
                queries.append((dashboard["uid"], panel["title"], expr))
    return queries


@pytest.mark.live_prometheus
def test_every_target_is_scraped(prometheus: Prometheus, traffic: None) -> None:
    """Every job of deploy/prometheus/prometheus.yml is up: the services' /metrics and the worker's own port."""
    up = {sample["metric"]["job"]: sample["value"][1] for sample in prometheus.query("up")}
    assert set(up) == scraped_jobs()
    assert all(value == "1" for value in up.values()), up


@pytest.mark.live_prometheus
def test_every_dashboard_query_returns_data(prometheus: Prometheus, traffic: None) -> None:
    """Each panel query runs, and returns a finite value unless it reads a metric on the pending allow-list. No
    retries: after `traffic`, every series it touched has two scrapes with an increase between them."""
    empty, pending, arrived = [], [], []
    for uid, title, expr in dashboard_queries():
        waiting_for = opslib.metric_names(expr) & (set(PENDING) | set(NOT_EXERCISED))
        if waiting_for:
            if prometheus.has_data(expr) and waiting_for <= set(NOT_EXERCISED):
                arrived.append(f"{uid} / {title}: {sorted(waiting_for)}")
            pending.append((uid, title, sorted(waiting_for)))
        elif not prometheus.has_data(expr):
            empty.append(f"{uid} / {title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty + prometheus.scrape_health())
    assert not arrived, "now returning data, remove from NOT_EXERCISED:\n" + "\n".join(arrived)
    assert {name for *_, names in pending for name in names} <= set(PENDING) | set(NOT_EXERCISED)
    assert len(pending) < len(dashboard_queries()) / 4, f"most panels wait on pending metrics: {pending}"


@pytest.mark.live_prometheus
def test_alert_rules_are_loaded_and_quiet(prometheus: Prometheus, traffic: None) -> None:
    """The live server loaded every alert of deploy/prometheus/rules; none of the page-level ones fires on a
    healthy platform."""
    groups = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert loaded == set(opslib.alert_rules())
    healthy = [r for g in groups for r in g["rules"] if r["type"] == "alerting" and r["name"] == "ParleyServiceDown"]
    assert healthy and healthy[0]["state"] == "inactive"


# --- one trace across services -----------------------------------------------------------------------------------


def records_of_trace(platform: RunningPlatform, trace_id: str) -> list[dict[str, Any]]:
    """The collected ECS records of one trace."""
    return [record for record in platform.logs.records() if record.get("trace", {}).get("id") == trace_id]


def trace_of_request(platform: RunningPlatform, request_id: str, service: str) -> str:
    """The trace id of the request a `x-request-id` names (`req_` + the trace id's first 24 hex digits)."""
    prefix = request_id.removeprefix("req_")

    def find() -> str | None:
        for record in platform.logs.records():
            trace = record.get("trace", {}).get("id", "")
            if trace.startswith(prefix) and record.get("service", {}).get("name") == service:
                return trace
        return None

    return wait_for(find, f"{service}'s record of request {request_id}")


def services_of(records: list[dict[str, Any]]) -> set[str]:
    """The service names among records."""
    return {record["service"]["name"] for record in records}


@pytest.mark.live_prometheus
def test_records_are_ecs(platform: RunningPlatform, traffic: None) -> None:
    """What Logstash receives is ECS as Elasticsearch maps it: host an object, levels lower case, a timestamp."""
    records = wait_for(platform.logs.records, "any shipped record")
    assert not [r for r in records if "unparsed" in r], "a shipped line was not JSON"
    for record in records[:200]:
        assert {"@timestamp", "message", "log", "service", "host", "ecs"} <= set(record), record
        assert isinstance(record["host"], dict) and record["log"]["level"] == record["log"]["level"].lower()
    names = {record["service"]["name"] for record in records}
    assert {"gateway", "auth", "llm", "jobs"} <= names


def test_one_request_shares_a_trace_from_gateway_to_llm(platform: RunningPlatform, client: Client) -> None:
    """A completion through the gateway: its gateway and llm records (access lines, the llm call line) carry one
    trace.id, the one the x-request-id the client got back names."""
    response = requests.post(
        f"{platform.gateway}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"trace {uuid.uuid4()}"}]},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    trace = trace_of_request(platform, response.headers["x-request-id"], "gateway")

    # The access lines of both hops; auth's key exchange, when the key was not cached yet, joins in. (llm's call line
    # is checked by test_llm_call_line_carries_the_trace below.)
    wanted = {("gateway", "parley.access"), ("llm", "parley.access")}

    def complete() -> list[dict[str, Any]] | None:
        records = records_of_trace(platform, trace)
        loggers = {(r["service"]["name"], r["log"]["logger"]) for r in records}
        return records if wanted <= loggers else None

    records = wait_for(complete, f"gateway and llm records of trace {trace}")
    assert services_of(records) <= {"gateway", "auth", "llm"}
    # Shipped records carry the request id like stdout does: every record of the trace names the client's.
    request_ids = [r.get("http", {}).get("request", {}).get("id") for r in records]
    assert request_ids and set(request_ids) == {response.headers["x-request-id"]}, request_ids


def item_traces(platform: RunningPlatform, batch_id: str) -> set[str]:
    """The trace ids of the worker's records about one batch."""
    return {
        record["trace"]["id"]
        for record in platform.logs.records()
        if record.get("batch", {}).get("id") == batch_id and "trace" in record
    }


def test_one_batch_item_shares_a_trace_from_worker_to_llm(platform: RunningPlatform, client: Client) -> None:
    """A one-line batch: the worker's records of the item and llm's records of the call it made share a trace.id."""
    batch = run_batch(platform, client, lines=1)
    traces = wait_for(lambda: item_traces(platform, batch.id), f"worker records of batch {batch.id}")

    def worker_and_llm() -> list[dict[str, Any]] | None:
        for trace in traces:
            records = records_of_trace(platform, trace)
            if "llm" in services_of(records):
                return records
        return None

    records = wait_for(worker_and_llm, f"llm records sharing a trace with batch {batch.id}'s worker")
    # The item continues the trace of the request that created its batch (gateway → jobs); the worker's act-as
    # exchange at auth is part of it when it happens.
    assert {"jobs", "llm"} <= services_of(records) <= {"gateway", "jobs", "auth", "llm"}
    assert any(r["log"]["logger"] == "parley.access" and r["service"]["name"] == "llm" for r in records)
    assert any(r.get("batch", {}).get("id") == batch.id for r in records)


def user_id_of(client: Client) -> str:
    """The user id in the client's access token (its `sub`; read, not verified: the test only needs the value)."""
    payload = client.access_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


def test_llm_call_line_carries_the_trace(platform: RunningPlatform, client: Client) -> None:
    """llm's one line per upstream call (model, tokens, cost) is in the request's trace like its access line."""
    response = requests.post(
        f"{platform.gateway}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "call line"}]},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    trace = trace_of_request(platform, response.headers["x-request-id"], "gateway")
    user = user_id_of(client)
    (call,) = wait_for(
        lambda: [
            r
            for r in platform.logs.records()
            if r["log"]["logger"] == "parley_llm.calls" and r.get("user", {}).get("id") == user
        ],
        f"llm's call line for user {user}",
    )
    assert call.get("trace", {}).get("id") == trace


def test_batch_creation_trace_reaches_the_worker(platform: RunningPlatform, client: Client) -> None:
    """The trace of POST /v1/batches (gateway → jobs) continues into the worker's records of its items and llm."""
    with openai_client(platform, client) as sdk:
        line = {
            "custom_id": "only",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "traced batch"}]},
        }
        uploaded = sdk.files.create(file=("input.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
        created = sdk.batches.with_raw_response.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = created.parse()
        trace = trace_of_request(platform, created.headers["x-request-id"], "gateway")
        # Each process ships on its own connection: jobs' record of the same request may land after the gateway's.
        wait_for(lambda: "jobs" in services_of(records_of_trace(platform, trace)), f"jobs' records of trace {trace}")
        wait_for(
            lambda: trace in item_traces(platform, batch.id), f"worker records of batch {batch.id} in trace {trace}"
        )
        wait_for(
            lambda: {"gateway", "jobs", "llm"} <= services_of(records_of_trace(platform, trace)),
            f"gateway, jobs and llm records of trace {trace}",
        )
