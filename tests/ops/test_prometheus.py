"""Prometheus: the scrape config and rules pass promtool, every alert has unit tests that bite, and every metric a
rule reads is exported by a service or explicitly pending."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from opslib import (
    OPERATIONS_DOC,
    PROMETHEUS_DIR,
    ROOT,
    alert_rules,
    base_metric,
    exported_metrics,
    metric_names,
    need_tool,
    pending_metrics,
    recording_rules,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
UNIT_TESTS = PROMETHEUS_DIR / "tests" / "alerts_test.yml"
SCRAPED = {"gateway": 8080, "auth": 8081, "llm": 8082, "jobs": 8083}


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's prometheus package."""
    return need_tool("promtool", "prometheus")


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output."""
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, cwd=cwd)


def test_promtool_check_config_loads_the_rules(promtool: str) -> None:
    """The config is valid and its rule_files (relative to it, as in the container) find both rule files."""
    result = run(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    """Every rule file parses and every expression is valid PromQL."""
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules`: each alert fires on the series it is written for, and only then."""
    result = run(promtool, "test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def unit_test_cases() -> list[dict]:
    """Every alert_rule_test entry of the unit test file."""
    document = yaml.safe_load(UNIT_TESTS.read_text())
    return [case for group in document["tests"] for case in group["alert_rule_test"]]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Each alert is unit-tested both ways: it fires on a bad series, stays quiet before `for:` elapses or when
    healthy."""
    firing = {case["alertname"] for case in unit_test_cases() if case["exp_alerts"]}
    quiet = {case["alertname"] for case in unit_test_cases() if not case["exp_alerts"]}
    assert firing == set(alert_rules()), f"untested alerts: {set(alert_rules()) - firing}"
    assert quiet == set(alert_rules()), f"alerts without a quiet case: {set(alert_rules()) - quiet}"


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_unit_tests_catch_a_broken_alert(alert: str, promtool: str, tmp_path: Path) -> None:
    """With the alert's expression turned into one that never fires, `promtool test rules` fails: the tests bite."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for rule_file in RULE_FILES:
        document = yaml.safe_load(rule_file.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["expr"] = f"({rule['expr']}) and on() vector(0) > 1"
        (tmp_path / "rules" / rule_file.name).write_text(yaml.safe_dump(document))
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / UNIT_TESTS.name)
    result = run(promtool, "test", "rules", str(tmp_path / "tests" / UNIT_TESTS.name))
    assert result.returncode != 0, f"breaking {alert} went unnoticed"
    assert f"alertname: {alert}" in result.stdout + result.stderr


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_summary_and_a_runbook_entry() -> None:
    """Alerts route by severity (page|ticket) and link to their runbook entry, which exists in docs/operations.md."""
    headings = re.findall(r"^#{2,4} (.+)$", OPERATIONS_DOC.read_text(), re.MULTILINE)
    anchors = {github_anchor(h) for h in headings}
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
        assert rule.get("for"), f"{name} fires on a single evaluation"
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert (ROOT / page) == OPERATIONS_DOC and anchor == name.lower(), name
        assert anchor in anchors, f"docs/operations.md has no runbook heading for {name}"


def test_the_issue_alerts_are_all_there() -> None:
    """Error rate, latency SLO burn, open circuit, budget, queue backlog and age, dead letters, outbox lag, down."""
    metrics_by_alert = {name: metric_names(rule["expr"]) for name, rule in alert_rules().items()}
    used = set().union(*metrics_by_alert.values())
    for needed in (
        "job:http_server_error_ratio:rate5m",
        "job:http_server_slow_ratio:rate1h",
        "parley_circuit_open",
        "parley_budget_remaining_usd",
        "parley_jobs_queue_depth",
        "parley_jobs_oldest_pending_age_seconds",
        "parley_jobs_outbox_lag_seconds",
        "up",
    ):
        assert needed in used, needed
    dead = [rule for rule in alert_rules().values() if 'queue="dead"' in rule["expr"]]
    assert dead, "no alert on the dead-letter queue"


def test_rules_read_only_known_series() -> None:
    """Every series a rule reads is exported by a service, recorded by a rule, or listed as pending."""
    known = exported_metrics() | set(recording_rules()) | set(pending_metrics())
    rules = {**recording_rules(), **{name: rule["expr"] for name, rule in alert_rules().items()}}
    for name, expr in rules.items():
        unknown = {m for m in metric_names(expr) if m not in known and base_metric(m) not in known}
        assert not unknown, f"{name} reads series nobody exports: {unknown}"


def test_pending_metrics_are_still_pending() -> None:
    """A pending metric that a service now exports must leave the pending list (so the live test checks it)."""
    arrived = {
        name for name in pending_metrics() if name in exported_metrics() or f"{name}_count" in exported_metrics()
    }
    assert not arrived, f"now exported, remove from tests/ops/pending_metrics.yaml and docs/operations.md: {arrived}"


def test_operations_doc_marks_pending_metrics() -> None:
    """docs/operations.md names each pending metric on a line that says so."""
    text = OPERATIONS_DOC.read_text()
    for name in pending_metrics():
        lines = [line for line in text.splitlines() if f"`{name}" in line]
        assert any("pending" in line.lower() for line in lines), f"{name} not marked pending in docs/operations.md"


def test_scrape_config_covers_every_service_and_the_worker() -> None:
    """One job per service on its design port (compose names), and the workers found by DNS."""
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    design = (ROOT / "docs" / "design.md").read_text()
    for name, port in SCRAPED.items():
        assert re.search(rf"parley_{name}\s+port {port}\b", design), f"design.md no longer gives {name} port {port}"
        (static,) = jobs[name]["static_configs"]
        assert static["targets"] == [f"{name}:{port}"]
    assert jobs["jobs-worker"]["dns_sd_configs"][0]["names"] == ["jobs-worker"]
    assert config["rule_files"] == ["rules/*.yml"]
