"""The harness's arithmetic and parsing, without starting anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import measure, report

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.10ms    3.20ms  80.00ms   90.00%
    Req/Sec     1.30k   100.00     1.50k    70.00%
  Latency Distribution
     50%  850.00us
     75%   12.00ms
     90%   15.50ms
     99%    1.20s
  26000 requests in 10.00s, 9.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   2600.55
Transfer/sec:      0.90MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    parsed = measure.parse_wrk(WRK_OUTPUT)
    assert parsed["requests_per_s"] == 2600.55
    assert parsed["requests"] == 26000
    assert parsed["non_2xx"] == 7
    assert parsed["socket_errors"] == 6
    assert parsed["p50_ms"] == 0.85
    assert parsed["p90_ms"] == 15.5
    assert parsed["p99_ms"] == 1200.0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert measure.percentile(values, 50) == 50.0
    assert measure.percentile(values, 99) == 99.0
    assert measure.percentile(values, 100) == 100.0
    assert measure.percentile([3.0], 99) == 3.0
    assert measure.percentile([], 50) is None


def test_hot_frames_counts_self_and_inclusive_samples(tmp_path: Path) -> None:
    stacks = tmp_path / "flame.txt"
    stacks.write_text(
        "process 1:main;handle (gunicorn/workers/ggevent.py:10);forward (parley_gateway/proxy.py:5) 3\n"
        "process 1:main;handle (gunicorn/workers/ggevent.py:12);send (/x/site-packages/gevent/_socket.py:9) 1\n"
    )
    hot = measure.hot_frames(stacks)
    assert hot["samples"] == 4
    assert hot["self"][0] == {"frame": "forward (parley_gateway/proxy.py)", "samples": 3, "share": 0.75}
    assert hot["inclusive"][0]["frame"] == "handle (workers/ggevent.py)"
    assert hot["inclusive"][0]["share"] == 1.0
    assert {"frame": "send (gevent)", "samples": 1, "share": 0.25} in hot["self"]


def results_with(**scenarios: Any) -> dict[str, Any]:
    """A minimal results document around some scenario figures."""
    return {"machine": {"cores": 2}, "scenarios": scenarios}


def test_targets_met_and_missed_with_the_margin() -> None:
    results = results_with(
        latency={"paths": {"full": {"added_p50_ms": 0.5}, "floor": {"added_p50_ms": 0.05}}},
        throughput={"full": {"requests_per_s": 1000.0, "non_2xx": 0}, "floor": {"requests_per_s": 12000.0}},
        slow_upstream={"full": {"ok_per_s": 7.0}, "direct": {"ok_per_s": 8.0}},
        streams={
            "target_level": 2000,
            "held_streams": {
                "arrivals_per_s": 100.0,
                "full": {"peak_open": 2000, "failed": 0},
                "direct": {"ttft": {"p99_ms": 10.0}},
                "added_ttft_p99_ms": 20.0,
            },
        },
        batch={"platform": {"items_per_s": 600.0}, "raw_pika": {"messages_per_s": 1000.0}},
        rss_idle={"total_rss_mb": 400.0},
    )
    verdicts = {t["id"]: t for t in report.evaluate(results)}
    assert verdicts["full_added_p50"]["met"] is True
    assert verdicts["full_added_p50"]["ratio"] == 10.0
    assert verdicts["full_throughput"]["met"] is False
    assert verdicts["full_throughput"]["ratio"] == pytest.approx(0.0833, abs=1e-4)
    assert "320 req/s short" in verdicts["full_throughput"]["missed_by"]
    assert verdicts["slow_upstream"]["met"] is False
    assert verdicts["streams_held"]["met"] is True
    assert verdicts["batch"]["met"] is True
    assert verdicts["idle_rss"]["met"] is False
    assert verdicts["idle_rss"]["missed_by"] == "90 MB over"


def test_refused_requests_void_the_throughput_target() -> None:
    results = results_with(
        throughput={"full": {"requests_per_s": 9000.0, "non_2xx": 12}, "floor": {"requests_per_s": 12000.0}}
    )
    verdict = next(t for t in report.evaluate(results) if t["id"] == "full_throughput")
    assert verdict["met"] is False
    assert "12 non-2xx" in verdict["missed_by"]


def test_back_to_back_rounds_judge_the_throughput_target_by_their_median_share() -> None:
    """The one long run of each path is shown; the target's share is the median of the paired rounds, so a machine
    that sped up between the floor's run and the full path's does not decide it."""
    rounds = [
        {"reference_rps": 40000.0, "path_rps": 2000.0, "non_2xx": 0, "ratio": 0.05},
        {"reference_rps": 30000.0, "path_rps": 2400.0, "non_2xx": 0, "ratio": 0.08},
        {"reference_rps": 36000.0, "path_rps": 2160.0, "non_2xx": 0, "ratio": 0.06},
    ]
    results = results_with(
        throughput={"full": {"requests_per_s": 2000.0, "non_2xx": 0}, "floor": {"requests_per_s": 60000.0}},
        throughput_paired={
            "rounds": rounds,
            "duration_s": 5.0,
            "median_ratio": 0.06,
            "min_ratio": 0.05,
            "max_ratio": 0.08,
        },
    )
    verdict = next(t for t in report.evaluate(results) if t["id"] == "full_throughput")
    assert verdict["ratio"] == 0.06 and verdict["measured"] == 2160.0 and verdict["reference"] == 36000.0
    assert "median of 3 back-to-back rounds of 5 s (shares 5.0%-8.0%)" in verdict["reference_label"]
    assert verdict["met"] is False


def test_streams_count_as_held_only_when_all_are_open_at_once_and_none_failed() -> None:
    def verdict(peak: int, failed: int, added: float) -> dict[str, Any]:
        held = {"full": {"peak_open": peak, "failed": failed}, "direct": {}, "added_ttft_p99_ms": added}
        results = results_with(streams={"target_level": 2000, "held_streams": held})
        return next(t for t in report.evaluate(results) if t["id"] == "streams_held")

    assert verdict(2000, 0, 49.9)["met"] is True
    assert verdict(1999, 0, 10.0)["met"] is False
    assert "1999 of 2000" in verdict(1999, 0, 10.0)["missed_by"]
    assert verdict(2000, 1, 10.0)["met"] is False
    assert verdict(2000, 0, 50.0)["met"] is False


def test_peak_open_counts_overlapping_streams() -> None:
    assert measure.peak_open([]) == 0
    assert measure.peak_open([(0, 2), (1, 3), (2.5, 4)]) == 2
    assert measure.peak_open([(0, 1), (1, 2)]) == 1  # one closes as the next opens
    assert measure.peak_open([(0, 10)] + [(i, i + 0.5) for i in range(5)]) == 2


def test_missing_figures_are_not_measured_rather_than_met() -> None:
    verdicts = report.evaluate(results_with(latency={"error": "boom"}))
    assert {t["status"] for t in verdicts} == {"not measured"}
    assert all(t["met"] is None for t in verdicts)


def test_cpu_per_request_charges_each_group_its_share() -> None:
    """CPU readings of this very process (its own group) grow with work; the split per request adds up."""
    import os
    import time

    groups = {"this test": os.getpgrp()}
    before = measure.cpu_seconds(groups)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 200 ms of CPU
        pass
    after = measure.cpu_seconds(groups)
    assert sum(after["this test"].values()) - sum(before["this test"].values()) >= 0.15
    per = measure.cpu_per_request(before, after, requests=100)
    assert per["this test"] >= 1500  # ≥ 150 ms over 100 requests
    assert per["total"] >= per["this test"]
    assert measure.cpu_per_request(before, after, requests=0) == {}
