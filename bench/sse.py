"""Reading a server-sent event stream for its timings: shared by the paired runs (bench.measure) and the load
generator's concurrent streams (bench.loadgen, which imports it after its gevent monkey-patch)."""

from __future__ import annotations

import time
from http.client import HTTPResponse


def read_timings(response: HTTPResponse, started: float, deadline: float) -> tuple[float | None, list[float], bool]:
    """Read `response` line by line until `data: [DONE]`, its end or `deadline` (monotonic): the time from `started`
    (perf_counter) to the first `data:` line, the gaps between the next ones, and whether `[DONE]` came."""
    ttft: float | None = None
    gaps: list[float] = []
    last: float | None = None
    while time.monotonic() < deadline:
        line = response.readline(65536)
        if not line:
            break
        if not line.startswith(b"data:"):
            continue
        now = time.perf_counter()
        if last is None:
            ttft = now - started
        else:
            gaps.append(now - last)
        last = now
        if line.strip() == b"data: [DONE]":
            return ttft, gaps, True
    return ttft, gaps, False
