"""What the deploy checks share: where things are, the tools they need, PromQL metric names (also read by the live
test in tests/integration/test_observability.py, which loads this file by path)."""

from __future__ import annotations

import os
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
PENDING_METRICS_FILE = Path(__file__).with_name("pending_metrics.yaml")

# What PromQL words are not metric names: aggregations, functions (followed by "(") are removed separately.
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}
_METRIC_DEFINITION = re.compile(r"\b(Histogram|Counter|Gauge|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")


def need_tool(name: str, package: str) -> str:
    """The tool's path; skipped with a reason when missing, a failure under CI=true (a check that does not run is
    no check)."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (Debian package {package}: make system-deps)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may contain anything
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        word = match.group()
        if following.startswith("(") or word in _PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]?", word) or word in {"e", "Inf", "NaN", "inf", "nan"}:
            continue
        names.add(word)
    return names


@cache
def exported_metrics() -> frozenset[str]:
    """Every series name the services' code exports (histograms as _bucket/_count/_sum, counters with _total)."""
    names: set[str] = {"up"}
    sources = [*ROOT.glob("services/*/src/**/*.py"), *ROOT.glob("libs/*/src/**/*.py")]
    for source in sources:
        for kind, name in _METRIC_DEFINITION.findall(source.read_text()):
            if kind == "Histogram":
                names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
            elif kind == "Summary":
                names.update({f"{name}_count", f"{name}_sum"})
            elif kind == "Counter":
                names.add(f"{name.removesuffix('_total')}_total")
            else:
                names.add(name)
    return frozenset(names)


def base_metric(name: str) -> str:
    """A series name without the histogram suffix (as the pending list names metrics)."""
    return re.sub(r"_(bucket|count|sum)$", "", name)


@cache
def pending_metrics() -> dict[str, str]:
    """Metrics used before they exist, with who is adding them."""
    return yaml.safe_load(PENDING_METRICS_FILE.read_text()) or {}


@cache
def recording_rules() -> dict[str, str]:
    """Recorded series name -> its expression."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "recording.yml").read_text())
    return {rule["record"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


@cache
def alert_rules() -> dict[str, dict]:
    """Alert name -> its rule."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
