"""The measuring instruments: paired sequential latency, wrk, the gevent load generator, RSS, py-spy, /metrics,
the batch API end to end and the raw pika loop. Each one is bounded in count and in time."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import requests

from bench.sse import read_timings

BENCH_DIR = Path(__file__).resolve().parent
# One stream of a paired run never takes this long here (a few dozen events).
STREAM_DEADLINE_S = 60.0


@dataclass(frozen=True)
class Target:
    """One HTTP endpoint to load: where, with which headers and body."""

    name: str
    url: str
    headers: dict[str, str]
    body: str

    def connection(self, timeout: float = 30.0) -> tuple[http.client.HTTPConnection, str]:
        """A keep-alive connection to it (loopback only) and the path to request."""
        parts = urlsplit(self.url)
        if parts.hostname != "127.0.0.1":
            raise ValueError(f"benchmarks only send traffic to 127.0.0.1, not {parts.hostname}")
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary_ms(values_s: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max in milliseconds and the count."""
    to_ms = lambda v: None if v is None else round(v * 1000, 4)  # noqa: E731
    return {
        "count": len(values_s),
        "p50_ms": to_ms(percentile(values_s, 50)),
        "p90_ms": to_ms(percentile(values_s, 90)),
        "p99_ms": to_ms(percentile(values_s, 99)),
        "max_ms": to_ms(max(values_s) if values_s else None),
    }


# ----- one request at a time, paired rounds ---------------------------------------------------------------------


def paired_latency(targets: list[Target], *, rounds: int, per_round: int, warmup: int) -> dict[str, Any]:
    """Sequential requests, interleaved across targets in a shuffled order each step, so drift hits all alike.

    Returns each target's p50/p99 per round and, for every target but the first (the reference), the added p50
    and p99 per round and their median across rounds.
    """
    connections = {target.name: target.connection() for target in targets}
    bodies = {target.name: target.body.encode() for target in targets}
    headers = {target.name: {**target.headers, "Content-Type": "application/json"} for target in targets}
    failures: Counter[str] = Counter()

    def once(target: Target) -> float | None:
        connection, path = connections[target.name]
        started = time.perf_counter()
        try:
            connection.request("POST", path, body=bodies[target.name], headers=headers[target.name])
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            failures[target.name] += 1
            connection.close()
            connections[target.name] = target.connection()
            return None
        elapsed = time.perf_counter() - started
        if response.status != 200:
            failures[target.name] += 1
            return None
        return elapsed

    for _ in range(warmup):
        for target in targets:
            once(target)
    per_round_stats: list[dict[str, dict[str, float | None]]] = []
    order = list(targets)
    rng = random.Random(8)  # noqa: S311 - a shuffled order, not a secret
    for _ in range(rounds):
        samples: dict[str, list[float]] = {target.name: [] for target in targets}
        for _ in range(per_round):
            rng.shuffle(order)
            for target in order:
                value = once(target)
                if value is not None:
                    samples[target.name].append(value)
        per_round_stats.append(
            {name: {"p50": percentile(values, 50), "p99": percentile(values, 99)} for name, values in samples.items()}
        )
    for connection, _ in connections.values():
        connection.close()

    reference = targets[0].name
    result: dict[str, Any] = {"reference": reference, "rounds": rounds, "per_round": per_round, "paths": {}}
    for target in targets:
        p50s = [r[target.name]["p50"] for r in per_round_stats if r[target.name]["p50"] is not None]
        p99s = [r[target.name]["p99"] for r in per_round_stats if r[target.name]["p99"] is not None]
        entry: dict[str, Any] = {
            "p50_ms": _ms(statistics.median(p50s)) if p50s else None,
            "p99_ms": _ms(statistics.median(p99s)) if p99s else None,
            "failures": failures[target.name],
        }
        if target.name != reference:
            added_p50 = [
                r[target.name]["p50"] - r[reference]["p50"]
                for r in per_round_stats
                if r[target.name]["p50"] is not None and r[reference]["p50"] is not None
            ]
            added_p99 = [
                r[target.name]["p99"] - r[reference]["p99"]
                for r in per_round_stats
                if r[target.name]["p99"] is not None and r[reference]["p99"] is not None
            ]
            entry["added_p50_ms"] = _ms(statistics.median(added_p50)) if added_p50 else None
            entry["added_p99_ms"] = _ms(statistics.median(added_p99)) if added_p99 else None
            entry["added_p50_ms_per_round"] = [_ms(v) for v in added_p50]
        result["paths"][target.name] = entry
    return result


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


# ----- wrk ------------------------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
{headers}
"""


def run_wrk(target: Target, *, connections: int, duration: float, threads: int = 2) -> dict[str, Any]:
    """wrk at a fixed number of keep-alive connections; requests/s, latency percentiles, non-2xx and errors."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    header_lines = "\n".join(
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}"
        for name, value in {**target.headers, "Content-Type": "application/json"}.items()
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(body=json.dumps(target.body), headers=header_lines))
    try:
        done = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                script.name,
                target.url,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
        )
    finally:
        Path(script.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout) | {"connections": connections, "duration_s": duration}


def paired_throughput(
    reference: Target, path: Target, *, rounds: int, connections: int, duration: float
) -> dict[str, Any]:
    """wrk on the reference and the path back to back, `rounds` times, the order swapped each round: the path's share
    of the reference per round (a machine that drifts between two runs moves both of a round alike), and the median
    round (the lower of the middle two when even, so it is a round that ran). A round in which either answered
    anything but 2xx, or lost a connection, has no share (fast refusals would inflate req/s)."""
    per_round = []
    for n in range(rounds):
        order = (reference, path) if n % 2 == 0 else (path, reference)
        runs = {target.name: run_wrk(target, connections=connections, duration=duration) for target in order}
        ref, got = runs[reference.name], runs[path.name]
        failed = ref["non_2xx"] + got["non_2xx"] + ref["socket_errors"] + got["socket_errors"]
        clean = not failed and ref["requests_per_s"] and got["requests_per_s"] is not None
        per_round.append(
            {
                "reference_rps": ref["requests_per_s"],
                "path_rps": got["requests_per_s"],
                "non_2xx": ref["non_2xx"] + got["non_2xx"],
                "socket_errors": ref["socket_errors"] + got["socket_errors"],
                "ratio": round(got["requests_per_s"] / ref["requests_per_s"], 4) if clean else None,
            }
        )
    ratios = [r["ratio"] for r in per_round if r["ratio"] is not None]
    return {
        "reference": reference.name,
        "path": path.name,
        "connections": connections,
        "duration_s": duration,
        "rounds": per_round,
        "median_ratio": statistics.median_low(ratios) if len(ratios) == rounds else None,
        "min_ratio": min(ratios, default=None),
        "max_ratio": max(ratios, default=None),
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return round(float(number) * _UNITS[unit], 4)


def parse_wrk(output: str) -> dict[str, Any]:
    """The figures of wrk's text report."""
    result: dict[str, Any] = {"requests_per_s": None, "requests": None, "non_2xx": 0, "socket_errors": 0}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result["requests_per_s"] = float(match.group(1))
    if match := re.search(r"(\d+) requests in", output):
        result["requests"] = int(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        result["non_2xx"] = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        result["socket_errors"] = sum(int(n) for n in match.groups())
    for quantile in ("50", "90", "99"):
        if match := re.search(rf"^\s+{quantile}(?:\.000)?%\s+([\d.]+(?:us|ms|s|m))", output, re.MULTILINE):
            result[f"p{quantile}_ms"] = _to_ms(match.group(1))
    return result


# ----- the gevent load generator (a separate process) ---------------------------------------------------------


def loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `bench.loadgen` with a spec and return its JSON result."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH_DIR.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def closed_loop(target: Target, *, concurrency: int, duration: float, max_requests: int) -> dict[str, Any]:
    """`concurrency` clients back to back for `duration` s: completed requests per second and latencies."""
    spec = {
        "mode": "closed",
        "url": target.url,
        "headers": target.headers,
        "body": target.body,
        "concurrency": concurrency,
        "duration": duration,
        "max_requests": max_requests,
        "timeout": 60,
    }
    raw = loadgen(spec, timeout=duration + 120)
    return {
        "concurrency": concurrency,
        "duration_s": round(raw["elapsed_s"], 3),
        "ok": raw["ok"],
        "statuses": raw["statuses"],
        "errors": raw["error_count"],
        "ok_per_s": round(raw["ok"] / raw["elapsed_s"], 3) if raw["elapsed_s"] else None,
        "latency": summary_ms(raw["latencies_s"]),
    }


def streams(target: Target, *, concurrency: int, ramp: float, timeout: float) -> dict[str, Any]:
    """`concurrency` streams at once: how many completed cleanly, TTFT and inter-chunk percentiles."""
    spec = {
        "mode": "streams",
        "url": target.url,
        "headers": target.headers,
        "body": target.body,
        "concurrency": concurrency,
        "ramp": ramp,
        "timeout": timeout,
    }
    raw = loadgen(spec, timeout=timeout + ramp + 120)
    outcomes = raw["streams"]
    completed = [s for s in outcomes if s["status"] == 200 and s["done"]]
    statuses = Counter(str(s["status"]) for s in outcomes)
    errors = Counter(s["error"] for s in outcomes if s["error"])
    return {
        "concurrency": concurrency,
        "completed": len(completed),
        "failed": raw["requested"] - len(completed),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "elapsed_s": round(raw["elapsed_s"], 3),
        "peak_open": peak_open([(s["opened_s"], s["closed_s"]) for s in completed]),
        "ttft": summary_ms([s["ttft_s"] for s in completed]),
        "inter_chunk": summary_ms([gap for s in completed for gap in s["gaps_s"]]),
    }


def peak_open(intervals: list[tuple[float, float]]) -> int:
    """The most intervals (opened, closed) open at one instant: streams held at the same time."""
    events = sorted([(opened, 1) for opened, _ in intervals] + [(closed, -1) for _, closed in intervals])
    peak = current = 0
    for _, change in events:  # at equal times a close (-1) sorts first: touching intervals do not overlap
        current += change
        peak = max(peak, current)
    return peak


# ----- processes: RSS, py-spy ----------------------------------------------------------------------------------


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) for every process: state, ppid, pgrp, … (a
    process that ends while being read is skipped)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()


def group_pids(groups: dict[str, int]) -> dict[str, list[int]]:
    """The processes of each process group (a gunicorn master and its workers share one)."""
    wanted = {pgid: name for name, pgid in groups.items()}
    found: dict[str, list[int]] = {name: [] for name in groups}
    for pid, stat in process_stats():
        name = wanted.get(int(stat[2]))
        if name is not None:
            found[name].append(pid)
    return found


def group_memory(groups: dict[str, int]) -> dict[str, Any]:
    """RSS and PSS (MB) summed over every process of each process group (gunicorn masters and workers)."""
    per_group: dict[str, dict[str, float | int]] = {
        name: {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0} for name in groups
    }
    for name, pids in group_pids(groups).items():
        for pid in pids:
            with contextlib.suppress(OSError):
                rss = _kb_field(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
                pss = _kb_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
                per_group[name]["rss_mb"] += rss / 1024
                per_group[name]["pss_mb"] += pss / 1024
                per_group[name]["processes"] += 1
    for values in per_group.values():
        values["rss_mb"], values["pss_mb"] = round(values["rss_mb"], 1), round(values["pss_mb"], 1)
    return {
        "total_rss_mb": round(sum(v["rss_mb"] for v in per_group.values()), 1),
        "total_pss_mb": round(sum(v["pss_mb"] for v in per_group.values()), 1),
        "processes": sum(v["processes"] for v in per_group.values()),
        "per_service": per_group,
    }


# Backing processes whose CPU a request also costs, by /proc/<pid>/comm (nginx is the static upstream here).
BACKING_COMMANDS = {
    "postgres": "postgres",
    "redis-server": "redis",
    "nginx": "nginx (upstream)",
    "beam.smp": "rabbitmq",
}
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(groups: dict[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) used so far by each process of each platform group and backing service, by pid."""
    wanted = {pgid: name for name, pgid in groups.items()}
    used: dict[str, dict[int, float]] = {name: {} for name in [*groups, *BACKING_COMMANDS.values()]}
    for pid, stat in process_stats():
        with contextlib.suppress(OSError):
            name = wanted.get(int(stat[2])) or BACKING_COMMANDS.get(Path(f"/proc/{pid}/comm").read_text().strip())
            if name is not None:
                used[name][pid] = (int(stat[11]) + int(stat[12])) / _TICKS
    return used


def cpu_per_request(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], requests: int | None
) -> dict[str, float]:
    """Microseconds of CPU each process group spent per request between two `cpu_seconds` readings. Per process: a
    process that exited in between is left out (its share is unknown, and its whole past must not be subtracted), one
    that started in between counts whole."""
    if not requests:
        return {}
    spent = {
        name: sum(seconds - before.get(name, {}).get(pid, 0.0) for pid, seconds in by_pid.items()) / requests * 1e6
        for name, by_pid in after.items()
    }
    shown = {name: round(us) for name, us in sorted(spent.items(), key=lambda item: -item[1]) if us >= 1}
    return shown | {"total": round(sum(spent.values()))}


def _kb_field(text: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class Profiler:
    """py-spy on running workers (non-blocking sampling, so the profiled process is not paused)."""

    def __init__(self, out_dir: Path, duration: float) -> None:
        self.out_dir, self.duration = out_dir, duration
        self.running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    @property
    def available(self) -> bool:
        """Whether py-spy is installed (PyPI `py-spy`, in the dev dependency group)."""
        return Path(self.py_spy).exists()

    def start(self, label: str, pid: int, svg: Path) -> None:
        """Record a flame graph (SVG) and collapsed stacks (for the report's hot-frame table) of one process."""
        duration = str(max(1, round(self.duration)))
        for fmt, path in (("flamegraph", svg), ("raw", svg.with_suffix(".txt"))):
            argv = [self.py_spy, "record", "--pid", str(pid), "--duration", duration, "--rate", "200"]
            argv += ["--nonblocking", "--format", fmt, "--output", str(path)]
            log = (self.out_dir / f"py-spy-{label}-{fmt}.log").open("wb")
            self.running.append((label, path, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
            log.close()

    def finish(self) -> dict[str, Any]:
        """Wait for every recording; what each produced (or why not)."""
        results: dict[str, Any] = {}
        for label, path, process in self.running:
            try:
                process.wait(self.duration + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            log = self.out_dir / f"py-spy-{label}-{'raw' if path.suffix == '.txt' else 'flamegraph'}.log"
            ok = process.returncode == 0 and path.exists() and path.stat().st_size > 0
            key = "stacks" if path.suffix == ".txt" else "flamegraph"
            entry = results.setdefault(label, {})
            entry[key] = path.name if ok else None
            if not ok:
                entry[f"{key}_error"] = log.read_text(errors="replace")[-500:] if log.exists() else "no output"
            with contextlib.suppress(OSError):
                log.unlink()
        self.running.clear()
        return results


def hot_frames(stacks_file: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the functions with the most samples on top of the stack, and inclusive."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks_file.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")[1:]]  # the first entry is the thread/process
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "samples": n, "share": round(n / total, 4)} for f, n in counter.most_common(top)]

    return {"samples": total, "self": share(self_counts), "inclusive": share(inclusive)}


def _short_frame(frame: str) -> str:
    """`func (path/to/module.py:12)` → `func (module.py)` so lines of one function add up."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    function, path = match.groups()
    parts = path.split("/")
    where = "/".join(parts[-2:]) if "site-packages" not in path else parts[parts.index("site-packages") + 1]
    return f"{function} ({where})"


# ----- /metrics --------------------------------------------------------------------------------------------------


def scrape_times(url: str, count: int) -> dict[str, Any]:
    """Time `count` sequential GETs of a `/metrics` endpoint (a new registry per scrape in multiprocess mode)."""
    session = requests.Session()
    times, size, failures = [], 0, 0
    for _ in range(count):
        started = time.perf_counter()
        answer = session.get(url, timeout=30)
        times.append(time.perf_counter() - started)
        if answer.status_code != 200:
            failures += 1
        size = len(answer.content)
    session.close()
    return summary_ms(times) | {"bytes": size, "failures": failures}


# ----- batch: the jobs API end to end, and the raw pika loop ----------------------------------------------------


def batch_end_to_end(gateway: str, api_key: str, *, items: int, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Upload `items` chat requests as JSONL, create a batch, poll until it ends: items per second end to end."""
    auth = {"Authorization": f"Bearer {api_key}"}
    lines = "".join(
        json.dumps({"custom_id": f"item-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
        for i in range(items)
    )
    uploaded = requests.post(
        f"{gateway}/v1/files",
        headers=auth,
        files={"file": ("bench.jsonl", lines.encode(), "application/jsonl")},
        data={"purpose": "batch"},
        timeout=60,
    )
    if uploaded.status_code != 200:
        raise RuntimeError(f"file upload answered {uploaded.status_code}: {uploaded.text[:300]}")
    started = time.perf_counter()
    created = requests.post(
        f"{gateway}/v1/batches",
        headers=auth,
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        timeout=30,
    )
    if created.status_code != 200:
        raise RuntimeError(f"batch creation answered {created.status_code}: {created.text[:300]}")
    batch = created.json()
    deadline = started + timeout
    terminal = {"completed", "failed", "expired", "cancelled"}
    while batch["status"] not in terminal and time.perf_counter() < deadline:
        time.sleep(0.05)
        answer = requests.get(f"{gateway}/v1/batches/{batch['id']}", headers=auth, timeout=30)
        if answer.status_code == 200:
            batch = answer.json()
    elapsed = time.perf_counter() - started
    counts = batch.get("request_counts") or {}
    return {
        "items": items,
        "status": batch["status"],
        "completed": counts.get("completed", 0),
        "failed": counts.get("failed", 0),
        "elapsed_s": round(elapsed, 3),
        "items_per_s": round(counts.get("completed", 0) / elapsed, 2) if elapsed else None,
        "timed_out": batch["status"] not in terminal,
    }


def raw_pika_loop(amqp_url: str, queue: str, *, messages: int, prefetch: int, timeout: float) -> dict[str, Any]:
    """The broker's own ceiling for the batch path: publish persistent messages with confirms to a quorum queue
    while a consumer with the jobs worker's prefetch acks them; messages per second from first publish to last ack."""
    setup = pika.BlockingConnection(pika.URLParameters(amqp_url))
    setup.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    setup.close()
    payload = json.dumps({"id": "x" * 26, "type": "batch.item", "data": {"item_id": "y" * 26}}).encode()
    received = [0]
    deadline = time.monotonic() + timeout
    consumer_ready = threading.Event()

    def consume() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=prefetch)
        consumer_ready.set()
        for method, _props, _body in channel.consume(queue, inactivity_timeout=1.0):
            if method is not None:
                channel.basic_ack(method.delivery_tag)
                received[0] += 1
            if received[0] >= messages or time.monotonic() > deadline:
                break
        channel.cancel()
        connection.close()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer_ready.wait(10)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    started = time.perf_counter()
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    published = 0
    while published < messages and time.monotonic() < deadline:
        channel.basic_publish("", queue, payload, properties=properties, mandatory=True)
        published += 1
    connection.close()
    consumer.join(max(0.0, deadline - time.monotonic()) + 5)
    elapsed = time.perf_counter() - started
    cleanup = pika.BlockingConnection(pika.URLParameters(amqp_url))
    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
        cleanup.channel().queue_delete(queue)
    cleanup.close()
    return {
        "messages": messages,
        "published": published,
        "consumed": received[0],
        "prefetch": prefetch,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(received[0] / elapsed, 1) if elapsed else None,
    }


# ----- streams one at a time, paired rounds --------------------------------------------------------------------


def read_stream(target: Target, connection: http.client.HTTPConnection, path: str) -> tuple[float, list[float], bool]:
    """One stream: time to the first SSE `data:` line, the gaps between the next ones, and whether it ended."""
    headers = {**target.headers, "Content-Type": "application/json", "Accept": "text/event-stream"}
    started = time.perf_counter()
    connection.request("POST", path, body=target.body.encode(), headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        response.read()
        raise http.client.HTTPException(f"status {response.status}")
    # Bounded in time as well as by the connection's own timeout between lines.
    ttft, gaps, done = read_timings(response, started, time.monotonic() + STREAM_DEADLINE_S)
    response.read()
    return ttft if ttft is not None else 0.0, gaps, done


def paired_streams(targets: list[Target], *, rounds: int, per_round: int) -> dict[str, Any]:
    """Streams one at a time, interleaved across targets; added TTFT and inter-chunk p50/p99 against the first."""
    connections = {target.name: target.connection(timeout=60) for target in targets}
    failures: Counter[str] = Counter()
    per_round_stats: list[dict[str, dict[str, float | None]]] = []
    order = list(targets)
    rng = random.Random(8)  # noqa: S311 - a shuffled order, not a secret
    for _ in range(rounds):
        ttfts: dict[str, list[float]] = {target.name: [] for target in targets}
        gaps: dict[str, list[float]] = {target.name: [] for target in targets}
        for _ in range(per_round):
            rng.shuffle(order)
            for target in order:
                connection, path = connections[target.name]
                try:
                    ttft, stream_gaps, done = read_stream(target, connection, path)
                except (OSError, http.client.HTTPException):
                    failures[target.name] += 1
                    connection.close()
                    connections[target.name] = target.connection(timeout=60)
                    continue
                if not done:
                    failures[target.name] += 1
                    continue
                ttfts[target.name].append(ttft)
                gaps[target.name].extend(stream_gaps)
        per_round_stats.append(
            {
                name: {
                    "ttft_p50": percentile(ttfts[name], 50),
                    "ttft_p99": percentile(ttfts[name], 99),
                    "gap_p50": percentile(gaps[name], 50),
                    "gap_p99": percentile(gaps[name], 99),
                }
                for name in ttfts
            }
        )
    for connection, _ in connections.values():
        connection.close()
    reference = targets[0].name
    result: dict[str, Any] = {"reference": reference, "rounds": rounds, "per_round": per_round, "paths": {}}
    for target in targets:
        entry: dict[str, Any] = {"failures": failures[target.name]}
        for figure in ("ttft_p50", "ttft_p99", "gap_p50", "gap_p99"):
            own = [r[target.name][figure] for r in per_round_stats if r[target.name][figure] is not None]
            entry[f"{figure}_ms"] = _ms(statistics.median(own)) if own else None
            if target.name != reference:
                added = [
                    r[target.name][figure] - r[reference][figure]
                    for r in per_round_stats
                    if r[target.name][figure] is not None and r[reference][figure] is not None
                ]
                entry[f"added_{figure}_ms"] = _ms(statistics.median(added)) if added else None
        result["paths"][target.name] = entry
    return result
