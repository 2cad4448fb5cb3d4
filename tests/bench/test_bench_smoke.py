"""The benchmark harness end to end in smoke mode (`python -m bench --smoke`): every scenario runs with minimal
sizes against the real platform, and the outputs are produced and well formed. No timing assertions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.run import SCENARIOS
from parley_kit.testing import PostgresServer

# Seconds on a quiet machine; minutes when other test runs share the two cores (the platform's start-up dominates).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
RUN_TIMEOUT = 600

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = ("full_added_p50", "full_throughput", "slow_upstream", "streams_held", "batch", "idle_rss")


@pytest.fixture(scope="module")
def smoke(
    postgres: PostgresServer, amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """One smoke run into a temporary folder (never over the committed bench/results)."""
    out = tmp_path_factory.mktemp("bench")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--postgres-url", postgres.admin_url,
         "--amqp-url", amqp_url, "--redis-url", redis_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the harness stop the platform, nginx and the fake provider it started
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"bench --smoke ran over {RUN_TIMEOUT} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    assert process.returncode == 0, f"bench --smoke failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    return out, json.loads((out / "latest.json").read_text())


def test_every_scenario_ran_without_errors(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke
    assert results["mode"] == "smoke"
    assert results["errors"] == {}
    for name in SCENARIOS:
        assert name in results["scenarios"], name
        assert "error" not in results["scenarios"][name], results["scenarios"][name]


def test_the_header_names_machine_versions_and_workers(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke
    assert isinstance(results["machine"]["cores"], int) and results["machine"]["cores"] >= 1
    for tool in ("nginx", "wrk", "gunicorn", "parley-gateway", "postgresql", "rabbitmq", "redis"):
        assert results["versions"].get(tool), tool
    assert results["workers"]["configured"] == {"gateway": 1, "auth": 1, "llm": 1, "jobs": 1}
    assert results["workers"]["environment"] == "production"
    assert results["workers"]["served"]["gateway"]["worker_processes"] == 1


def test_every_path_answered(smoke: tuple[Path, dict[str, Any]]) -> None:
    s = smoke[1]["scenarios"]
    for path in ("direct", "floor", "llm", "full"):
        assert s["latency"]["paths"][path]["failures"] == 0, path
        assert s["latency"]["paths"][path]["p50_ms"] is not None, path
        assert s["throughput"][path]["requests"] > 0, path
        assert s["throughput"][path]["socket_errors"] == 0, path
    for path in ("floor", "llm", "full"):
        assert isinstance(s["latency"]["paths"][path]["added_p50_ms"], float), path
    paired = s["throughput_paired"]
    assert len(paired["rounds"]) == 2 and all(r["ratio"] > 0 for r in paired["rounds"])
    assert paired["min_ratio"] <= paired["median_ratio"] <= paired["max_ratio"]
    # The full path's CPU is charged to both hops (and the llm path's to llm, not the gateway it skips).
    assert {"gateway", "llm"} <= set(s["throughput"]["full"]["cpu_us_per_request"])
    assert "llm" in s["throughput"]["llm"]["cpu_us_per_request"]
    for path in ("direct", "full"):
        assert s["slow_upstream"][path]["ok"] > 0 and s["slow_upstream"][path]["errors"] == 0, path
        assert s["streams"]["paired"]["paths"][path]["failures"] == 0, path


def test_streams_batch_memory_and_scrapes_are_recorded(smoke: tuple[Path, dict[str, Any]]) -> None:
    s = smoke[1]["scenarios"]
    levels = s["streams"]["levels"]
    assert [level["concurrency"] for level in levels] == smoke[1]["sizes"]["stream_levels"]
    assert all(level["full"]["failed"] == 0 and level["direct"]["failed"] == 0 for level in levels)
    assert s["streams"]["burst_held"] == levels[-1]["concurrency"]
    held = s["streams"]["held_streams"]
    for path in ("direct", "full"):  # the ramp is shorter than a stream: every one is open at the ramp's end
        assert held[path]["failed"] == 0, path
        assert held[path]["peak_open"] == smoke[1]["sizes"]["held_streams"], path
    assert s["batch"]["platform"]["status"] == "completed"
    assert s["batch"]["platform"]["completed"] == s["batch"]["platform"]["items"]
    # By process; one with less than a clock tick over a handful of items (llm runs them as one group) is left out.
    cpu = s["batch"]["platform"]["cpu_us_per_item"]
    assert cpu["total"] > 0 and set(cpu) <= {
        *s["rss_idle"]["per_service"],
        "postgres",
        "rabbitmq",
        "redis",
        "nginx (upstream)",
        "total",
    }
    assert s["batch"]["raw_pika"]["consumed"] == s["batch"]["raw_pika"]["messages"]
    for phase in ("rss_idle", "rss_load", "rss_streams"):
        assert set(s[phase]["per_service"]) == {"gateway", "auth", "llm", "jobs", "jobs-worker"}, phase
        assert s[phase]["total_rss_mb"] > 0, phase
    for service in ("gateway", "auth", "llm", "jobs"):
        assert s["metrics_scrape"][service]["failures"] == 0, service
        assert s["metrics_scrape"][service]["bytes"] > 0, service


def test_every_target_has_a_verdict(smoke: tuple[Path, dict[str, Any]]) -> None:
    targets = {t["id"]: t for t in smoke[1]["targets"]}
    assert set(targets) == set(TARGETS)
    for key, target in targets.items():
        assert target["status"] in ("met", "missed"), key
        assert isinstance(target["measured"], int | float), key
        assert target["met"] is (target["status"] == "met"), key
        if target["status"] == "missed":
            assert target["missed_by"], key


def test_report_plots_and_flame_graph_are_written(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, results = smoke
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# Parley benchmark (smoke run)")
    for target in results["targets"]:
        assert target["target"] in report
    for name in ("latency.png", "throughput.png", "streams.png", "rss.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
        assert f"]({name})" in report, name
    profile = results["scenarios"]["profile"]
    assert profile["gateway"]["flamegraph"] == "flame.svg", profile["gateway"]
    assert "<svg" in (out / "flame.svg").read_text()
    assert profile["gateway"]["hot"]["samples"] > 0
