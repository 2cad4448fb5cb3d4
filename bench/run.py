"""The benchmark run: start the stack, run every scenario (bounded), stop the stack, write the results.

`python -m bench` (or `python bench/run.py`) for the full run, `--smoke` for a seconds-long pass over every
scenario with minimal sizes (what `make test` runs). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform as host
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench import measure, report
from bench.measure import Target
from bench.stack import Backing, Stack, run_quiet
from parley_kit.cli import raise_open_files_limit

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHAT_MODEL = "gpt-4o-mini"


@dataclass(frozen=True)
class Sizes:
    """How much of each scenario to run (the full run and the smoke run differ only here)."""

    latency_rounds: int = 7
    latency_per_round: int = 300
    latency_warmup: int = 50
    wrk_connections: int = 32
    wrk_duration: float = 15.0
    wrk_warmup: float = 3.0
    # The floor and the full path back to back, this many times: the throughput target's share is their median.
    paired_rounds: int = 5
    paired_duration: float = 5.0
    profile_duration: float = 8.0
    scrapes: int = 50
    batch_items: int = 2000
    batch_timeout: float = 300.0
    pika_messages: int = 20_000
    slow_latency_ms: int = 2000
    slow_duration: float = 30.0
    slow_in_flight_per_worker: int = 4
    ttft_rounds: int = 5
    ttft_per_round: int = 20
    ttft_tokens: int = 10
    ttft_chunk_delay_ms: int = 10
    stream_levels: tuple[int, ...] = (250, 500, 1000, 2000, 2500, 3000)
    stream_tokens: int = 20
    stream_chunk_delay_ms: int = 100
    stream_ramp: float = 1.0
    # Held streams: the target's count, arriving over `held_ramp` s (a rate the path serves) and each lasting past the
    # ramp's end, so that all are open at once; one event a second while held.
    held_streams: int = 2000
    held_ramp: float = 20.0
    held_tokens: int = 25
    held_chunk_delay_ms: int = 1000


SMOKE = Sizes(
    latency_rounds=2,
    latency_per_round=10,
    latency_warmup=3,
    wrk_duration=1.0,
    wrk_warmup=0.0,
    paired_rounds=2,
    paired_duration=1.0,
    profile_duration=1.0,
    scrapes=3,
    batch_items=5,
    batch_timeout=30.0,
    pika_messages=100,
    slow_latency_ms=200,
    slow_duration=1.0,
    ttft_rounds=2,
    ttft_per_round=2,
    ttft_tokens=3,
    ttft_chunk_delay_ms=5,
    stream_levels=(5, 10),
    stream_tokens=3,
    stream_chunk_delay_ms=20,
    stream_ramp=0.1,
    held_streams=10,
    held_ramp=0.2,
    held_tokens=5,  # 0.5 s: well past the 0.2 s ramp, so all are open together even on a loaded machine
    held_chunk_delay_ms=100,
)

STREAM_TARGET_LEVEL = 2000


def chat_body(content: str, **extra: Any) -> str:
    """A small chat completion request (the same bytes on every path)."""
    return json.dumps(
        {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 32, **extra}
    )


SCENARIOS = (
    "rss_idle",
    "latency",
    "throughput",
    "throughput_paired",
    "profile",
    "metrics_scrape",
    "batch",
    "slow_upstream",
    "streams",
)


class Run:
    """One benchmark run over a started stack; every scenario stores its figures (or its error) in `results`."""

    def __init__(self, stack: Stack, sizes: Sizes, out_dir: Path, only: frozenset[str] = frozenset()) -> None:
        self.stack, self.sizes, self.out_dir = stack, sizes, out_dir
        self.only = only
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def scenario(self, name: str, body: Callable[[], Any]) -> None:
        """Run one scenario unless `only` names others; a failure is recorded (the report shows it), the run goes on."""
        if self.only and name not in self.only:
            return
        print(f"[bench] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            self.results[name] = body()
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.results[name] = {"error": self.errors[name]}
            traceback.print_exc()
        print(f"[bench] {name} done in {time.perf_counter() - started:.1f} s", flush=True)

    # ----- targets (paths) ---------------------------------------------------------------------------------------

    def overhead_targets(self, body: str) -> list[Target]:
        """direct, floor (nginx as Debian ships it), floor_keepalive (tuned nginx), llm, full, against the static
        answer (llm must point at nginx)."""
        stack = self.stack
        assert stack.credentials is not None
        return [
            Target("direct", f"{stack.url('static')}/v1/chat/completions", {}, body),
            Target("floor", f"{stack.url('floor')}/v1/chat/completions", {}, body),
            Target("floor_keepalive", f"{stack.url('floor_keepalive')}/v1/chat/completions", {}, body),
            Target(
                "llm",
                f"{stack.url('llm')}/v1/chat/completions",
                {"Authorization": f"Bearer {stack.access_token()}"},
                body,
            ),
            self.full_target(body),
        ]

    def full_target(self, body: str) -> Target:
        """client → gateway → llm with the benchmark user's API key (authentication, limits, ledger as in prod)."""
        assert self.stack.credentials is not None
        return Target(
            "full",
            f"{self.stack.url('gateway')}/v1/chat/completions",
            {"Authorization": f"Bearer {self.stack.credentials.api_key}"},
            body,
        )

    def provider_targets(self, body: str) -> list[Target]:
        """direct (the fake provider) and full, for streams and slow upstreams (llm must point at the fake)."""
        stack = self.stack
        return [
            Target(
                "direct",
                f"{stack.url('fakeprovider')}/v1/chat/completions",
                {"Authorization": f"Bearer {stack.provider_key}"},
                body,
            ),
            self.full_target(body),
        ]

    def platform_groups(self) -> dict[str, int]:
        """The platform's processes (the fake provider and nginx stand outside it)."""
        return {name: pgid for name, pgid in self.stack.process_groups().items() if name != "fakeprovider"}

    # ----- scenarios -------------------------------------------------------------------------------------------

    def all(self) -> None:
        """Every scenario, in an order that needs one llm restart (static answer first, then the fake provider)."""
        sizes = self.sizes
        body = chat_body("Say hello to the benchmark")
        targets = self.overhead_targets(body)
        warm_up(targets)
        self.scenario("rss_idle", lambda: measure.group_memory(self.platform_groups()))
        self.scenario(
            "latency",
            lambda: measure.paired_latency(
                self.overhead_targets(body),
                rounds=sizes.latency_rounds,
                per_round=sizes.latency_per_round,
                warmup=sizes.latency_warmup,
            ),
        )
        self.scenario("throughput", lambda: self.throughput(self.overhead_targets(body)))
        self.scenario("throughput_paired", lambda: self.throughput_paired(self.overhead_targets(body)))
        self.scenario("profile", lambda: self.profile(self.overhead_targets(body)[-1]))
        self.scenario("metrics_scrape", self.metrics_scrape)
        self.scenario("batch", lambda: self.batch(json.loads(body)))

        if self.only and not self.only & {"slow_upstream", "streams"}:
            return
        self.stack.point_llm_at("fakeprovider")
        slow = chat_body(f"A slow upstream #fake:latency_ms={sizes.slow_latency_ms}")
        warm_up(self.provider_targets(chat_body("warm up")))
        self.scenario("slow_upstream", lambda: self.slow_upstream(self.provider_targets(slow)))
        self.scenario("streams", self.streams)

    def throughput(self, targets: list[Target]) -> dict[str, Any]:
        """wrk at 32 connections on every path, with the CPU each process spent per request; the platform's RSS sampled
        in the middle of the full-path run."""
        sizes = self.sizes
        results: dict[str, Any] = {}
        for target in targets:
            if sizes.wrk_warmup:
                measure.run_wrk(target, connections=sizes.wrk_connections, duration=sizes.wrk_warmup)
            cpu_before = measure.cpu_seconds(self.platform_groups())
            if target.name == "full":
                result, memory = during(
                    lambda t=target: measure.run_wrk(t, connections=sizes.wrk_connections, duration=sizes.wrk_duration),
                    lambda: measure.group_memory(self.platform_groups()),
                    at=sizes.wrk_duration * 0.6,
                )
                self.results["rss_load"] = memory
            else:
                result = measure.run_wrk(target, connections=sizes.wrk_connections, duration=sizes.wrk_duration)
            # Where each request's CPU goes (the 2 cores are the budget every process shares).
            result["cpu_us_per_request"] = measure.cpu_per_request(
                cpu_before, measure.cpu_seconds(self.platform_groups()), result.get("requests")
            )
            results[target.name] = result
        return results

    def throughput_paired(self, targets: list[Target]) -> dict[str, Any]:
        """The nginx floor and the full path back to back in rounds (see `measure.paired_throughput`)."""
        by_name = {target.name: target for target in targets}
        return measure.paired_throughput(
            by_name["floor"],
            by_name["full"],
            rounds=self.sizes.paired_rounds,
            connections=self.sizes.wrk_connections,
            duration=self.sizes.paired_duration,
        )

    def profile(self, full: Target) -> dict[str, Any]:
        """py-spy on one gateway worker and one llm worker while wrk loads the full path."""
        sizes = self.sizes
        profiler = measure.Profiler(self.out_dir, sizes.profile_duration)
        if not profiler.available:
            raise RuntimeError("py-spy is not installed (PyPI py-spy, in the dev dependency group)")
        for label, service, svg in (("gateway", "gateway", "flame.svg"), ("llm", "llm", "flame-llm.svg")):
            workers = self.stack.worker_pids(service)
            if workers:
                profiler.start(label, workers[0], self.out_dir / svg)
        load = measure.run_wrk(full, connections=sizes.wrk_connections, duration=sizes.profile_duration + 1)
        recorded = profiler.finish()
        for entry in recorded.values():
            if entry.get("stacks"):
                entry["hot"] = measure.hot_frames(self.out_dir / entry["stacks"])
        return {"duration_s": sizes.profile_duration, "load_requests_per_s": load["requests_per_s"], **recorded}

    def metrics_scrape(self) -> dict[str, Any]:
        """Scrape time of every service's `/metrics` after the load above left samples behind."""
        return {
            name: measure.scrape_times(f"{self.stack.url(name)}/metrics", self.sizes.scrapes)
            for name in ("gateway", "auth", "llm", "jobs")
        }

    def batch(self, body: dict[str, Any]) -> dict[str, Any]:
        """Batch items/s end to end through the gateway, and the raw pika loop on the same broker."""
        stack, sizes = self.stack, self.sizes
        assert stack.credentials is not None
        cpu_before = measure.cpu_seconds(self.platform_groups())
        platform = measure.batch_end_to_end(
            stack.url("gateway"),
            stack.credentials.api_key,
            items=sizes.batch_items,
            body=body,
            timeout=sizes.batch_timeout,
        )
        # CPU per item by process: what each hop of an item costs, against the 2 cores' budget.
        platform["cpu_us_per_item"] = measure.cpu_per_request(
            cpu_before, measure.cpu_seconds(self.platform_groups()), platform.get("completed")
        )
        raw = measure.raw_pika_loop(
            stack.backing.amqp_url,
            f"{stack.amqp_prefix}.bench.raw",
            messages=sizes.pika_messages,
            prefetch=8,
            timeout=sizes.batch_timeout,
        )
        return {"platform": platform, "raw_pika": raw}

    def slow_upstream(self, targets: list[Target]) -> dict[str, Any]:
        """A slow upstream with `slow_in_flight_per_worker`x more requests in flight than the path's workers."""
        sizes = self.sizes
        workers = self.stack.config.workers  # type: ignore[union-attr]
        in_flight = sizes.slow_in_flight_per_worker * (workers["gateway"] + workers["llm"])
        results: dict[str, Any] = {"upstream_latency_ms": sizes.slow_latency_ms, "in_flight": in_flight}
        max_requests = in_flight * (int(sizes.slow_duration * 1000 / sizes.slow_latency_ms) + 2)
        for target in targets:
            results[target.name] = measure.closed_loop(
                target, concurrency=in_flight, duration=sizes.slow_duration, max_requests=max_requests
            )
        return results

    def streams(self) -> dict[str, Any]:
        """Added TTFT / inter-chunk one stream at a time, then concurrent streams stepped up until one fails."""
        sizes = self.sizes
        paced = f"#fake:tokens={sizes.ttft_tokens} #fake:chunk_delay_ms={sizes.ttft_chunk_delay_ms}"
        options = {"stream": True, "stream_options": {"include_usage": True}}
        paired = measure.paired_streams(
            self.provider_targets(chat_body(f"Stream to me {paced}", **options)),
            rounds=sizes.ttft_rounds,
            per_round=sizes.ttft_per_round,
        )
        held = self.held_streams(options)
        long = f"#fake:tokens={sizes.stream_tokens} #fake:chunk_delay_ms={sizes.stream_chunk_delay_ms}"
        direct, full = self.provider_targets(chat_body(f"Hold this stream {long}", **options))
        stream_seconds = sizes.stream_tokens * sizes.stream_chunk_delay_ms / 1000
        timeout = stream_seconds * 4 + 30
        levels: list[dict[str, Any]] = []
        burst_held = 0
        for level in sizes.stream_levels:
            reference = measure.streams(direct, concurrency=level, ramp=sizes.stream_ramp, timeout=timeout)
            through, memory = during(
                lambda n=level: measure.streams(full, concurrency=n, ramp=sizes.stream_ramp, timeout=timeout),
                lambda: measure.group_memory(self.platform_groups()),
                at=sizes.stream_ramp + stream_seconds / 2,
            )
            levels.append(
                {
                    "concurrency": level,
                    "direct": reference,
                    "full": through,
                    "added_ttft_p99_ms": added_ttft_p99(reference, through),
                    "rss_mb": memory["total_rss_mb"],
                }
            )
            self.results["rss_streams"] = memory | {"concurrency": level}
            if through["failed"]:
                break
            burst_held = level
        return {
            "paired": paired,
            "held_streams": held,
            "levels": levels,
            "burst_held": burst_held,
            "stream_seconds": stream_seconds,
            "target_level": STREAM_TARGET_LEVEL,
        }

    def held_streams(self, options: dict[str, Any]) -> dict[str, Any]:
        """`held_streams` streams arriving evenly over `held_ramp` s and all open together at its end, direct and
        through the gateway: the most open at once, and the added TTFT p99 over every one of them."""
        sizes = self.sizes
        paced = f"#fake:tokens={sizes.held_tokens} #fake:chunk_delay_ms={sizes.held_chunk_delay_ms}"
        direct, full = self.provider_targets(chat_body(f"Hold this stream {paced}", **options))
        stream_seconds = sizes.held_tokens * sizes.held_chunk_delay_ms / 1000
        timeout = stream_seconds * 2 + sizes.held_ramp + 30
        run = {"concurrency": sizes.held_streams, "ramp": sizes.held_ramp, "timeout": timeout}
        reference = measure.streams(direct, **run)
        through, memory = during(
            lambda: measure.streams(full, **run),
            lambda: measure.group_memory(self.platform_groups()),
            at=sizes.held_ramp + 1,
        )
        return {
            "streams": sizes.held_streams,
            "arrivals_per_s": round(sizes.held_streams / sizes.held_ramp, 1),
            "stream_seconds": stream_seconds,
            "direct": reference,
            "full": through,
            "added_ttft_p99_ms": added_ttft_p99(reference, through),
            "rss_mb": memory["total_rss_mb"],
        }


def added_ttft_p99(reference: dict[str, Any], through: dict[str, Any]) -> float | None:
    """What the full path adds to the direct path's TTFT p99 (None when either has no completed stream)."""
    if through["ttft"]["p99_ms"] is None or reference["ttft"]["p99_ms"] is None:
        return None
    return round(through["ttft"]["p99_ms"] - reference["ttft"]["p99_ms"], 3)


def during(work: Callable[[], Any], sample: Callable[[], Any], *, at: float) -> tuple[Any, Any]:
    """Run `work`, and `sample` once `at` seconds into it (e.g. RSS under load)."""
    box: dict[str, Any] = {}

    def sampler() -> None:
        time.sleep(at)  # a measuring point in time, not synchronisation: the work runs regardless
        with contextlib.suppress(Exception):
            box["sample"] = sample()

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    result = work()
    thread.join(at + 30)
    return result, box.get("sample") or sample()


def warm_up(targets: list[Target], attempts: int = 20) -> None:
    """Each path answers 200 (first connections, JWKS and key exchange, pools); fail with the body if not."""
    for target in targets:
        answer = None
        for _ in range(attempts):
            answer = requests.post(
                target.url,
                data=target.body,
                headers={**target.headers, "Content-Type": "application/json"},
                timeout=30,
            )
            if answer.status_code == 200:
                break
            time.sleep(0.25)  # a restarted upstream's pooled connections go stale once: retry, bounded
        assert answer is not None
        if answer.status_code != 200:
            raise RuntimeError(f"{target.name} path answered {answer.status_code}: {answer.text[:300]}")


# ----- the machine and the versions -----------------------------------------------------------------------------

PACKAGES = (
    "parley-kit",
    "parley-gateway",
    "parley-llm",
    "parley-auth",
    "parley-jobs",
    "parley-fakeprovider",
    "flask",
    "flask-openapi3",
    "gunicorn",
    "gevent",
    "sqlalchemy",
    "psycopg",
    "pika",
    "pyjwt",
    "openai",
    "anthropic",
    "prometheus-client",
    "urllib3",
    "orjson",
    "py-spy",
    "matplotlib",
)


def machine() -> dict[str, Any]:
    """CPU, memory, kernel and Python of this machine."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        host.processor(),
    )
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(int(memory) / 1024 / 1024, 1),
        "kernel": host.release(),
        "python": sys.version.split()[0],
        "load_average_at_start": list(os.getloadavg()),
    }


def versions(stack: Stack) -> dict[str, Any]:
    """The versions of everything on the measured paths."""
    found: dict[str, Any] = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    found["nginx"] = run_quiet(["nginx", "-v"]).removeprefix("nginx version: ")
    found["wrk"] = run_quiet(["wrk", "--version"]).split(" [")[0]
    with contextlib.suppress(Exception):
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(stack.backing.amqp_url))
        version = connection._impl.server_properties["version"]
        found["rabbitmq"] = version.decode() if isinstance(version, bytes) else str(version)
        connection.close()
    with contextlib.suppress(Exception):
        from sqlalchemy import create_engine, text

        engine = create_engine(stack.backing.postgres_url)
        with engine.connect() as connection:
            found["postgresql"] = connection.execute(text("SHOW server_version")).scalar()
        engine.dispose()
    with contextlib.suppress(Exception):
        import redis

        found["redis"] = redis.Redis.from_url(stack.backing.redis_url).info("server")["redis_version"]
    return found


def worker_settings(stack: Stack) -> dict[str, Any]:
    """Configured workers per service and what each gunicorn master was really started with (its argv)."""
    assert stack.config is not None
    served: dict[str, Any] = {}
    for name, pid in stack.process_groups().items():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            flags = {}
            for flag in ("--workers", "--worker-class", "--threads", "--worker-connections", "-k", "-w"):
                if flag in argv:
                    flags[flag.lstrip("-")] = argv[argv.index(flag) + 1]
            served[name] = flags | {"worker_processes": len(stack.worker_pids(name))}
    return {
        "configured": dict(stack.config.workers),
        "served": served,
        "nginx_worker_processes": "auto (one per core)",
        "environment": stack.config.environment,
        "extra_env": {name: sorted(env) for name, env in stack.extra_env.items()},
    }


# ----- entry point ---------------------------------------------------------------------------------------------


def preflight(backing: Backing) -> list[str]:
    """What is missing before anything starts, as messages a developer can act on."""
    import shutil

    import pika
    import redis
    from sqlalchemy import create_engine, text

    problems = [
        f"{tool} is not installed ({hint})"
        for tool, hint in (("nginx", "Debian: apt-get install nginx"), ("wrk", "Debian: apt-get install wrk"))
        if shutil.which(tool) is None
    ]
    try:
        engine = create_engine(backing.postgres_url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means not usable
        problems.append(f"PostgreSQL is not reachable at --postgres-url ({type(exc).__name__})")
    try:
        pika.BlockingConnection(pika.URLParameters(backing.amqp_url)).close()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"RabbitMQ is not reachable at --amqp-url ({type(exc).__name__})")
    try:
        redis.Redis.from_url(backing.redis_url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Redis is not reachable at --redis-url ({type(exc).__name__})")
    return problems


def parse_env(pairs: list[str]) -> dict[str, dict[str, str]]:
    """`--env gateway:GATEWAY_X=1` → {"gateway": {"GATEWAY_X": "1"}}."""
    extra: dict[str, dict[str, str]] = {}
    for pair in pairs:
        process, _, assignment = pair.partition(":")
        name, _, value = assignment.partition("=")
        if not process or not name:
            raise SystemExit(f"--env expects process:NAME=VALUE, got {pair!r}")
        extra.setdefault(process, {})[name] = value
    return extra


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, write the results; non-zero when a scenario failed."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every scenario with minimal sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("PARLEY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="an admin URL: the run creates and drops databases of its own",
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("PARLEY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument("--redis-url", default=os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="PROCESS:NAME=VALUE",
        help="extra environment for one platform process (e.g. raised rate limits)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="SCENARIO,...",
        help=f"run only these scenarios, into bench/results/tmp unless --out ({', '.join(SCENARIOS)})",
    )
    args = parser.parse_args(argv)
    only = frozenset(filter(None, args.only.split(",")))
    if only - set(SCENARIOS):
        parser.error(f"--only: unknown scenarios {sorted(only - set(SCENARIOS))}")
    sizes = SMOKE if args.smoke else Sizes()
    # a smoke or partial run never replaces the committed results of a full run
    out_dir: Path = (args.out or (RESULTS_DIR / "tmp" if args.smoke or only else RESULTS_DIR)).resolve()
    raise_open_files_limit()  # thousands of streams: every process started from here inherits the limit

    started = dt.datetime.now(dt.UTC)
    backing = Backing(args.postgres_url, args.amqp_url, args.redis_url)
    problems = preflight(backing)
    if problems:
        print("bench: cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stack below is always stopped and cleaned up
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as run_dir:
        stack = Stack(Path(run_dir), backing, extra_env=parse_env(args.env))
        header: dict[str, Any] = {"machine": machine()}
        print("[bench] starting nginx, the fake provider and the platform ...", flush=True)
        began = time.perf_counter()
        with stack:
            print(f"[bench] stack up in {time.perf_counter() - began:.1f} s", flush=True)
            header["versions"] = versions(stack)
            header["workers"] = worker_settings(stack)
            run = Run(stack, sizes, out_dir, only)
            try:
                run.all()
            except Exception as exc:  # noqa: BLE001 - keep what was measured before the failure
                run.errors["run"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            logs: dict[str, str] = {}
            if run.errors:
                stack.print_log_tails()
                logs = {name: process.tail(20) for name, process in stack.platform.processes.items()}  # type: ignore[union-attr]
    results = {
        "schema": 1,
        "mode": "smoke" if args.smoke else "full",
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        **header,
        "sizes": asdict(sizes),
        "scenarios": run.results,
        "errors": run.errors,
        "log_tails": logs,
    }
    results["targets"] = report.evaluate(results)
    report.write(results, out_dir)
    print(f"[bench] wrote {out_dir / 'latest.json'} and {out_dir / 'REPORT.md'}", flush=True)
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
