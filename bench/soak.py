"""The soak (issue #9): a bounded, steady mixed load through the gateway while the platform's resources are sampled.

`python -m bench.soak` (ten minutes; `--duration` to change) starts the stack of `bench/stack.py` (fake provider as
both upstreams, no nginx), runs several concurrent clients with the official SDKs (OpenAI chat and streams, Anthropic
messages and streams, embeddings, and batches end to end), and every `--interval` s samples: the error rate, each
process group's RSS, PostgreSQL connections per database (pg_stat_activity), the platform's RabbitMQ connections and
their channels (rabbitmqctl), its Redis clients (and the server's connected_clients). It writes soak.json, SOAK.md
and soak.png under bench/results/soak/ and exits 1 unless every verdict holds:

- errors: failed operations / operations < 0.1 % (SDK retries off, so nothing is hidden);
- memory: each service's RSS (all of its processes) at the end (mean of the last 3 samples) is < 10 % above its
  level just after the warm-up (mean of the first 3 samples after it);
- flat: for each connection count (PostgreSQL per database, RabbitMQ connections, channels, Redis clients of the
  platform), the maximum after the warm-up is at most the maximum during the warm-up + `--slack` (default 2).

The counts are the platform's own (its sockets, found through /proc, and its databases), not the server-wide
figures other users of the same servers move. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python bench/soak.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic
import openai
import redis
import requests
from sqlalchemy import create_engine, text

from bench.measure import group_memory, group_pids
from bench.stack import Backing, Stack

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "soak"
SERVICES = ("gateway", "auth", "llm", "jobs", "jobs-worker")  # judged; the fake provider is sampled, not judged
MAX_ERROR_RATE = 0.001
MAX_RSS_GROWTH = 0.10
# Operation mix (weights): what a busy tenant sends. Batches run on a client of their own.
MIX = {"chat": 4, "chat_stream": 2, "messages": 1, "messages_stream": 2, "embeddings": 2}
BATCH_ITEMS = 4


class SoakStack(Stack):
    """The benchmark stack without nginx: llm's OpenAI provider is the fake provider too (the soak wants real
    streams). The stack's extra_env is applied last, so it overrides the static upstream Stack.start names."""

    def _start_nginx(self) -> None:
        fake = f"{self.url('fakeprovider')}/v1"
        self.extra_env["llm"] = {**self.extra_env.get("llm", {}), "LLM_OPENAI_BASE_URL": fake}


# ----- load -----------------------------------------------------------------------------------------------------


class Tally:
    """Operation outcomes, shared by the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.examples: list[str] = []

    def record(self, kind: str, error: str | None) -> None:
        """One finished operation."""
        with self._lock:
            if error is None:
                self.ok[kind] += 1
            else:
                self.failed[kind] += 1
                if len(self.examples) < 20:
                    self.examples.append(f"{kind}: {error}"[:400])

    def totals(self) -> tuple[int, int]:
        """(operations, failures) so far."""
        with self._lock:
            return sum(self.ok.values()) + sum(self.failed.values()), sum(self.failed.values())


def prompt(rng: random.Random) -> str:
    """A short varied user message."""
    return f"soak message {rng.randrange(10**6)} about {rng.choice(['tea', 'rain', 'gears', 'maps', 'jazz'])}"


def op_chat(oa: openai.OpenAI, _an: anthropic.Anthropic, rng: random.Random) -> None:
    """A non-streamed OpenAI chat completion."""
    answer = oa.chat.completions.create(
        model="gpt-4o-mini", max_tokens=16, messages=[{"role": "user", "content": prompt(rng)}]
    )
    if not answer.choices[0].message.content:
        raise RuntimeError("empty completion")


def op_chat_stream(oa: openai.OpenAI, _an: anthropic.Anthropic, rng: random.Random) -> None:
    """An OpenAI stream read to its end, with its usage chunk."""
    stream = oa.chat.completions.create(
        model="gpt-4o-mini",
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt(rng)}],
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    if usage is None or usage.completion_tokens <= 0:
        raise RuntimeError("stream ended without usage")


def op_messages(_oa: openai.OpenAI, an: anthropic.Anthropic, rng: random.Random) -> None:
    """A non-streamed Anthropic message."""
    answer = an.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": prompt(rng)}]
    )
    if answer.stop_reason not in ("end_turn", "max_tokens"):
        raise RuntimeError(f"stop_reason {answer.stop_reason}")


def op_messages_stream(_oa: openai.OpenAI, an: anthropic.Anthropic, rng: random.Random) -> None:
    """An Anthropic stream (named events) read to message_stop."""
    with an.messages.stream(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": prompt(rng)}]
    ) as stream:
        text_out = "".join(stream.text_stream)
        final = stream.get_final_message()
    if not text_out or final.usage.output_tokens <= 0:
        raise RuntimeError("stream without text or usage")


def op_embeddings(oa: openai.OpenAI, _an: anthropic.Anthropic, rng: random.Random) -> None:
    """Embeddings of two inputs."""
    answer = oa.embeddings.create(model="text-embedding-3-small", input=[prompt(rng), prompt(rng)])
    if len(answer.data) != 2 or not answer.data[0].embedding:
        raise RuntimeError("wrong embeddings count")


OPERATIONS: dict[str, Callable[[openai.OpenAI, anthropic.Anthropic, random.Random], None]] = {
    "chat": op_chat,
    "chat_stream": op_chat_stream,
    "messages": op_messages,
    "messages_stream": op_messages_stream,
    "embeddings": op_embeddings,
}


def op_batch(oa: openai.OpenAI, rng: random.Random, stop: threading.Event, timeout: float) -> None:
    """A small batch end to end: upload, create, poll until final, read the output file."""
    lines = [
        {
            "custom_id": f"item-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": prompt(rng)}]},
        }
        for index in range(BATCH_ITEMS)
    ]
    payload = "\n".join(json.dumps(line) for line in lines).encode()
    file_id = oa.files.create(file=("soak.jsonl", io.BytesIO(payload)), purpose="batch").id
    batch = oa.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch.id} still {batch.status} after {timeout:.0f} s")
        stop.wait(0.5)
        batch = oa.batches.retrieve(batch.id)
    counts = batch.request_counts
    if batch.status != "completed" or counts is None or counts.completed != BATCH_ITEMS or not batch.output_file_id:
        raise RuntimeError(f"batch {batch.id} {batch.status} {counts}")
    output = oa.files.content(batch.output_file_id).text
    if len(output.strip().splitlines()) != BATCH_ITEMS:
        raise RuntimeError("output file does not have one line per item")


def describe(exc: BaseException) -> str:
    """An error in one line (status code first for API errors)."""
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {exc}"


def run_client(gateway: str, key: str, seed: int, tally: Tally, stop: threading.Event, pause: float) -> None:
    """One client: operations drawn from the mix, back to back (with `pause` s between), until `stop`."""
    rng = random.Random(seed)  # noqa: S311 - a load mix, not a secret
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60)
    an = anthropic.Anthropic(base_url=gateway, api_key=key, max_retries=0, timeout=60)
    kinds, weights = list(MIX), list(MIX.values())
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        try:
            OPERATIONS[kind](oa, an, rng)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the soak
            tally.record(kind, describe(exc))
        else:
            tally.record(kind, None)
        stop.wait(pause)
    oa.close()
    an.close()


def run_batches(gateway: str, key: str, tally: Tally, stop: threading.Event, every: float) -> None:
    """Batches one after the other, a new one at most every `every` s."""
    rng = random.Random(0)  # noqa: S311
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60)
    while not stop.is_set():
        started = time.monotonic()
        try:
            op_batch(oa, rng, stop, timeout=120)
        except Exception as exc:  # noqa: BLE001
            tally.record("batch", describe(exc))
        else:
            tally.record("batch", None)
        stop.wait(max(0.0, every - (time.monotonic() - started)))
    oa.close()


# ----- sampling -------------------------------------------------------------------------------------------------


def socket_inodes(pids: list[int]) -> set[int]:
    """The socket inodes the processes hold open."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def connections_to(remote_port: int, inodes: set[int]) -> list[int]:
    """Local ports of the established TCP connections to `remote_port` whose socket is one of `inodes`."""
    local_ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if (
                    fields[3] == "01"
                    and int(fields[2].rsplit(":", 1)[1], 16) == remote_port
                    and int(fields[9]) in inodes
                ):
                    local_ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return local_ports


def rabbit_channels(local_ports: list[int]) -> int | None:
    """Channels on the broker's connections from these local ports (rabbitmqctl; None if it cannot run)."""
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "peer_port", "channels"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    wanted, total = set(local_ports), 0
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in wanted:
            total += int(parts[1])
    return total


class Sampler:
    """One sample of everything the verdicts look at."""

    def __init__(self, stack: Stack, databases: dict[str, str]) -> None:
        self.stack = stack
        self.databases = databases  # service → database name
        self.engine = create_engine(stack.backing.postgres_url, pool_size=1, max_overflow=0)
        self.redis = redis.Redis.from_url(stack.backing.redis_url)
        self.ports = {
            "postgres": urlsplit(stack.backing.postgres_url).port or 5432,
            "amqp": urlsplit(stack.backing.amqp_url).port or 5672,
            "redis": urlsplit(stack.backing.redis_url).port or 6379,
        }

    def sample(self, elapsed: float, tally: Tally) -> dict[str, Any]:
        """RSS per service, connections per backing service, the operations so far."""
        groups = self.stack.process_groups()
        memory = group_memory(groups)
        inodes = socket_inodes([pid for pids in group_pids(groups).values() for pid in pids])
        with self.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT datname, count(*) FROM pg_stat_activity WHERE datname = ANY(:names) GROUP BY datname"),
                {"names": list(self.databases.values())},
            ).all()
        per_db = dict(rows)
        amqp_ports = connections_to(self.ports["amqp"], inodes)
        operations, failures = tally.totals()
        return {
            "t": round(elapsed, 1),
            "operations": operations,
            "failures": failures,
            "rss_mb": {name: values["rss_mb"] for name, values in memory["per_service"].items()},
            "processes": {name: values["processes"] for name, values in memory["per_service"].items()},
            "postgres": {service: per_db.get(name, 0) for service, name in self.databases.items()},
            "postgres_sockets": len(connections_to(self.ports["postgres"], inodes)),
            "amqp_connections": len(amqp_ports),
            "amqp_channels": rabbit_channels(amqp_ports),
            "redis_clients": len(connections_to(self.ports["redis"], inodes)),
            "redis_connected_clients_server": int(self.redis.info("clients")["connected_clients"]),
        }

    def close(self) -> None:
        """Release the sampler's own connections."""
        self.engine.dispose()
        self.redis.close()


def progress(sample: dict[str, Any], duration: float) -> str:
    """One line per sample on stderr."""
    ops, failed = sample["operations"], sample["failures"]
    rate = failed / ops * 100 if ops else 0.0
    rss = " ".join(f"{name}={mb:.0f}" for name, mb in sample["rss_mb"].items())
    pg = sum(sample["postgres"].values())
    return (
        f"[soak {sample['t']:6.1f}/{duration:.0f}s] ops {ops} failed {failed} ({rate:.3f}%) | RSS MB {rss} | "
        f"pg {pg} amqp {sample['amqp_connections']}/{sample['amqp_channels']} redis {sample['redis_clients']}"
    )


# ----- verdicts -------------------------------------------------------------------------------------------------


def series(samples: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Each connection count as a series (PostgreSQL per database, broker connections and channels, Redis)."""
    out: dict[str, list[float | None]] = {}
    for sample in samples:
        for service, count in sample["postgres"].items():
            out.setdefault(f"postgres:{service}", []).append(count)
        for name in ("amqp_connections", "amqp_channels", "redis_clients"):
            out.setdefault(name, []).append(sample[name])
    return out


def verdicts(samples: list[dict[str, Any]], tally: Tally, *, warmup: float, slack: int) -> dict[str, dict[str, Any]]:
    """The three pass/fail judgements, each with its figures."""
    operations, failures = tally.totals()
    rate = failures / operations if operations else 1.0
    result: dict[str, dict[str, Any]] = {
        "errors": {
            "passed": operations > 0 and rate < MAX_ERROR_RATE,
            "operations": operations,
            "failures": failures,
            "error_rate": rate,
            "limit": MAX_ERROR_RATE,
        }
    }
    during = [s for s in samples if s["t"] <= warmup]
    after = [s for s in samples if s["t"] > warmup]
    memory: dict[str, Any] = {"passed": len(after) >= 2, "limit": MAX_RSS_GROWTH, "per_service": {}}
    if len(after) < 2:
        memory["reason"] = "fewer than two samples after the warm-up"
    for name in SERVICES:
        start = statistics.fmean(s["rss_mb"][name] for s in after[:3]) if after else 0.0
        end = statistics.fmean(s["rss_mb"][name] for s in after[-3:]) if after else 0.0
        growth = (end - start) / start if start else None
        ok = growth is not None and growth < MAX_RSS_GROWTH
        memory["per_service"][name] = {"after_warmup_mb": round(start, 1), "end_mb": round(end, 1), "growth": growth}
        memory["passed"] = memory["passed"] and ok
    result["memory"] = memory
    flat: dict[str, Any] = {"passed": bool(during) and bool(after), "slack": slack, "per_series": {}}
    warm, rest = series(during), series(after)
    for name, values in warm.items():
        known_warm = [v for v in values if v is not None]
        known_rest = [v for v in rest.get(name, []) if v is not None]
        if not known_warm or not known_rest:  # e.g. rabbitmqctl could not run: said so, judged on the rest
            flat["per_series"][name] = {"passed": None, "reason": "not measured"}
            continue
        # Flat: no new high beyond the warm-up's, or, when a pool reached its high-water mark only after the
        # warm-up (a step, seen in CI), no further climb from the first half of the rest to the second (a leak
        # climbs on; a pool at its high-water mark holds, give or take one connection).
        half = len(known_rest) // 2
        settled = half > 0 and max(known_rest[half:]) <= max(known_rest[:half]) + min(slack, 1)
        ok = max(known_rest) <= max(known_warm) + slack or settled
        flat["per_series"][name] = {
            "warmup_max": max(known_warm),
            "after_max": max(known_rest),
            "settled_after_a_step": settled,
            "passed": ok,
        }
        flat["passed"] = flat["passed"] and ok
    result["flat"] = flat
    return result


# ----- outputs --------------------------------------------------------------------------------------------------


def plot(samples: list[dict[str, Any]], warmup: float, path: Path) -> None:
    """Four panels over time: operations and failures, RSS per service, PostgreSQL, broker and Redis counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    rates = [0.0] + [
        (b["operations"] - a["operations"]) / max(b["t"] - a["t"], 1e-9) for a, b in itertools.pairwise(samples)
    ]
    axes[0][0].plot(t, rates, label="operations/s")
    axes[0][0].plot(t, [s["failures"] for s in samples], label="failures (cumulative)")
    axes[0][0].set_title("load")
    for name in samples[0]["rss_mb"]:
        axes[0][1].plot(t, [s["rss_mb"][name] for s in samples], label=name)
    axes[0][1].set_title("RSS per service (MB)")
    for service in samples[0]["postgres"]:
        axes[1][0].plot(t, [s["postgres"][service] for s in samples], label=f"{service} db")
    axes[1][0].set_title("PostgreSQL connections (pg_stat_activity)")
    for name in ("amqp_connections", "amqp_channels", "redis_clients"):
        axes[1][1].plot(t, [s[name] if s[name] is not None else float("nan") for s in samples], label=name)
    axes[1][1].set_title("RabbitMQ and Redis (the platform's)")
    for ax in (a for row in axes for a in row):
        ax.axvline(warmup, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
        ax.set_xlabel("s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The short report."""
    v = result["verdicts"]
    mark = lambda ok: "pass" if ok else ("n/a" if ok is None else "**FAIL**")  # noqa: E731
    lines = [
        f"# Parley soak ({result['duration_s']:.0f} s, {result['clients']} clients)",
        "",
        f"{result['started_at']} · warm-up {result['warmup_s']:.0f} s · sample every {result['interval_s']:.0f} s · "
        f"overall: {'pass' if result['passed'] else '**FAIL**'} · start-up {result['timings']['startup_s']:.0f} s, "
        f"load {result['timings']['load_s']:.0f} s, shutdown {result['timings']['shutdown_s']:.0f} s",
        "",
        "| verdict | figure | result |",
        "|---|---|---|",
        f"| errors < {MAX_ERROR_RATE:.1%} | {v['errors']['failures']} of {v['errors']['operations']} "
        f"({v['errors']['error_rate']:.4%}) | {mark(v['errors']['passed'])} |",
    ]
    for name, m in v["memory"]["per_service"].items():
        growth = "n/a" if m["growth"] is None else f"{m['growth']:+.1%}"
        ok = m["growth"] is not None and m["growth"] < MAX_RSS_GROWTH
        lines.append(f"| RSS {name} < +10% | {m['after_warmup_mb']} → {m['end_mb']} MB ({growth}) | {mark(ok)} |")
    for name, f in v["flat"]["per_series"].items():
        figure = f"max {f['warmup_max']} → {f['after_max']}" if "warmup_max" in f else f["reason"]
        lines.append(f"| {name} flat (slack {v['flat']['slack']}) | {figure} | {mark(f['passed'])} |")
    lines += ["", "| operation | ok | failed |", "|---|---|---|"]
    for kind in sorted({*result["ok"], *result["failed"]}):
        lines.append(f"| {kind} | {result['ok'].get(kind, 0)} | {result['failed'].get(kind, 0)} |")
    if result["failure_examples"]:
        lines += ["", "First failures:", ""] + [f"- `{e}`" for e in result["failure_examples"]]
    lines += ["", "![soak](soak.png)", ""]
    return "\n".join(lines)


# ----- the run --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (backing services as for `python -m bench`)."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: a quarter, 15-120 s)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=6, help="concurrent SDK clients (plus one batch client)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds each client waits between operations")
    parser.add_argument("--batch-every", type=float, default=10.0, help="seconds between batch starts")
    parser.add_argument("--slack", type=int, default=2, help="connections allowed above the warm-up maximum")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("PARLEY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("PARLEY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument("--redis-url", default=os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, max(15.0, args.duration / 4))
    if args.duration <= args.warmup:
        parser.error("--duration must be longer than --warmup")
    return args


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, load and sample it for `duration` s, stop it; the results."""
    backing = Backing(args.postgres_url, args.amqp_url, args.redis_url)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    timings = {"startup_s": -time.monotonic()}
    with tempfile.TemporaryDirectory(prefix="parley-soak-") as run_dir, SoakStack(Path(run_dir), backing) as stack:
        timings["startup_s"] += time.monotonic()
        assert stack.credentials is not None
        gateway = stack.url("gateway")
        token = stack.access_token()
        keys = [stack.credentials.api_key]
        for index in range(args.clients):  # one key per client, as separate applications would have
            made = requests.post(
                f"{gateway}/auth/api-keys",
                json={"name": f"soak-{index}"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            made.raise_for_status()
            keys.append(made.json()["key"])
        databases = dict(zip(("auth", "llm", "jobs"), stack.postgres.created, strict=True))
        sampler, tally, stop = Sampler(stack, databases), Tally(), threading.Event()
        threads = [
            threading.Thread(target=run_client, args=(gateway, keys[i + 1], i, tally, stop, args.pause), daemon=True)
            for i in range(args.clients)
        ]
        threads.append(
            threading.Thread(target=run_batches, args=(gateway, keys[0], tally, stop, args.batch_every), daemon=True)
        )
        samples: list[dict[str, Any]] = []
        began = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            next_at = 0.0
            while (elapsed := time.monotonic() - began) < args.duration:
                samples.append(sampler.sample(elapsed, tally))
                print(progress(samples[-1], args.duration), file=sys.stderr, flush=True)
                while next_at <= time.monotonic() - began:  # on the interval's grid, skipping what sampling overran
                    next_at += args.interval
                time.sleep(max(0.0, min(next_at, args.duration) - (time.monotonic() - began)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=150)
        samples.append(sampler.sample(time.monotonic() - began, tally))
        print(progress(samples[-1], args.duration), file=sys.stderr, flush=True)
        sampler.close()
        if any(thread.is_alive() for thread in threads):
            tally.record("shutdown", "a client did not finish its last operation within 150 s")
        timings["load_s"] = time.monotonic() - began
        timings["shutdown_s"] = -time.monotonic()
    timings["shutdown_s"] += time.monotonic()
    result_verdicts = verdicts(samples, tally, warmup=args.warmup, slack=args.slack)
    return {
        "started_at": started_at,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "interval_s": args.interval,
        "clients": args.clients,
        "timings": {name: round(value, 1) for name, value in timings.items()},
        "mix": MIX,
        "batch_items": BATCH_ITEMS,
        "ok": dict(tally.ok),
        "failed": dict(tally.failed),
        "failure_examples": tally.examples,
        "samples": samples,
        "verdicts": result_verdicts,
        "passed": all(v["passed"] for v in result_verdicts.values()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run, write soak.json / SOAK.md / soak.png; 0 when every verdict holds, 1 when one does not."""
    args = parse_args(argv)
    # SIGTERM (a test's timeout, CI) unwinds through the stack's stop, like Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = soak(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["samples"], args.warmup, args.out / "soak.png")
    (args.out / "SOAK.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
