"""Secret hygiene (issue #9): canary secrets pushed through every path, success and failure, with DEBUG logging on,
must show up nowhere but in the one response that legitimately returns each of them.

One platform of our own (DEBUG logs, a provider key the fake provider requires, small body and rate limits so 413
and 429 are cheap to reach) runs a scripted session: registration, logins (right and wrong), refresh (and replay),
API keys (created, used, revoked, forged), chat, streams, embeddings, Anthropic messages, upstream failures,
validation errors whose input carries a secret, 401/403/404/413/429, batches whose lines carry secrets, a password
change. Every response, every process's log file, every record shipped to the log collector and every /metrics
page is then searched for each secret, its base64 and URL encodings and a 12-character slice of it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import requests

from parley_kit.testing import PostgresServer, free_ports
from parley_platform import Platform, PlatformConfig, delete_broker_names
from tests.integration.conftest import LogCollector

pytestmark = pytest.mark.timeout(240)

BODY_LIMIT = 64 * 1024
KEY_RPM = 30  # requests per minute per API key: the throttled key reaches it, the others stay under it
LOGIN_FAILURES = 3  # per account: the throttled account reaches it
CHAT = "/v1/chat/completions"
SERVICES = ("gateway", "auth", "llm", "jobs")


# ----- needles --------------------------------------------------------------------------------------------------


def b64_variants(secret: str) -> set[str]:
    """The base64 (standard and URL-safe) of `secret` at each of the three alignments it can have inside a longer
    encoded string, trimmed to the characters that do not depend on its neighbours."""
    raw = secret.encode()
    found = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        # a character encodes 6 bits: keep those whose bits all come from the secret
        stable = encoded[-(-8 * shift // 6) : 8 * (shift + len(raw)) // 6]
        if len(stable) >= 12:
            found.add(stable)
            found.add(stable.replace("+", "-").replace("/", "_"))
    return found


@dataclass(frozen=True)
class Secret:
    """A canary and the forms of it that must not leak."""

    name: str
    value: str
    slice_from: int = 0  # where the 12-character slice starts (past a public prefix such as `sk-pl-`)

    def needles(self) -> dict[str, str]:
        """form → text to search for."""
        forms = {"raw": self.value, "slice12": self.value[self.slice_from : self.slice_from + 12]}
        quoted = quote(self.value, safe="")
        if quoted != self.value:
            forms["url"] = quoted
        for index, variant in enumerate(sorted(b64_variants(self.value))):
            forms[f"base64#{index}"] = variant
        return forms


def jwt_secret(name: str, token: str) -> Secret:
    """A JWT: the header (first 12 characters) is the same for every token, so the slice is taken from the
    signature, the part only this token has."""
    return Secret(name, token, slice_from=token.rindex(".") + 1)


def find_leaks(text: str, canaries: list[Secret], where: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Every (secret, form) found in `text`, except the secrets `allowed` there."""
    return [
        f"{where}: {secret.name} ({form})"
        for secret in canaries
        if secret.name not in allowed
        for form, needle in secret.needles().items()
        if needle in text
    ]


# ----- the session ----------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One response as the client saw it, and which secrets it may legitimately carry."""

    label: str
    status: int
    headers: str
    body: str
    allowed: frozenset[str] = frozenset()
    elapsed: float = 0.0


@dataclass
class Session:
    """Everything the scripted session produced."""

    canaries: list[Secret] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    log_files: dict[str, str] = field(default_factory=dict)
    path_probes: list[str] = field(default_factory=list)
    shipped: list[dict[str, Any]] = field(default_factory=list)
    provider_saw: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """requests against the gateway, keeping every response."""

    def __init__(self, gateway: str, session: Session) -> None:
        self.gateway = gateway
        self.session = session
        self.http = requests.Session()

    def call(
        self, label: str, method: str, path: str, *, allowed: tuple[str, ...] = (), **kwargs: Any
    ) -> requests.Response:
        """One request; its answer is recorded (the whole stream, for streams)."""
        kwargs.setdefault("timeout", 60)
        started = time.monotonic()
        response = self.http.request(method, f"{self.gateway}{path}", **kwargs)
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        self.session.exchanges.append(
            Exchange(
                label, response.status_code, headers, response.text, frozenset(allowed), time.monotonic() - started
            )
        )
        return response

    def add(self, *canaries: Secret) -> None:
        """Secrets to search for."""
        self.session.canaries.extend(canaries)


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    """A small chat request (the fake provider echoes only the first six words of the last user message)."""
    return {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}


def hidden(*values: str) -> str:
    """Message text carrying secrets past the six words the fake provider echoes back."""
    return "please answer briefly and do not repeat " + " ".join(values)


def run_session(rec: Recorder, config: PlatformConfig) -> None:
    """The scripted session: every path, success and failure, with the canaries in play."""
    canary = lambda tag: f"{secrets.token_urlsafe(18)}-{tag}-canary"  # noqa: E731
    email = f"hygiene-{uuid.uuid4().hex[:10]}@example.com"
    password, wrong_password = canary("pw"), canary("wrongpw")
    forged_key = "sk-pl-" + secrets.token_urlsafe(32)
    rec.add(
        Secret("provider_key", config.secrets["provider"]),
        Secret("gateway_client_secret", config.secrets["gateway"]),
        Secret("jobs_client_secret", config.secrets["jobs"]),
        Secret("api_key_pepper", config.secrets["pepper"]),
        Secret("password", password),
        Secret("wrong_password", wrong_password),
        Secret("forged_api_key", forged_key, slice_from=6),
    )

    # accounts: registration (and its validation errors, with the password where the e-mail should be)
    rec.call("register", "POST", "/auth/register", json={"email": email, "password": password})
    rec.call("register again", "POST", "/auth/register", json={"email": email, "password": password})
    rec.call("register bad email", "POST", "/auth/register", json={"email": password, "password": password})
    rec.call("register bad types", "POST", "/auth/register", json={"email": [email], "password": {"p": password}})
    rec.call(
        "register bad json",
        "POST",
        "/auth/register",
        data=f'{{"email": "{email}", "password": "{password}',
        headers={"Content-Type": "application/json"},
    )
    rec.call("login wrong password", "POST", "/auth/token", json={"email": email, "password": wrong_password})
    rec.call("login unknown user", "POST", "/auth/token", json={"email": f"x{email}", "password": password})

    first = rec.call("login", "POST", "/auth/token", json={"email": email, "password": password}, allowed=("a1", "r1"))
    access1, refresh1 = first.json()["access_token"], first.json()["refresh_token"]
    rec.add(jwt_secret("a1", access1), Secret("r1", refresh1))
    rec.call("me", "GET", "/auth/me", headers=bearer(access1))
    second = rec.call("refresh", "POST", "/auth/refresh", json={"refresh_token": refresh1}, allowed=("a2", "r2"))
    access2, refresh2 = second.json()["access_token"], second.json()["refresh_token"]
    rec.add(jwt_secret("a2", access2), Secret("r2", refresh2))
    rec.call("refresh replayed", "POST", "/auth/refresh", json={"refresh_token": refresh1})
    rec.call("refresh after family revoked", "POST", "/auth/refresh", json={"refresh_token": refresh2})
    rec.call("me with revoked family's token", "GET", "/auth/me", headers=bearer(access2))
    rec.call("me with tampered token", "GET", "/auth/me", headers=bearer(access2[:-4] + "AAAA"))
    third = rec.call(
        "login again", "POST", "/auth/token", json={"email": email, "password": password}, allowed=("a3", "r3")
    )
    access, refresh = third.json()["access_token"], third.json()["refresh_token"]
    rec.add(jwt_secret("a3", access), Secret("r3", refresh))

    # API keys: created (returned once), listed (prefix only), used, revoked, forged
    keys = {}
    for name in ("main", "revoked", "throttled"):
        made = rec.call(
            f"create key {name}",
            "POST",
            "/auth/api-keys",
            json={"name": name},
            headers=bearer(access),
            allowed=(f"key_{name}",),
        )
        assert made.status_code == 201, made.text
        keys[name] = made.json()
        rec.add(Secret(f"key_{name}", made.json()["key"], slice_from=12))
    # the display prefix (first 12 characters) is the documented way to tell keys apart: listing shows it
    rec.call("list keys", "GET", "/auth/api-keys", headers=bearer(access))
    key = keys["main"]["key"]

    # the LLM routes: success paths with secrets in the prompt, upstream failures, refusals
    rec.call("chat", "POST", CHAT, json=chat_body(hidden(password, key)), headers=bearer(key))
    rec.call(
        "chat stream",
        "POST",
        CHAT,
        json=chat_body(hidden(password), stream=True, stream_options={"include_usage": True}),
        headers=bearer(key),
    )
    rec.call(
        "embeddings",
        "POST",
        "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": [password]},
        headers=bearer(key),
    )
    messages = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": hidden(key)}]}
    rec.call("messages", "POST", "/v1/messages", json=messages, headers={"x-api-key": key})
    rec.call("messages stream", "POST", "/v1/messages", json={**messages, "stream": True}, headers={"x-api-key": key})
    for knob in ("error=500", "error=401", "error=429", "stream_error_after=2"):
        streaming = knob.startswith("stream")
        rec.call(
            f"upstream {knob}",
            "POST",
            CHAT,
            json=chat_body(f"#fake:{knob} {hidden(password)}", stream=streaming),
            headers=bearer(key),
        )
    rec.call(
        "messages upstream 529",
        "POST",
        "/v1/messages",
        headers={"x-api-key": key},
        json={**messages, "messages": [{"role": "user", "content": f"#fake:error=529 {hidden(key)}"}]},
    )

    # 400/422: validation errors whose input is a secret
    rec.call(
        "chat model is a secret",
        "POST",
        CHAT,
        json={"model": key, "messages": [{"role": "user", "content": "x"}]},
        headers=bearer(key),
    )
    rec.call(
        "chat messages is a secret",
        "POST",
        CHAT,
        json={"model": "gpt-4o-mini", "messages": password},
        headers=bearer(key),
    )
    rec.call(
        "chat bad json",
        "POST",
        CHAT,
        data=f'{{"model": "{password}',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    rec.call(
        "embeddings bad input",
        "POST",
        "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": {"secret": password}},
        headers=bearer(key),
    )
    rec.call(
        "messages without max_tokens",
        "POST",
        "/v1/messages",
        headers={"x-api-key": key},
        json={"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": password}]},
    )
    rec.call(
        "key with secret name",
        "POST",
        "/auth/api-keys",
        headers=bearer(access),
        json={"name": "", "expires_at": password, "allowed_models": [password]},
    )

    # 401: forged, missing, JWT-looking keys
    rec.call("forged key", "POST", CHAT, json=chat_body("hi"), headers=bearer(forged_key))
    rec.call("forged x-api-key", "POST", "/v1/messages", json=messages, headers={"x-api-key": forged_key})
    rec.call("no key", "POST", CHAT, json=chat_body(hidden(password)))
    rec.call("password as key", "POST", CHAT, json=chat_body("hi"), headers=bearer(password))
    rec.call("refresh token as key", "GET", "/v1/models", headers=bearer(refresh))

    # revoked key: used, revoked, refused (once the revocation event has reached the gateway)
    revoked = keys["revoked"]["key"]
    rec.call("revoked key before", "POST", CHAT, json=chat_body("hi"), headers=bearer(revoked))
    rec.call("revoke", "DELETE", f"/auth/api-keys/{keys['revoked']['id']}", headers=bearer(access))
    deadline = time.monotonic() + 20
    while rec.call("revoked key after", "POST", CHAT, json=chat_body("hi"), headers=bearer(revoked)).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key is still accepted"
        time.sleep(0.5)

    # 403 and 404
    rec.call("admin route as member", "GET", "/auth/users", headers=bearer(access))
    rec.call("hidden key exchange", "POST", "/auth/internal/key-exchange", json={"key": key}, headers=bearer(key))
    rec.call(
        "hidden service token",
        "POST",
        "/auth/service-token",
        json={"client_id": "gateway", "client_secret": config.secrets["gateway"]},
    )
    # Secrets in a URL path reach the access log's url.path, as with any HTTP server (operators need the path);
    # they are searched for in responses, and in logs everywhere but that exact path. Query strings are never logged.
    probes = [f"/v1/files/file-{password}", f"/v1/batches/batch_{key}", f"/v1/{password}"]
    rec.session.path_probes.extend(probes)
    for label, path in zip(("unknown file", "unknown batch", "unknown route"), probes, strict=True):
        rec.call(label, "GET", path, headers=bearer(key))
    rec.call("secrets in the query", "GET", f"/v1/models?api_key={key}&password={quote(password)}", headers=bearer(key))
    rec.call("secrets in a 404 query", "GET", f"/v1/nothing?token={access}", headers=bearer(key))

    # 413: a body over the gateway's limit, full of secrets
    rec.call("too large", "POST", CHAT, json=chat_body(hidden(password, key) * (BODY_LIMIT // 40)), headers=bearer(key))

    # 429: the throttled key past its per-minute requests, and an account past its failed logins
    throttled = keys["throttled"]["key"]
    for _ in range(KEY_RPM + 1):
        rec.call("throttled key", "POST", CHAT, json=chat_body(hidden(password)), headers=bearer(throttled))
    for _ in range(LOGIN_FAILURES + 1):
        rec.call("throttled login", "POST", "/auth/token", json={"email": email, "password": wrong_password})

    # batches: lines carrying secrets (a good one, one llm refuses), the input file read back legitimately
    lines = [
        {"custom_id": "ok", "method": "POST", "url": CHAT, "body": chat_body(hidden(password, key))},
        {"custom_id": "refused", "method": "POST", "url": CHAT, "body": {"model": "gpt-4o-mini", "messages": key}},
        {"custom_id": "upstream", "method": "POST", "url": CHAT, "body": chat_body(f"#fake:error=400 {hidden(key)}")},
    ]
    jsonl = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = rec.call(
        "upload batch file",
        "POST",
        "/v1/files",
        headers=bearer(key),
        data={"purpose": "batch"},
        files={"file": ("input.jsonl", io.BytesIO(jsonl))},
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    rec.call(
        "read batch input back",
        "GET",
        f"/v1/files/{file_id}/content",
        headers=bearer(key),
        allowed=("password", "key_main"),
    )
    bad_line = f'{{"custom_id": "bad", "method": "POST", "url": "{CHAT}", "body": "{password}'.encode()
    rec.call(
        "upload malformed batch file",
        "POST",
        "/v1/files",
        headers=bearer(key),
        data={"purpose": "batch"},
        files={"file": ("bad.jsonl", io.BytesIO(bad_line))},
    )
    created = rec.call(
        "create batch",
        "POST",
        "/v1/batches",
        headers=bearer(key),
        json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": {"note": "hygiene"}},
    )
    assert created.status_code == 200, created.text
    batch_id, deadline = created.json()["id"], time.monotonic() + 90
    batch: dict[str, Any] = created.json()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch not finished: {batch}"
        time.sleep(0.5)
        batch = rec.call("poll batch", "GET", f"/v1/batches/{batch_id}", headers=bearer(key)).json()
    assert batch["status"] == "completed", batch
    for kind in ("output_file_id", "error_file_id"):
        if batch.get(kind):
            rec.call(f"batch {kind}", "GET", f"/v1/files/{batch[kind]}/content", headers=bearer(key))

    # password change (wrong current, too weak, right), logout
    new_password = canary("newpw")
    rec.add(Secret("new_password", new_password))
    rec.call(
        "password wrong current",
        "POST",
        "/auth/password",
        headers=bearer(access),
        json={"current_password": wrong_password, "new_password": new_password},
    )
    rec.call(
        "password weak",
        "POST",
        "/auth/password",
        headers=bearer(access),
        json={"current_password": password, "new_password": "x"},
    )
    rec.call(
        "password change",
        "POST",
        "/auth/password",
        headers=bearer(access),
        json={"current_password": password, "new_password": new_password},
    )
    rec.call("logout", "POST", "/auth/logout", json={"refresh_token": refresh})


@pytest.fixture(scope="module")
def session(
    postgres: PostgresServer, amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    """Our own platform at DEBUG, the scripted session, every /metrics page; then the platform stopped (so every
    log line is written) and its logs read."""
    run_id = uuid.uuid4().hex[:8]
    run_dir = tmp_path_factory.mktemp("hygiene")
    collector = LogCollector()
    names = ("gateway", "auth", "llm", "jobs", "fakeprovider")
    *service_ports, worker_metrics = free_ports(len(names) + 1)
    prefix = f"parley-hygiene-{run_id}"
    config = PlatformConfig(
        run_dir=run_dir,
        environment="test",
        database_urls={name: postgres.create_database(f"hygiene_{name}") for name in ("auth", "llm", "jobs")},
        amqp_url=amqp_url,
        amqp_prefix=prefix,
        redis_url=redis_url,
        redis_prefix=f"{prefix}:",
        secrets={
            name: f"{secrets.token_urlsafe(24)}-{name}-canary" for name in ("gateway", "jobs", "pepper", "provider")
        },
        ports=dict(zip(names, service_ports, strict=True)),
        workers={"gateway": 1, "auth": 1, "llm": 1, "jobs": 1},
        log_level="DEBUG",
        logstash=("127.0.0.1", collector.port),
        extra_env={
            "gateway": {
                "GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT),
                "GATEWAY_RATE_LIMIT_KEY_RPM": str(KEY_RPM),
                "GATEWAY_RATE_LIMIT_USER_RPM": "0",
            },
            "auth": {"AUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT": str(LOGIN_FAILURES)},
            "jobs-worker": {"JOBS_WORKER_METRICS_PORT": str(worker_metrics)},
        },
    )
    platform = Platform(config)
    result = Session()
    try:
        platform.migrate()
        platform.start()
        run_session(Recorder(config.url("gateway"), result), config)
        for name in SERVICES:
            result.metrics[name] = requests.get(f"{config.url(name)}/metrics", timeout=30).text
        result.metrics["jobs-worker"] = requests.get(f"http://127.0.0.1:{worker_metrics}/metrics", timeout=30).text
        result.provider_saw = requests.get(f"{config.url('fakeprovider')}/_fake/stats", timeout=10).json()
    finally:
        platform.stop()
        time.sleep(0.5)  # the collector's reader threads drain what the processes sent before exiting
        collector.close()
        delete_broker_names(amqp_url, prefix)
    result.log_files = {path.name: path.read_text(errors="replace") for path in sorted(platform.log_dir.glob("*.log"))}
    result.shipped = collector.records()
    yield result


# ----- the checks -----------------------------------------------------------------------------------------------


def test_the_session_reached_every_path(session: Session) -> None:
    """The session did what it claims: each refusal happened, and no input ever produced a 5xx of our own making."""
    statuses = {exchange.status for exchange in session.exchanges}
    needles = sum(len(secret.needles()) for secret in session.canaries)
    log_lines = sum(text.count("\n") for text in session.log_files.values())
    print(  # the figures for docs/reliability.md (shown with -s)
        f"hygiene: {len(session.canaries)} secrets ({needles} forms) searched in {len(session.exchanges)} responses "
        f"(statuses {sorted(statuses)}), {log_lines} log lines of {len(session.log_files)} processes, "
        f"{len(session.shipped)} shipped records, {len(session.metrics)} /metrics pages"
    )
    for status in (200, 201, 204, 400, 401, 403, 404, 409, 413, 429):
        assert status in statuses, (status, sorted(statuses))
    by_label = {exchange.label: exchange.status for exchange in session.exchanges}
    assert by_label["revoked key after"] == 401
    assert by_label["throttled key"] == 429 and by_label["throttled login"] == 429
    assert by_label["upstream error=500"] >= 500 and by_label["upstream error=401"] >= 400
    ours = [
        (e.label, e.status, e.body[:200]) for e in session.exchanges if e.status >= 500 and "upstream" not in e.label
    ]
    assert not ours, ours
    assert not [e.label for e in session.exchanges if "Traceback" in e.body]


def test_the_canaries_really_travelled(session: Session) -> None:
    """Controls: without them a search that finds nothing proves nothing. The provider key reached the upstream,
    the legitimate responses carry their secret (so the search would find a leak), and DEBUG records were written
    and shipped."""
    headers = session.provider_saw["last_request_headers"]
    assert session.canaries[0].value in headers.get("authorization", "") + headers.get("x-api-key", "")
    legit = [e for e in session.exchanges if e.allowed]
    assert legit and all(find_leaks(e.body, session.canaries, e.label) for e in legit)
    assert any(record.get("log", {}).get("level") == "debug" for record in session.shipped), (
        "no DEBUG record was shipped"
    )
    shipped_services = {record.get("service", {}).get("name") for record in session.shipped}
    assert set(SERVICES) <= shipped_services, shipped_services
    assert all(session.metrics[name].count("\n") > 10 for name in (*SERVICES, "jobs-worker"))


# llm's 404 for an unknown model quotes the model name back (services/llm/src/parley_llm/views.py `resolve`), so a
# key pasted into `model` comes back in the body. views.py is being rewritten by the lead: reported, checked apart.
MODEL_ECHO = "chat model is a secret"


def test_no_secret_in_any_response(session: Session) -> None:
    """Bodies and headers of every response, each secret allowed only where it is legitimately returned."""
    leaks = []
    for exchange in session.exchanges:
        if exchange.label == MODEL_ECHO:
            continue
        leaks += find_leaks(
            exchange.body, session.canaries, f"{exchange.label} [{exchange.status}] body", exchange.allowed
        )
        leaks += find_leaks(exchange.headers, session.canaries, f"{exchange.label} [{exchange.status}] headers")
    assert not leaks, "\n".join(sorted(set(leaks)))


def test_an_unknown_model_is_not_quoted_back(session: Session) -> None:
    """A secret sent as the model name must not come back in the 404 (strict: passes once views.py is fixed)."""
    exchange = next(e for e in session.exchanges if e.label == MODEL_ECHO)
    assert exchange.status == 404
    assert not find_leaks(exchange.body + exchange.headers, session.canaries, MODEL_ECHO)


def without_probes(line: str, session: Session) -> str:
    """A log line minus the paths the session deliberately put secrets in (see run_session)."""
    for path in session.path_probes:
        line = line.replace(path, "<probe>")
    return line


def test_no_secret_in_any_log_file(session: Session) -> None:
    """stdout/stderr of every process (gunicorn masters and workers, the jobs worker, the fake provider)."""
    assert set(session.log_files) >= {f"{name}.log" for name in (*SERVICES, "jobs-worker", "fakeprovider")}
    leaks = []
    for name, text in session.log_files.items():
        for line in text.splitlines():
            for leak in find_leaks(without_probes(line, session), session.canaries, name):
                leaks.append(f"{leak}: {line[:300]}")
    assert not leaks, "\n".join(leaks[:40])


def test_no_secret_in_shipped_records(session: Session) -> None:
    """Every ECS record the processes shipped to the collector (where Logstash would be)."""
    assert session.shipped
    leaks = []
    for record in session.shipped:
        line = json.dumps(record)
        for leak in find_leaks(
            without_probes(line, session), session.canaries, f"shipped {record.get('service', {}).get('name')}"
        ):
            leaks.append(f"{leak}: {line[:300]}")
    assert not leaks, "\n".join(leaks[:40])


def test_no_secret_in_any_metrics_page(session: Session) -> None:
    """/metrics of gateway, auth, llm, jobs and the jobs worker."""
    leaks = [leak for name, page in session.metrics.items() for leak in find_leaks(page, session.canaries, name)]
    assert not leaks, "\n".join(leaks)


def test_the_needles_cover_encodings() -> None:
    """The search finds a secret base64-encoded at any offset, URL-encoded, or by its 12-character slice."""
    secret = Secret("s", "pw-canary-" + secrets.token_urlsafe(18) + "/+=")
    for prefix in (b"", b"u", b"us", b"user:"):
        encoded = base64.b64encode(prefix + secret.value.encode() + b"!tail").decode()
        assert find_leaks(encoded, [secret], "b64"), prefix
        assert find_leaks(encoded.replace("+", "-").replace("/", "_"), [secret], "b64url"), prefix
    assert find_leaks(f"x={quote(secret.value, safe='')}", [secret], "url")
    assert find_leaks(f"prefix {secret.value[:12]}…", [secret], "slice")
    assert not find_leaks(re.sub(r"[a-z]", "Q", secret.value), [secret], "none")
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLW9mLXRoaXMtdG9rZW4"
    assert not find_leaks("eyJhbGciOiJFZERTQSJ9.other", [jwt_secret("t", token)], "header only")
    assert find_leaks("…c2lnbmF0dXJlLW9m…", [jwt_secret("t", token)], "signature")
