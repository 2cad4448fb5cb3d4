"""Kubernetes: the kustomize base and the dev/prod overlays render offline, validate against the Kubernetes schemas
(kubernetes-validate; KEDA's kinds against their required fields), and hold together: probes, resources, a
locked-down securityContext, Services, HPAs, the KEDA ScaledObject, PDBs, migration Jobs, ConfigMap/Secret refs.

`kubectl kustomize` is not something the project can install (no registry ships it), so overlays are rendered by
`render` below: a small renderer of exactly the kustomize features deploy/k8s uses (resources, namespace, images,
strategic-merge patches by kind and name) that refuses any other kustomization key. Where a kubectl is on PATH, its
output must equal ours, which keeps the renderer honest.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from opslib import DEPLOY, OPERATIONS_DOC, ROOT

K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
HTTP_SERVICES = {"gateway": 8080, "auth": 8081, "llm": 8082, "jobs": 8083}
KUBERNETES_VERSION = "1.30.0"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Lists strategic merge combines item by item (by this key) instead of replacing; everything else is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}

Doc = dict[str, Any]


# --- the renderer --------------------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[Doc]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(target: Any, patch: Any, *, builtin: bool) -> Any:
    """Merge `patch` into `target`: maps recursively, null deletes, keyed lists of built-in kinds item by item."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged and builtin and key in MERGE_KEYS and isinstance(value, list):
                merged[key] = merge_list(merged[key], value, MERGE_KEYS[key])
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, builtin=builtin)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    return copy.deepcopy(patch)


def merge_list(target: list[Doc], patch: list[Doc], key: str) -> list[Doc]:
    """Items with the same key merged, new items appended."""
    merged = [copy.deepcopy(item) for item in target]
    for item in patch:
        index = next((n for n, existing in enumerate(merged) if existing.get(key) == item.get(key)), None)
        if index is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[index] = strategic_merge(merged[index], item, builtin=True)
    return merged


def pod_specs(doc: Doc) -> list[Doc]:
    """The pod templates' specs of a workload."""
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    return []


def set_image(image: str, rules: list[Doc]) -> str:
    """Apply kustomize `images` rules to one image reference."""
    name, _, tag = image.partition(":")
    for rule in rules:
        if rule["name"] == name:
            return (
                f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
                if rule.get("newTag", tag)
                else rule.get("newName", name)
            )
    return image


def render(directory: Path) -> list[Doc]:
    """kustomize build of `directory`, limited to the features deploy/k8s uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: the offline renderer does not implement {unsupported}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else load_documents(path))
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only strategic-merge patch files are supported: {patch_entry}"
        for patch in load_documents(directory / patch_entry["path"]):
            matches = [
                d for d in docs if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            ]
            assert len(matches) == 1, f"patch {patch['kind']}/{patch['metadata']['name']} matches {len(matches)}"
            index = docs.index(matches[0])
            builtin = "." not in patch["apiVersion"].split("/")[0] or patch["apiVersion"].startswith(
                ("apps/", "batch/", "policy/", "autoscaling/")
            )
            docs[index] = strategic_merge(docs[index], patch, builtin=builtin)
    for doc in docs:
        if "namespace" in kustomization:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        for spec in pod_specs(doc):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                container["image"] = set_image(container["image"], kustomization.get("images", []))
    return docs


@cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    """An overlay's resources."""
    return tuple(render(K8S / "overlays" / overlay))


def identity(doc: Doc) -> tuple[str, str, str]:
    """kind, namespace, name."""
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def index(overlay: str) -> dict[tuple[str, str], Doc]:
    """(kind, name) -> resource."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered(overlay)}


def of_kind(overlay: str, kind: str) -> list[Doc]:
    """An overlay's resources of one kind."""
    return [doc for doc in rendered(overlay) if doc["kind"] == kind]


# --- rendering -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_unique_namespaced_resources(overlay: str) -> None:
    """Every resource once, in the overlay's namespace."""
    ids = [identity(doc) for doc in rendered(overlay)]
    assert len(set(ids)) == len(ids)
    namespace = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]
    assert {doc["metadata"]["namespace"] for doc in rendered(overlay)} == {namespace}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    """Where kubectl is installed, `kubectl kustomize` renders exactly what our renderer does."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (no package registry ships it): the offline renderer stands alone")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {identity(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}
    ours = {identity(doc): doc for doc in rendered(overlay)}
    assert set(theirs) == set(ours)
    for key, doc in ours.items():
        assert doc == theirs[key], f"{key} differs from kubectl kustomize"


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    """A kustomization using a feature the renderer lacks fails loudly instead of rendering something else."""
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(AssertionError, match="namePrefix"):
        render(tmp_path)


# --- schemas -------------------------------------------------------------------------------------------------------


@cache
def kubernetes_validate() -> Any:
    """The kubernetes_validate module (PyPI kubernetes-validate: the schemas ship inside it, no network)."""
    try:
        import kubernetes_validate as module
    except ImportError:
        message = "kubernetes-validate is not installed (add it to the dev dependency group)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return module


# KEDA's CRDs are not in the Kubernetes schemas: their required fields and types (keda.sh/v1alpha1, KEDA 2.x).
KEDA_SCHEMAS: dict[str, dict] = {
    "ScaledObject": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "apiVersion": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                        },
                    },
                },
            }
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {"type": "object", "required": ["parameter", "name", "key"]},
                    }
                },
            }
        },
    },
}


def validate(doc: Doc) -> None:
    """Raise if the resource does not match its schema."""
    if doc["apiVersion"].startswith("keda.sh/"):
        import jsonschema

        jsonschema.validate(doc, KEDA_SCHEMAS[doc["kind"]])
        return
    kubernetes_validate().validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_matches_its_schema(overlay: str) -> None:
    """Strict validation (unknown fields are errors) against Kubernetes 1.30's schemas."""
    for doc in rendered(overlay):
        try:
            validate(doc)
        except Exception as exc:  # noqa: BLE001 - report which resource and why
            pytest.fail(f"{identity(doc)}: {exc}")


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("Deployment", lambda d: d["spec"].__setitem__("replicas", "two")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("livenessprobe", {})),
        ("ScaledObject", lambda d: d["spec"].pop("triggers")),
    ],
)
def test_schema_validation_catches_a_broken_manifest(kind: str, mutate: Any) -> None:
    """A wrong type, a misspelt field, a missing required field: each is refused."""
    doc = copy.deepcopy(next(d for d in rendered("prod") if d["kind"] == kind))
    mutate(doc)
    with pytest.raises(Exception):  # noqa: B017 - each validator raises its own error type
        validate(doc)


# --- how the pieces fit --------------------------------------------------------------------------------------------


def containers(doc: Doc) -> list[Doc]:
    """A workload's containers."""
    return [c for spec in pod_specs(doc) for c in spec["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_locked_down_with_resources(overlay: str) -> None:
    """Non-root, RuntimeDefault seccomp, read-only root, no privilege escalation, all capabilities dropped, requests
    and limits, no service-account token; /tmp is an in-memory emptyDir (metrics directory)."""
    for doc in of_kind(overlay, "Deployment") + of_kind(overlay, "Job"):
        (spec,) = pod_specs(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert {
            "name": "tmp",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec["volumes"][0]["emptyDir"]["sizeLimit"]},
        } in spec["volumes"]
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"] and not security.get("privileged")
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_http_services_have_probes_a_service_an_hpa_and_a_pdb(overlay: str) -> None:
    """startup and liveness on /livez (process only), readiness on /readyz (dependencies), on the design port."""
    resources = index(overlay)
    for name, port in HTTP_SERVICES.items():
        deployment = resources[("Deployment", name)]
        (container,) = containers(deployment)
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        bind = {e["name"]: e.get("value") for e in container["env"]}[f"{name.upper()}_BIND"]
        assert bind == f"0.0.0.0:{port}"
        assert container["args"] == ["serve"]
        for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        service = resources[("Service", name)]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["port"] == port and service["spec"]["ports"][0]["targetPort"] == "http"
        hpa = resources[("HorizontalPodAutoscaler", name)]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_matching_pdb(overlay: str) -> None:
    """A PodDisruptionBudget selects each Deployment's pods (and never more than it allows to stay up)."""
    pdbs = of_kind(overlay, "PodDisruptionBudget")
    for deployment in of_kind(overlay, "Deployment"):
        if deployment["metadata"]["name"] == "fakeprovider":
            continue
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, deployment["metadata"]["name"]
        hpa = index(overlay).get(("HorizontalPodAutoscaler", deployment["metadata"]["name"]))
        min_available = matching[0]["spec"].get("minAvailable", 0)
        if hpa:
            assert min_available < hpa["spec"]["minReplicas"] or min_available == 0, "the PDB would block every drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_scale_on_queue_length_with_keda(overlay: str) -> None:
    """The worker Deployment runs `worker`, has no HPA, and a ScaledObject on the items queue's length."""
    resources = index(overlay)
    worker = resources[("Deployment", "jobs-worker")]
    (container,) = containers(worker)
    assert container["args"] == ["worker"]
    assert container["image"] == containers(resources[("Deployment", "jobs")])[0]["image"]
    assert ("HorizontalPodAutoscaler", "jobs-worker") not in resources
    scaled = resources[("ScaledObject", "jobs-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "jobs-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
    prefix = resources[("ConfigMap", "parley-config")]["data"]["PARLEY_AMQP_PREFIX"]
    assert trigger["metadata"]["queueName"] == f"{prefix}.jobs.items"
    auth = resources[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    assert auth["spec"]["secretTargetRef"][0]["name"] == "parley-secrets"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_jobs_run_each_services_migrate(overlay: str) -> None:
    """auth, llm and jobs each have a migrate Job with the service's image and database secret."""
    resources = index(overlay)
    for name in ("auth", "llm", "jobs"):
        job = resources[("Job", f"{name}-migrate")]
        (container,) = containers(job)
        (service_container,) = containers(resources[("Deployment", name)])
        assert container["args"] == ["migrate"] and container["image"] == service_container["image"]
        assert pod_specs(job)[0]["restartPolicy"] == "Never"
        database = f"{name.upper()}_DATABASE_URL"
        env = {e["name"]: e for e in container["env"]}
        assert env[database] == {e["name"]: e for e in service_container["env"]}[database]


def secret_keys_referenced(overlay: str) -> set[str]:
    """Every key of parley-secrets a workload or KEDA reads."""
    keys = set()
    for doc in rendered(overlay):
        for container in containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "parley-secrets"
                    keys.add(ref["key"])
        if doc["kind"] == "TriggerAuthentication":
            keys.update(ref["key"] for ref in doc["spec"]["secretTargetRef"])
    return keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_references_resolve(overlay: str) -> None:
    """configMapRefs name a rendered ConfigMap; the dev Secret has every key; prod ships no Secret and the docs list
    every key the cluster's Secret must have."""
    resources = index(overlay)
    for doc in rendered(overlay):
        for container in containers(doc):
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in resources
    keys = secret_keys_referenced(overlay)
    if overlay == "dev":
        assert keys <= set(resources[("Secret", "parley-secrets")]["stringData"])
    else:
        assert not of_kind(overlay, "Secret"), "production secrets never live in the repository"
        doc = OPERATIONS_DOC.read_text()
        missing = {key for key in keys if f"`{key}`" not in doc}
        assert not missing, f"docs/operations.md does not list secret keys {missing}"


def test_prod_uses_released_images_and_dev_the_fake_provider() -> None:
    """prod pins registry images by tag; dev points llm at the in-namespace fake provider."""
    for doc in of_kind("prod", "Deployment") + of_kind("prod", "Job"):
        for container in containers(doc):
            assert container["image"].startswith("registry.") and ":" in container["image"]
            assert not container["image"].endswith(":latest")
    config = index("dev")[("ConfigMap", "parley-config")]["data"]
    assert config["LLM_OPENAI_BASE_URL"].startswith("http://fakeprovider:8090")
    assert ("Service", "fakeprovider") in index("dev")
    assert index("prod")[("ConfigMap", "parley-config")]["data"]["PARLEY_ENV"] == "production"


def test_configmap_keys_are_settings_the_services_read() -> None:
    """Every ConfigMap key is an environment variable some service's settings declare (no dead configuration)."""
    from parley_kit.settings import ServiceSettings

    known = {field.alias for field in ServiceSettings.model_fields.values() if field.alias}
    for package, prefix in (
        ("parley_llm", "LLM_"),
        ("parley_auth", "AUTH_"),
        ("parley_jobs", "JOBS_"),
        ("parley_gateway", "GATEWAY_"),
    ):
        module = __import__(f"{package}.settings", fromlist=["settings"])
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, ServiceSettings) and value is not ServiceSettings:
                known |= {prefix + name.upper() for name, field in value.model_fields.items() if not field.alias}
    for overlay in OVERLAYS:
        data = index(overlay)[("ConfigMap", "parley-config")]["data"]
        assert set(data) <= known, f"{overlay}: unknown settings {set(data) - known}"
    assert ROOT.joinpath("deploy", "k8s", "base", "kustomization.yaml").is_file()
