"""The compose `observability` profile: valid with `docker-compose config`, healthchecked, pinned, its bind mounts
present in the repository and consistent with the Prometheus/Grafana/Logstash/Kibana files they carry."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from opslib import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
EXAMPLE_ENV = ROOT / "deploy" / "compose.env.example"
PROFILE = {"elasticsearch", "logstash", "kibana", "kibana-setup", "prometheus", "grafana"}
ONE_SHOTS = {"kibana-setup"}


def compose_command() -> list[str]:
    """`docker compose` when it answers, else Debian's `docker-compose` (validates without an engine)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    if os.environ.get("CI") == "true":
        pytest.fail("docker-compose is not installed (make system-deps)")
    pytest.skip("docker-compose is not installed (make system-deps)")


def filled_env(tmp_path: Path) -> Path:
    """The example env file with every empty REQUIRED value filled, and the profile's log shipping on."""
    lines = []
    for line in EXAMPLE_ENV.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and value == "":
            value = "'{}'" if key == "AUTH_SERVICE_CLIENTS" else secrets.token_urlsafe(16)
        if key == "PARLEY_LOGSTASH_HOST":
            value = "logstash"
        lines.append(f"{key}{sep}{value}" if sep else line)
    path = tmp_path / "compose.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def services() -> dict[str, dict]:
    """The compose services as written."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def test_profile_config_is_valid(tmp_path: Path) -> None:
    """`config` with the profile renders every observability service, with logs pointed at Logstash."""
    env_file = filled_env(tmp_path)
    argv = [*compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    scrubbed = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run(
        [*argv, "--profile", "observability", "config"], capture_output=True, text=True, check=False, env=scrubbed
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert set(rendered) >= PROFILE
    assert rendered["gateway"]["environment"]["PARLEY_LOGSTASH_HOST"] == "logstash"


def test_profile_services_are_the_observability_stack() -> None:
    """Exactly Elasticsearch, Logstash, Kibana (+ its import one-shot), Prometheus and Grafana carry the profile."""
    profiled = {name for name, service in services().items() if "observability" in service.get("profiles", [])}
    assert profiled == PROFILE
    for name, service in services().items():
        assert service.get("profiles", ["observability"]) == ["observability"] or name not in PROFILE


@pytest.mark.parametrize("name", sorted(PROFILE))
def test_profile_service_is_pinned_checked_and_wired(name: str) -> None:
    """A pinned image, a healthcheck (one-shots excepted), depends_on with conditions, UIs on loopback only."""
    service = services()[name]
    image = service["image"]
    assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: unpinned image {image}"
    if name in ONE_SHOTS:
        assert service["restart"] == "no"
    else:
        check = service["healthcheck"]
        assert check["test"] and not check.get("disable")
        assert {"interval", "timeout", "retries"} <= set(check)
    for target, rule in service.get("depends_on", {}).items():
        assert target in services(), target
        assert rule["condition"] in {"service_healthy", "service_completed_successfully"}
        assert services()[target].get("healthcheck", {}).get("test"), f"{target} cannot be waited on"
    for mapping in service.get("ports", []):
        assert mapping.startswith("127.0.0.1:"), f"{name} publishes beyond the loopback interface: {mapping}"


@pytest.mark.parametrize("name", sorted(PROFILE))
def test_bind_mounts_exist(name: str) -> None:
    """Every ./deploy/... file or folder a profile service mounts is in the repository; named volumes declared."""
    declared = set(yaml.safe_load(COMPOSE_FILE.read_text())["volumes"])
    for mount in services()[name].get("volumes", []):
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            assert mount.endswith(":ro"), f"{name} should mount its configuration read-only"
        else:
            assert source in declared, f"{name} uses undeclared volume {source}"


def test_prometheus_mounts_what_its_config_loads() -> None:
    """The config and the rules folder land where prometheus.yml's relative rule_files look."""
    prometheus = services()["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]


def test_logstash_mounts_its_pipeline_and_settings() -> None:
    """The pipeline folder and logstash.yml, whose path.config is that folder."""
    logstash = services()["logstash"]
    assert "./deploy/logstash/pipeline:/usr/share/logstash/pipeline:ro" in logstash["volumes"]
    settings = yaml.safe_load((ROOT / "deploy" / "logstash" / "config" / "logstash.yml").read_text())
    assert settings["path.config"] == "/usr/share/logstash/pipeline"
    assert any(m.endswith(":/usr/share/logstash/config/logstash.yml:ro") for m in logstash["volumes"])


def test_grafana_has_no_secret_and_no_admin() -> None:
    """Anonymous read-only viewers and no initial admin: nothing to leak, nothing to default to admin/admin."""
    env = services()["grafana"]["environment"]
    assert env["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy" / "grafana" / "dashboards" / Path(home).name).is_file()
    assert json.loads((ROOT / "deploy" / "grafana" / "dashboards" / Path(home).name).read_text())["uid"]


def test_example_env_documents_the_profile() -> None:
    """Every variable the profile reads is in the example env file with a default value."""
    text = COMPOSE_FILE.read_text()
    section = text[text.index("# --- observability profile") : text.index("\nvolumes:\n")]
    used = set(re.findall(r"\$\{(\w+):-", section))
    assert used, "the profile reads no variables?"
    example = dict(
        line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines() if line and not line.startswith("#")
    )
    for name in used:
        assert example.get(name), f"{name} is missing or empty in deploy/compose.env.example"
