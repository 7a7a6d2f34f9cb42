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
USER_GPU_VALUES = CHART / "values-gpu.yaml"  # what the README tells GPU users to install with
KUBE_VERSION = "1.30.0"  # the oldest release we support that the bundled schemas cover


HEADLESS = "prod-musiq-grpc-headless"  # the gRPC headless Service of release "prod"


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    return helm.Chart.load(CHART).render(values or {}, name="prod", namespace="scoring", is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = render_files(values)
    docs = [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text)]
    return [d for d in docs if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One object per kind; the headless gRPC Service, a second Service, is left out (`headless`)."""
    docs = [d for d in docs if d["metadata"]["name"] != HEADLESS]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object per kind expected"
    return kinds


def headless(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == HEADLESS]
    assert len(found) <= 1
    return found[0] if found else None


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        model = getattr(monitoring, doc["kind"]).model_validate(doc)
        assert model.model_dump(by_alias=True, exclude_none=True) == doc, "unknown fields in the CRD object"
        return
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    "values_file",
    [None, GPU_VALUES, INIT_VALUES, USER_GPU_VALUES],
    ids=["default", "gpu-hpa", "init", "values-gpu"],
)
def test_lint_is_clean(values_file: Path | None) -> None:
    report = helm.lint(CHART, load(values_file) if values_file else None, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "values_file",
    [None, GPU_VALUES, INIT_VALUES, USER_GPU_VALUES],
    ids=["default", "gpu-hpa", "init", "values-gpu"],
)
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
    from service.settings import ServiceSettings

    # decode worker processes: the chart states the service's own default
    default = ServiceSettings.model_fields["decode_processes"].default
    assert env["MUSIQ_DECODE_PROCESSES"] == str(default) == "2"
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert len(pod["topologySpreadConstraints"]) == 2
    ports = {p["name"]: p["appProtocol"] for p in kinds["Service"]["spec"]["ports"]}
    assert ports == {"http": "http", "grpc": "kubernetes.io/h2c"}
    labels = kinds["Deployment"]["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version"):
        assert key in labels
    assert labels["helm.sh/chart"] == "musiq-0.1.0"


def test_grpc_headless_service_lists_every_pod() -> None:
    """Issue 14: a headless Service (DNS answers every ready pod's IP) for round_robin gRPC clients,
    on the pods' `grpc` port, beside the ClusterIP Service; the server's connection age is set."""
    docs = render()
    service = headless(docs)
    assert service is not None
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["type"] == "ClusterIP"
    assert not spec.get("publishNotReadyAddresses")  # loading or draining pods stay out of DNS
    assert spec["ports"] == [
        {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        }
    ]  # no `http` port: the ServiceMonitor (endpoint port http) does not scrape each pod twice
    deployment = by_kind(docs)["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert spec["selector"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MUSIQ_GRPC_MAX_CONNECTION_AGE_S"] == "300"
    assert env["MUSIQ_GRPC_MAX_CONNECTION_AGE_GRACE_S"] == "600"
    notes = render_files()["musiq/templates/NOTES.txt"]
    assert f"dns:///{HEADLESS}.scoring.svc.cluster.local:50051" in notes

    assert headless(render({"service": {"grpcHeadless": {"enabled": False}}})) is None
    # A 63-character fullname still gives a valid, distinct name (a DNS label is <= 63 characters).
    long = render({"fullnameOverride": "m" * 63})
    names = [d["metadata"]["name"] for d in long if d["kind"] == "Service"]
    assert names == ["m" * 63, "m" * 49 + "-grpc-headless"]


def test_network_policy_admits_grpc_through_the_headless_service() -> None:
    """Headless traffic goes straight to pod IPs on the `grpc` container port: the policy, which
    selects the same pods, must admit that port."""
    docs = render(load(GPU_VALUES))
    policy, service = by_kind(docs)["NetworkPolicy"], headless(docs)
    assert service is not None
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    (rule,) = policy["spec"]["ingress"]
    assert {"port": "grpc", "protocol": "TCP"} in rule["ports"]


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


def test_gpu_values_run_the_cuda_image_with_real_settings() -> None:
    from service.settings import ServiceSettings

    pod = by_kind(render(load(USER_GPU_VALUES)))["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/musiq-service:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MUSIQ_PROVIDERS"] == '["CUDAExecutionProvider","CPUExecutionProvider"]'
    assert env["MUSIQ_DECODE_PROCESSES"] == "12"  # a 16-core GPU host
    unknown = [n for n in env if n.startswith("MUSIQ_") and n[6:].lower() not in ServiceSettings.model_fields]
    assert not unknown, f"settings the service does not have: {unknown}"
