"""The Helm chart, rendered offline with Helm's own Go SDK (helm-python-sdk) and every manifest
validated against the Kubernetes OpenAPI schemas bundled in kubernetes-validate (strict: unknown
fields fail). The ServiceMonitor is a CRD those schemas lack: it is validated against the
prometheus-operator models generated from the CRD (cloudcoil), with unknown fields refused by a
round trip (the models drop what they do not know).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "musiq"
GPU_VALUES = CHART / "ci" / "gpu-hpa-servicemonitor-values.yaml"
INIT_VALUES = CHART / "ci" / "init-container-values.yaml"
KUBE_VERSION = "1.30.0"  # the oldest release we support that the bundled schemas cover


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(values or {}, name="prod", namespace="scoring", is_install=True)
    docs = [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text)]
    return [d for d in docs if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object per kind expected"
    return kinds


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        model = getattr(monitoring, doc["kind"]).model_validate(doc)
        assert model.model_dump(by_alias=True, exclude_none=True) == doc, "unknown fields in the CRD object"
        return
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("values_file", [None, GPU_VALUES, INIT_VALUES], ids=["default", "gpu-hpa", "init"])
def test_lint_is_clean(values_file: Path | None) -> None:
    report = helm.lint(CHART, load(values_file) if values_file else None, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values_file", [None, GPU_VALUES, INIT_VALUES], ids=["default", "gpu-hpa", "init"])
def test_every_rendered_manifest_validates_strictly(values_file: Path | None) -> None:
    docs = render(load(values_file) if values_file else None)
    assert docs
    for doc in docs:
        validate(doc)


def test_validation_is_strict() -> None:
    """The validators refuse what a typo would produce, for built-in kinds and for the CRD."""
    deployment = by_kind(render())["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = by_kind(render(load(GPU_VALUES)))["ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="unknown fields"):
        validate(monitor)
    monitor["spec"]["endpoints"][0].pop("intervall")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(ValueError):
        validate(monitor)


def test_default_render() -> None:
    kinds = by_kind(render())
    assert set(kinds) == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/musiq-service:0.1.0-cpu"
    assert container["startupProbe"]["grpc"] == {"port": 50051}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "MUSIQ_MODELS" not in env  # the embedded model
    assert env["MUSIQ_MAX_QUEUE_ITEMS"] == "512"
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert len(pod["topologySpreadConstraints"]) == 2
    ports = {p["name"]: p["appProtocol"] for p in kinds["Service"]["spec"]["ports"]}
    assert ports == {"http": "http", "grpc": "kubernetes.io/h2c"}
    labels = kinds["Deployment"]["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version"):
        assert key in labels
    assert labels["helm.sh/chart"] == "musiq-0.1.0"


def test_gpu_hpa_servicemonitor_render() -> None:
    kinds = by_kind(render(load(GPU_VALUES)))
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"} <= set(kinds)
    deployment = kinds["Deployment"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith(":0.1.0-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MUSIQ_MODELS"] == '["/models/koniq.onnx","/models/ava.onnx"]'
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "musiq-models"
    metrics = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "musiq_queue_wait_seconds_p95"
    assert kinds["ServiceMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_init_container_render() -> None:
    pod = by_kind(render(load(INIT_VALUES)))["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert "emptyDir" in pod["volumes"][1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"tag": "latest"}}, "not latest"),
        ({"models": {"source": "pvc"}}, "claimName is required"),
        ({"models": {"source": "s3"}}, "must be embedded, pvc or initContainer"),
    ],
)
def test_bad_values_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)
