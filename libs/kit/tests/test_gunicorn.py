"""Metrics under a real gunicorn with two workers, started through the kit's `serve` command."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib3

from parley_kit.testing import ServiceProcess, free_port, python_module

TESTS_DIR = Path(__file__).resolve().parent
ROUTE = "/v1/items/<item_id>"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The sample service under gunicorn (2 sync workers); yields its base URL and metrics directory."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "stale.db").write_bytes(b"left by a previous run")  # `serve` must empty the directory
    process = ServiceProcess(
        "kitsample",
        python_module("kit_sample_app", "serve"),
        env={
            "PYTHONPATH": str(TESTS_DIR),
            "KITSAMPLE_BIND": f"127.0.0.1:{port}",
            "KITSAMPLE_WORKERS": "2",
            "KITSAMPLE_WORKER_CLASS": "sync",
            "KITSAMPLE_METRICS_DIR": str(metrics_dir),
            "KITSAMPLE_ITEM_DELAY_S": "0.05",
            "PARLEY_ENV": "test",
        },
        log_dir=tmp_path,
        ready_url=f"http://127.0.0.1:{port}/livez",
        cwd=tmp_path,
    )
    process.start()
    try:
        yield f"http://127.0.0.1:{port}", metrics_dir
    finally:
        process.stop()


def scrape_counts(text: str) -> dict[tuple[str, str], float]:
    """(route, status) → request count from one exposition text."""
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("http_server_request_duration_seconds_count{"):
            route = re.search(r'http_route="([^"]*)"', line)[1]  # type: ignore[index]
            status = re.search(r'http_response_status_code="([^"]*)"', line)[1]  # type: ignore[index]
            counts[(route, status)] = counts.get((route, status), 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_requests_over_both_workers_are_counted_in_one_scrape(served: tuple[str, Path]) -> None:
    base, metrics_dir = served
    assert not (metrics_dir / "stale.db").exists()
    # A fresh connection per request (no keep-alive) lets either worker accept it; the handler's short delay
    # keeps one sync worker busy, so concurrent requests must spread over both.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10), retries=False)

    def get(number: int) -> int:
        response = http.request("GET", f"{base}/v1/items/item-{number}", headers={"Connection": "close"})
        assert response.status == 200
        return response.json()["pid"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        pids = list(pool.map(get, range(60)))
    assert len(set(pids)) == 2, "the requests did not reach both workers"
    for number in range(3):
        assert http.request("GET", f"{base}/v1/nothing-{number}").status == 404

    text = http.request("GET", f"{base}/metrics").data.decode()
    counts = scrape_counts(text)
    assert counts[(ROUTE, "200")] == 60
    assert counts[("unmatched", "404")] == 3
    assert "item-1" not in text and "nothing-1" not in text  # the template, never the raw path
    assert {file.name.split("_")[0] for file in metrics_dir.glob("*.db")} >= {"histogram"}


def test_probes_under_gunicorn(served: tuple[str, Path]) -> None:
    base, _ = served
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10), retries=False)
    assert http.request("GET", f"{base}/livez").json() == {"status": "ok"}
    ready = http.request("GET", f"{base}/readyz")
    assert ready.status == 200 and ready.json()["status"] == "ok"
    failing = http.request("GET", f"{base}/v1/items/boom")
    assert failing.status == 500 and failing.headers["content-type"] == "application/problem+json"


def test_the_master_hooks_load_no_flask_and_mark_a_dead_workers_live_gauges(tmp_path: Path) -> None:
    """The hooks module is all a gunicorn master loads of ours: it must stay light (no Flask: ~9 MB per service).
    Its child_exit removes a dead worker's live-gauge file, so live gauges stop counting that worker."""
    import subprocess
    import sys

    probe = "import sys, parley_kit.gunicorn_hooks; print('flask' in sys.modules, 'sqlalchemy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == (
        "False False\n"
    )
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    (tmp_path / "gauge_livesum_4343.db").write_bytes(b"")
    script = "import types, parley_kit.gunicorn_hooks as hooks;hooks.child_exit(None, types.SimpleNamespace(pid=4242))"
    subprocess.run(
        [sys.executable, "-c", script], check=True, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gauge_livesum_4343.db"]


def test_a_started_worker_hides_its_start_up_from_the_collector_and_makes_full_collections_rare() -> None:
    """post_worker_init freezes what the app loaded (full collections then skip it) and raises the oldest generation's
    threshold: with thousands of streams held, each full collection paused the worker for 60-130 ms. It also makes
    the worker answer with `OneSendResponse` (its bytes: test_one_send_response.py)."""
    import subprocess
    import sys

    script = (
        "import gc, parley_kit.gunicorn_hooks as hooks; from gunicorn.http import wsgi; before = gc.get_threshold(); "
        "hooks.post_worker_init(None); "
        "print(before, gc.get_threshold(), gc.get_freeze_count() > 1000, wsgi.Response is hooks.OneSendResponse)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == "(700, 10, 10) (700, 10, 1000) True True\n"
