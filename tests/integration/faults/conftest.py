"""Fault injection (issue #9): the tools the fault tests share. A raw upstream that misbehaves on purpose, a TCP
proxy that delays or cuts connections, and our own llm / gateway processes in front of them. The RabbitMQ and Redis
helpers are the ones tests/integration/test_batches_e2e.py and services/gateway/tests/test_redis_down.py already
define, imported (not copied) below. Every dependency a test stops is its own instance on its own port."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import requests
from _pytest.pathlib import ImportMode, import_path
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from parley_kit.processes import ServiceProcess, free_port, python_module
from parley_kit.testing import LoopbackServer, PostgresServer, TokenMint, eventually
from parley_platform import start_service

if TYPE_CHECKING:
    from tests.integration.conftest import Client

ROOT = Path(__file__).resolve().parents[3]


def sibling_module(relative: str) -> ModuleType:
    """Another test module, imported the way pytest itself imports it (importlib mode): the same module object when
    pytest has collected it too, so its helpers and fixtures are reused rather than copied."""
    return import_path(ROOT / relative, mode=ImportMode.importlib, root=ROOT, consider_namespace_packages=False)


batches_e2e = sibling_module("tests/integration/test_batches_e2e.py")
redis_down = sibling_module("services/gateway/tests/test_redis_down.py")

# Re-exported fixture (pytest finds fixtures by name in a conftest's namespace).
own_rabbit = batches_e2e.own_rabbit

OPENAI_CHAT = "/v1/chat/completions"
ANTHROPIC_MESSAGES = "/v1/messages"


def figure(name: str, **values: Any) -> None:
    """Print one measured figure (pytest -s shows them) for docs/reliability.md."""
    print(f"\nFIGURE {name}: " + ", ".join(f"{key}={value}" for key, value in values.items()), flush=True)


def user_of(token: str) -> str:
    """The `sub` of an access token (read only; the services verify it)."""
    return jwt.decode(token, options={"verify_signature": False})["sub"]


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    """Rows of one query on a service database (a short-lived single connection: connections are shared)."""
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params))
    finally:
        engine.dispose()


def assert_openai_error(response: requests.Response, *statuses: int) -> dict[str, Any]:
    """An answer in OpenAI's error shape with one of `statuses`, JSON, no traceback."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in response.text
    assert {"type", "code"} <= error.keys(), error
    return error


def assert_anthropic_error(response: requests.Response, *statuses: int) -> dict[str, Any]:
    """An answer in Anthropic's error shape with one of `statuses`."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"], body
    assert "Traceback" not in response.text
    return body["error"]


def assert_problem(response: requests.Response, *statuses: int) -> dict[str, Any]:
    """An answer as application/problem+json with one of `statuses`."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == response.status_code and body["title"] and "Traceback" not in response.text
    return body


# --- calls and streams ---------------------------------------------------------------------------------------


def call(llm: OwnLlm, token: str, api: str, directive: str, *, stream: bool) -> requests.Response:
    """One chat call at our llm with the directive in the user's message."""
    content = f"fault probe {uuid.uuid4().hex[:6]} {directive}".strip()
    if api == "openai":
        path, body = OPENAI_CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
    else:
        path = ANTHROPIC_MESSAGES
        body = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": content}]}
    headers = {"Authorization": f"Bearer {token}"}
    if api == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    return requests.post(
        f"{llm.url}{path}", json={**body, "stream": stream}, headers=headers, timeout=60, stream=stream
    )


def post(gateway: str, client: Client, api: str, *, stream: bool, text: str = "proxy probe") -> requests.Response:
    """A chat call through a gateway with the client's API key."""
    if api == "openai":
        path, body = OPENAI_CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    else:
        path = ANTHROPIC_MESSAGES
        body = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    headers = {"Authorization": f"Bearer {client.api_key}", "anthropic-version": "2023-06-01"}
    return requests.post(
        f"{gateway}{path}", json={**body, "stream": stream}, headers=headers, timeout=60, stream=stream
    )


def sse(response: requests.Response) -> list[tuple[str | None, Any]]:
    """(event name, parsed data or raw text) for each SSE event of a stream, read to its end."""
    return parse_sse(response.content)


def parse_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data or raw text) for each SSE event in `raw`."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            raw = "\n".join(data)
            try:
                events.append((name, json.loads(raw)))
            except ValueError:
                events.append((name, raw))
    return events


def content_deltas(api: str, events: list[tuple[str | None, Any]]) -> int:
    """How many content deltas the client received."""
    if api == "openai":
        return sum(
            1
            for _, data in events
            if isinstance(data, dict) and any((c.get("delta") or {}).get("content") for c in data.get("choices") or ())
        )
    return sum(1 for _, data in events if isinstance(data, dict) and data.get("type") == "content_block_delta")


def final_error(api: str, events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    """The stream's last event, which must be the API's own error event."""
    assert events, "the stream sent nothing"
    name, data = events[-1]
    assert isinstance(data, dict), events[-3:]
    if api == "openai":
        assert set(data) == {"error"} and data["error"]["message"] and data["error"]["type"], data
        return data["error"]
    assert name == "error" and data["type"] == "error" and data["error"]["message"], events[-1]
    return data["error"]


# --- a raw upstream that misbehaves on purpose ------------------------------------------------------------------

_RAW = re.compile(r"#raw:([a-z_]+)(?:=(\d+))?")


class RawUpstream:
    """A socket server speaking just enough OpenAI and Anthropic HTTP. The directive `#raw:<mode>[=N]` in the body
    picks how it (mis)behaves; without one it answers properly (16 words, usage that matches):

    hang (no byte ever), headers_then_hang (a stream's headers, then nothing), html (200 text/html page),
    text (200 text/plain, not JSON), truncated (200 JSON cut in half, Content-Length matching), short (Content-Length
    promises more than is sent, then close), wrong_type (a stream request answered with a whole JSON body),
    cut=N (a stream cut after N content deltas), garbage_after=N (N deltas then a non-JSON data frame, then close),
    close (close the connection unanswered)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server = LoopbackServer(self._serve, name="raw-upstream")
        self.port, self.url = self._server.port, self._server.url

    def _serve(self, connection: socket.socket) -> None:
        """Keep-alive: answer requests on this connection until it closes or a mode closes it."""
        with self._lock:
            self._open.add(connection)
        reader = connection.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n"):
                    if not line:
                        return  # cut before the end of the head: not a request
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                raw = reader.read(length)
                if len(raw) < length:
                    return  # cut inside the body
                body = json.loads(raw or b"{}")
                path = request_line.split()[1].decode()
                if not self._answer(connection, path, body):
                    return
        except (OSError, ValueError):  # a request cut on its way here (the proxy's doing) is simply dropped
            return
        finally:
            with self._lock:
                self._open.discard(connection)
            reader.close()
            connection.close()

    def _answer(self, connection: socket.socket, path: str, body: dict[str, Any]) -> bool:
        """Answer one request; False when the connection must be closed."""
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content")
        found = _RAW.search(content if isinstance(content, str) else json.dumps(content))
        mode, number = (found[1], int(found[2] or 0)) if found else ("ok", 0)
        with self._lock:
            self.calls[mode] += 1
        anthropic = path.endswith("/messages")
        stream = bool(body.get("stream"))
        if mode == "hang":
            time.sleep(30)  # the server socket closing (test end) does not end this: llm's timeout must
            return False
        if mode == "close":
            return False
        if mode == "html":
            page = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
            connection.sendall(_head(200, "text/html; charset=utf-8", len(page)) + page)
            return True
        if mode == "text":
            connection.sendall(_head(200, "text/plain", 11) + b"upstream ok")
            return True
        whole = json.dumps(_message(body, 16) if anthropic else _completion(body, 16)).encode()
        if mode == "truncated":
            half = whole[: len(whole) // 2]
            connection.sendall(_head(200, "application/json", len(half)) + half)
            return True
        if mode == "short":
            connection.sendall(_head(200, "application/json", len(whole)) + whole[: len(whole) // 2])
            return False
        if mode == "wrong_type" or not stream:
            connection.sendall(_head(200, "application/json", len(whole)) + whole)
            return True
        connection.sendall(_head(200, "text/event-stream", None))
        if mode == "headers_then_hang":
            time.sleep(30)
            return False
        events = _anthropic_events(body, 16) if anthropic else _openai_events(body, 16)
        deltas = 0
        for event in events:
            is_delta = b'"text_delta"' in event or b'"content": " ' in event
            if is_delta and mode == "cut" and deltas == number:
                return False
            if is_delta and mode == "garbage_after" and deltas == number:
                connection.sendall(_chunk(b"data: <html>not json</html>\n\n"))
                return False
            connection.sendall(_chunk(event))
            deltas += is_delta
        connection.sendall(b"0\r\n\r\n")
        return True

    def close(self) -> None:
        """Stop accepting and drop open connections."""
        self._server.close()
        with self._lock:
            for connection in list(self._open):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _head(status: int, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    reason = {200: "OK"}.get(status, "Error")
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _words(count: int) -> list[str]:
    return [f"word{n}" for n in range(count)]


def _prompt_words(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or ())


def _completion(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": _prompt_words(body), "completion_tokens": tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + tokens
    return {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "raw"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " ".join(_words(tokens))}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _message(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    return {
        "id": "msg_raw",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "raw"),
        "content": [{"type": "text", "text": " ".join(_words(tokens))}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": _prompt_words(body), "output_tokens": tokens},
    }


def _openai_events(body: dict[str, Any], tokens: int) -> Iterator[bytes]:
    base = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": body.get("model", "raw")}

    def data(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    yield data([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for word in _words(tokens):
        yield data([{"index": 0, "delta": {"content": " " + word}, "finish_reason": None}])
    yield data([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if (body.get("stream_options") or {}).get("include_usage"):
        prompt = _prompt_words(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        yield data([], usage=usage)
    yield b"data: [DONE]\n\n"


def _anthropic_events(body: dict[str, Any], tokens: int) -> Iterator[bytes]:
    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}).encode() + b"\n\n"

    message = {**_message(body, 0), "content": [], "stop_reason": None}
    message["usage"] = {"input_tokens": _prompt_words(body), "output_tokens": 1}
    yield event("message_start", message=message)
    yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    for word in _words(tokens):
        yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": " " + word})
    yield event("content_block_stop", index=0)
    yield event(
        "message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": tokens}
    )
    yield event("message_stop")


# --- a TCP proxy that delays and cuts --------------------------------------------------------------------------


class TcpProxy:
    """A TCP proxy on its own asyncio loop (a thread). `latency` delays every piece of data in both directions;
    `arm(direction, after)` cuts (RST both sides) the next connection that passes `after` more bytes in that
    direction ("request": towards the target, "response": back), once; `refuse()` cuts every connection and turns
    new ones away (the target is down), `resume()` lets them through again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.latency = 0.0
        self.connections = 0
        self.cuts = 0
        self.refusing = False
        self._armed: tuple[str, int] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    def arm(self, direction: str, after: int) -> None:
        """Cut the connection that next carries more than `after` bytes in `direction`."""
        self._armed = (direction, after)

    def refuse(self) -> None:
        """From now on the target is down: open connections are cut, new ones closed at once."""
        self.refusing = True
        asyncio.run_coroutine_threadsafe(self._cut_all(), self._loop).result(10)

    def resume(self) -> None:
        """The target is back."""
        self.refusing = False

    async def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, target_writer)
        self._writers.update(pair)
        await asyncio.gather(
            self._pipe(reader, target_writer, "request", pair), self._pipe(target_reader, writer, "response", pair)
        )

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: str,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                armed = self._armed
                if armed is not None and armed[0] == direction:
                    if len(data) > armed[1]:
                        self._armed = None
                        sink.write(data[: armed[1]])
                        await sink.drain()
                        self.cuts += 1
                        for writer in pair:
                            writer.transport.abort()
                        return
                    self._armed = (direction, armed[1] - len(data))
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except (OSError, RuntimeError):
            for writer in pair:
                writer.transport.abort()

    def close(self) -> None:
        """Stop listening, drop every connection, end the loop and its thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()


# --- our own llm and gateway processes -------------------------------------------------------------------------


class OwnLlm:
    """An llm process of our own (its own database), pointed at any upstream, with short timeouts."""

    def __init__(self, process: ServiceProcess, url: str, database_url: str) -> None:
        self.process, self.url, self.database_url = process, url, database_url

    def usage(self, user: str, count: int = 1, seconds: float = 10) -> list[Any]:
        """The user's ledger rows, oldest first, once there are `count` (llm books a non-stream call after its answer
        has gone out, so a test that has its answer may be a moment early)."""

        def rows() -> list[Any]:
            return query(
                self.database_url,
                "SELECT request_id, status, input_tokens, output_tokens, cost_usd FROM usage_records"
                " WHERE user_id = :user ORDER BY id",
                user=user,
            )

        eventually(lambda: len(rows()) >= count, seconds=seconds)
        return rows()


def start_own_llm(
    postgres: PostgresServer,
    token_mint: TokenMint,
    log_dir: Path,
    upstream: str,
    *,
    database_port: int | None = None,
    **env: str,
) -> OwnLlm:
    """`parley_llm` migrated and served (one gevent worker) with both providers at `upstream`; its database reached
    on `database_port` (a proxy's) when given. `OwnLlm.database_url` is the direct one, for the test's queries."""
    port = free_port()
    database_url = postgres.create_database(f"faults_llm_{uuid.uuid4().hex[:6]}")
    served_url = database_url
    if database_port is not None:
        served_url = make_url(database_url).set(port=database_port).render_as_string(hide_password=False)
    (log_dir / "metrics").mkdir(exist_ok=True)
    values = {
        "PARLEY_ENV": "test",
        "PARLEY_JWKS_URL": token_mint.jwks_url,
        "LLM_BIND": f"127.0.0.1:{port}",
        "LLM_WORKERS": "1",
        "LLM_DATABASE_URL": served_url,
        "LLM_METRICS_DIR": str(log_dir / "metrics"),
        "LLM_OPENAI_BASE_URL": f"{upstream}/v1",
        "LLM_ANTHROPIC_BASE_URL": upstream,
        "LLM_OPENAI_API_KEY": "sk-raw-upstream",
        "LLM_ANTHROPIC_API_KEY": "sk-raw-upstream",
        "LLM_CONNECT_TIMEOUT": "1",
        "LLM_FIRST_BYTE_TIMEOUT": "1.5",
        "LLM_TOTAL_TIMEOUT": "2.5",
        "LLM_RETRY_BACKOFF": "0",
        "LLM_BREAKER_FAILURES": "1000",  # one test's failures must not open the breaker for the next
        **env,
    }
    process = start_service("llm", values, port=port, log_dir=log_dir, timeout=180)
    return OwnLlm(process, f"http://127.0.0.1:{port}", database_url)


@pytest.fixture(scope="session")
def raw_upstream() -> Iterator[RawUpstream]:
    """The misbehaving upstream, shared by the fault tests."""
    server = RawUpstream()
    yield server
    server.close()


@pytest.fixture(scope="session")
def upstream_proxy(raw_upstream: RawUpstream) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the raw upstream (llm → proxy → raw upstream)."""
    proxy = TcpProxy(raw_upstream.port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def raw_llm(
    postgres: PostgresServer,
    token_mint: TokenMint,
    upstream_proxy: TcpProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OwnLlm]:
    """Our llm whose providers are the raw upstream, through the TCP proxy."""
    llm = start_own_llm(postgres, token_mint, tmp_path_factory.mktemp("raw-llm"), upstream_proxy.url)
    yield llm
    llm.process.stop(timeout=5, signum=signal.SIGINT)


def start_own_gateway(base_env: dict[str, str], log_dir: Path, **env: str) -> tuple[ServiceProcess, str]:
    """A gateway process of our own: the platform gateway's environment with `env` on top."""
    port = free_port()
    values = {
        **base_env,
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "1",
        "GATEWAY_METRICS_DIR": str(log_dir / f"gateway-metrics-{port}"),
        **env,
    }
    process = ServiceProcess(
        f"gateway-{port}",
        python_module("parley_gateway", "serve"),
        env=values,
        log_dir=log_dir,
        ready_url=f"http://127.0.0.1:{port}/livez",
    ).start(timeout=120)
    return process, f"http://127.0.0.1:{port}"
