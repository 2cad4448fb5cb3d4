"""Grafana: provisioning files, dashboards with fixed uids, and every panel query valid PromQL on known series."""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from opslib import (
    GRAFANA_DIR,
    ROOT,
    base_metric,
    exported_metrics,
    metric_names,
    need_tool,
    pending_metrics,
    recording_rules,
)

DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
DATASOURCE_UID = "parley-prometheus"
# What each dashboard must show (issue #7): series it must read.
REQUIRED = {
    "parley-overview": {
        "http_server_request_duration_seconds_count",
        "http_server_request_duration_seconds_bucket",
        "up",
    },
    "parley-llm": {
        "gen_ai_client_token_usage_sum",
        "parley_cost_usd_total",
        "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
        "gen_ai_client_operation_duration_seconds_count",
    },
    "parley-jobs": {"parley_jobs_queue_depth", "parley_jobs_items_processed_total", "parley_jobs_batches_total"},
    "parley-gateway": {
        "parley_gateway_overhead_seconds_bucket",
        "parley_ratelimit_decisions_total",
        "parley_gateway_auth_failures_total",
    },
}


@cache
def dashboards() -> dict[str, dict]:
    """uid -> dashboard JSON."""
    loaded = [json.loads(path.read_text()) for path in DASHBOARDS]
    return {d["uid"]: d for d in loaded}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expression) for every query of every panel."""
    return [
        (uid, panel["title"], target["expr"])
        for uid, dashboard in dashboards().items()
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def as_promql(expr: str) -> str:
    """A panel expression with Grafana's variables replaced by what they stand for at query time."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")


def test_datasource_is_the_compose_prometheus_with_a_fixed_uid() -> None:
    """One provisioned Prometheus datasource, the uid every panel names, at the compose service's address."""
    document = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert document["apiVersion"] == 1
    (source,) = document["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == DATASOURCE_UID
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert source["url"] == "http://prometheus:9090" and "9090" in compose["prometheus"]["expose"]


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    """The file provider's path is where compose mounts deploy/grafana/dashboards."""
    document = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "parley.yaml").read_text())
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_dashboards_have_fixed_unique_uids_and_titles() -> None:
    """The four dashboards, each with its fixed uid (links and bookmarks survive reprovisioning)."""
    assert len(dashboards()) == len(DASHBOARDS), "two dashboard files share a uid"
    assert set(dashboards()) == set(REQUIRED)
    titles = [d["title"] for d in dashboards().values()]
    assert len(set(titles)) == len(titles)
    for dashboard in dashboards().values():
        assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
        assert "parley" in dashboard["tags"]


@pytest.mark.parametrize("uid", sorted(REQUIRED))
def test_panels_are_well_formed(uid: str) -> None:
    """Unique panel ids, inside the 24-column grid without overlaps, each query on the provisioned datasource."""
    dashboard = dashboards()[uid]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & covered, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip(), panel["title"]


@pytest.mark.parametrize("uid", sorted(REQUIRED))
def test_dashboard_shows_what_the_issue_asks(uid: str) -> None:
    """Overview RED, LLM tokens/cost/TTFT/errors, jobs queue/throughput/batches, gateway overhead/limits/auth."""
    used = set().union(*(metric_names(expr) for d, _, expr in panel_queries() if d == uid))
    assert REQUIRED[uid] <= used, f"{uid} lacks {REQUIRED[uid] - used}"
    if uid == "parley-llm":
        labels = " ".join(expr for d, _, expr in panel_queries() if d == uid)
        assert 'error_type!=""' in labels and "gen_ai_provider_name" in labels and "gen_ai_request_model" in labels


def test_panel_queries_read_only_known_series() -> None:
    """Every series a panel reads is exported by a service, recorded by a rule, or pending (with who adds it)."""
    known = exported_metrics() | set(recording_rules()) | set(pending_metrics())
    for uid, title, expr in panel_queries():
        unknown = {m for m in metric_names(expr) if m not in known and base_metric(m) not in known}
        assert not unknown, f"{uid} / {title} reads series nobody exports: {unknown}"


def check_promql(promtool: str, expressions: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool's PromQL parser over expressions (written as recording rules, which is what `check rules` parses)."""
    rules = {
        "groups": [
            {"name": "panels", "rules": [{"record": f"panel:{n}", "expr": e} for n, e in enumerate(expressions)]}
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)


def test_panel_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query parses (Grafana variables substituted), and a broken one would be caught."""
    promtool = need_tool("promtool", "prometheus")
    queries = panel_queries()
    result = check_promql(promtool, [as_promql(expr) for _, _, expr in queries], tmp_path)
    if result.returncode != 0:
        failing = re.findall(r"panel:(\d+)", result.stdout + result.stderr)
        details = [queries[int(n)] for n in failing] or result.stdout + result.stderr
        pytest.fail(f"invalid PromQL: {details}")
    broken = check_promql(promtool, ["sum by (job (rate(up[1m]))"], tmp_path)
    assert broken.returncode != 0
