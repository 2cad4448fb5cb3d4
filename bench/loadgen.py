"""A bounded gevent load generator, run in its own process: `python -m bench.loadgen < spec.json > result.json`.

It lives in a separate process so thousands of greenlets never share a CPU scheduler (or a monkey-patched socket
module) with the harness. Two modes, both bounded in count and time:

- `closed`: `concurrency` clients each send requests back to back until `duration` s or `max_requests` in total.
- `streams`: `concurrency` streaming requests started within `ramp` s, each read to its end; records the time to
  the first SSE `data:` line, the gaps between the following ones, and when each stream opened and closed.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402 - must come after the monkey-patch
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from bench.sse import read_timings  # noqa: E402
from parley_kit.cli import raise_open_files_limit  # noqa: E402

ALLOWED_HOSTS = ("127.0.0.1", "localhost")


def connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A keep-alive connection to a loopback URL and the path to request."""
    parts = urlsplit(url)
    if parts.hostname not in ALLOWED_HOSTS:
        raise ValueError(f"the load generator only talks to loopback, not {parts.hostname}")
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path or "/"


def run_closed(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop clients: every client waits for its answer before sending the next request."""
    body = spec["body"].encode()
    headers = {**spec["headers"], "Content-Type": "application/json"}
    deadline = time.monotonic() + spec["duration"]
    budget = [spec["max_requests"]]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []

    def client() -> None:
        connection, path = connect(spec["url"], spec["timeout"])
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                errors.append(type(exc).__name__)
                connection.close()
                connection, path = connect(spec["url"], spec["timeout"])
                continue
            latencies.append(time.perf_counter() - started)
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
        connection.close()

    started = time.perf_counter()
    greenlets = [gevent.spawn(client) for _ in range(spec["concurrency"])]
    gevent.joinall(greenlets, timeout=spec["duration"] + spec["timeout"] + 5)
    elapsed = time.perf_counter() - started
    gevent.killall(greenlets, timeout=2)
    ok = statuses.get("200", 0)
    return {
        "elapsed_s": elapsed,
        "ok": ok,
        "statuses": statuses,
        "errors": errors[:20],
        "error_count": len(errors),
        "latencies_s": latencies,
    }


def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    """N concurrent streams, each read line by line to `data: [DONE]`; per-stream TTFT, gaps and outcome."""
    body = spec["body"].encode()
    headers = {**spec["headers"], "Content-Type": "application/json", "Accept": "text/event-stream"}
    count, ramp = spec["concurrency"], spec["ramp"]
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + spec["timeout"]

    def one(index: int) -> None:
        gevent.sleep(ramp * index / max(count, 1))
        outcome: dict[str, Any] = {"status": None, "ttft_s": None, "gaps_s": [], "done": False, "error": None}
        outcome["opened_s"] = time.perf_counter() - began
        try:
            connection, path = connect(spec["url"], spec["timeout"])
            started = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            outcome["status"] = response.status
            outcome["ttft_s"], outcome["gaps_s"], outcome["done"] = read_timings(response, started, deadline)
            connection.close()
        except (OSError, http.client.HTTPException) as exc:
            outcome["error"] = type(exc).__name__
        outcome["closed_s"] = time.perf_counter() - began
        results.append(outcome)

    pool = Pool(count)
    began = time.perf_counter()
    for index in range(count):
        pool.spawn(one, index)
    pool.join(timeout=spec["timeout"] + ramp + 5)
    elapsed = time.perf_counter() - began
    pool.kill(timeout=2)
    return {"elapsed_s": elapsed, "streams": results, "requested": count}


MODES = {"closed": run_closed, "streams": run_streams}


def main() -> None:
    """Read the spec from stdin, run it, write the result as JSON to stdout."""
    raise_open_files_limit()
    spec = json.load(sys.stdin)
    json.dump(MODES[spec["mode"]](spec), sys.stdout)


if __name__ == "__main__":
    main()
