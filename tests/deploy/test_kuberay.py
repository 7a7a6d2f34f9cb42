"""The KubeRay `RayJob` for `musiq bulk` (deploy/kuberay/rayjob.yaml), validated offline.

kubernetes-validate knows no CRDs, and no installed package carries the RayJob CRD's OpenAPI
schema (neither ray nor cloudcoil's model packages do), so the manifest is checked in two parts:
- every pod template it embeds (head, each worker group) against the real Kubernetes schemas, as
  a `v1 PodTemplate` object, strictly (unknown fields fail), as the Helm chart's manifests are;
- the RayJob's own fields by the explicit structural check below: field names and types of
  KubeRay's `ray.io/v1` RayJob / RayClusterSpec (a written-down subset of its CRD), so a typo or a
  misplaced field fails here rather than at `kubectl apply`.
Then the properties the recipe relies on: one image built with the `bulk` extra everywhere, Ray's
version equal to the extra's pin, the entrypoint joining the cluster and resuming.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
KUBE_VERSION = "1.30.0"  # as tests/deploy/test_helm_chart.py

# KubeRay ray.io/v1 (operator 1.1+): the fields this project may use, with their types.
RAYJOB_SPEC: dict[str, type | tuple[type, ...]] = {
    "entrypoint": str,
    "runtimeEnvYAML": str,
    "jobId": str,
    "submissionMode": str,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int,
    "backoffLimit": int,
    "suspend": bool,
    "entrypointNumCpus": (int, float),
    "entrypointNumGpus": (int, float),
    "entrypointResources": str,
    "clusterSelector": dict,
    "submitterPodTemplate": dict,
    "rayClusterSpec": dict,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CLUSTER_SPEC: dict[str, type | tuple[type, ...]] = {
    "rayVersion": str,
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": dict,
    "headServiceAnnotations": dict,
    "headGroupSpec": dict,
    "workerGroupSpecs": list,
    "suspend": bool,
}
HEAD_GROUP: dict[str, type | tuple[type, ...]] = {
    "rayStartParams": dict,
    "template": dict,
    "serviceType": str,
    "headService": dict,
    "enableIngress": bool,
}
WORKER_GROUP: dict[str, type | tuple[type, ...]] = {
    "groupName": str,
    "replicas": int,
    "minReplicas": int,
    "maxReplicas": int,
    "idleTimeoutSeconds": int,
    "rayStartParams": dict,
    "template": dict,
    "scaleStrategy": dict,
    "numOfHosts": int,
    "suspend": bool,
}
REQUIRED = {"spec": {"entrypoint", "rayClusterSpec"}, "head": {"rayStartParams", "template"}}


def check_fields(obj: dict[str, Any], schema: dict[str, type | tuple[type, ...]], where: str) -> list[str]:
    problems = [f"{where}.{k}: unknown field" for k in obj if k not in schema]
    for key, value in obj.items():
        want = schema.get(key)
        # YAML booleans are ints to Python: a bool where a number belongs is wrong too.
        if want is not None and (
            not isinstance(value, want) or (isinstance(value, bool) and want is not bool)
        ):
            problems.append(f"{where}.{key}: {type(value).__name__}, expected {want}")
    return problems


def rayjob_problems(doc: dict[str, Any]) -> list[str]:
    """The structural check of the RayJob's own fields (not its pod templates)."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append(f"not a ray.io/v1 RayJob: {doc.get('apiVersion')} {doc.get('kind')}")
    if set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        problems.append(
            f"unknown top-level fields {sorted(set(doc) - {'apiVersion', 'kind', 'metadata', 'spec'})}"
        )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(doc.get("metadata", {}).get("name", ""))):
        problems.append("metadata.name must be a DNS-1123 label")
    spec = doc.get("spec", {})
    problems += check_fields(spec, RAYJOB_SPEC, "spec")
    problems += [f"spec.{k}: required" for k in REQUIRED["spec"] - set(spec)]
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode: one of {sorted(SUBMISSION_MODES)}")
    cluster = spec.get("rayClusterSpec", {})
    problems += check_fields(cluster, CLUSTER_SPEC, "spec.rayClusterSpec")
    head = cluster.get("headGroupSpec", {})
    problems += check_fields(head, HEAD_GROUP, "headGroupSpec")
    problems += [f"headGroupSpec.{k}: required" for k in REQUIRED["head"] - set(head)]
    groups = cluster.get("workerGroupSpecs", [])
    for i, group in enumerate(groups):
        problems += check_fields(group, WORKER_GROUP, f"workerGroupSpecs[{i}]")
        if "groupName" not in group or "rayStartParams" not in group or "template" not in group:
            problems.append(f"workerGroupSpecs[{i}]: groupName, rayStartParams and template are required")
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31)
        if not lo <= n <= hi:
            problems.append(f"workerGroupSpecs[{i}]: needs minReplicas <= replicas <= maxReplicas")
    if len({g.get("groupName") for g in groups}) != len(groups):
        problems.append("worker group names must differ")
    for where, params in [("head", head.get("rayStartParams", {}))] + [
        (f"group {g.get('groupName')}", g.get("rayStartParams", {})) for g in groups
    ]:
        if not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}: rayStartParams values must be strings")
    return problems


def templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = doc["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    found |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return found


def as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return doc


def test_rayjob_fields_are_well_formed(rayjob: dict[str, Any]) -> None:
    assert rayjob_problems(rayjob) == []


def test_the_structural_check_catches_mistakes(rayjob: dict[str, Any]) -> None:
    """The check is live: each kind of mistake it exists for is reported."""
    cases = {
        "unknown field": lambda d: d["spec"].__setitem__("entrypiont", "x"),
        "expected": lambda d: d["spec"].__setitem__("backoffLimit", "2"),
        "submissionMode": lambda d: d["spec"].__setitem__("submissionMode", "JobMode"),
        "required": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
        "minReplicas <= replicas": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(
            replicas=99
        ),
        "must be strings": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"num-cpus": 0}
        ),
    }
    for message, mutate in cases.items():
        bad = copy.deepcopy(rayjob)
        mutate(bad)
        assert any(message in p for p in rayjob_problems(bad)), message


def test_pod_templates_pass_the_kubernetes_schemas(rayjob: dict[str, Any]) -> None:
    for name, template in templates(rayjob).items():
        kubernetes_validate.validate(as_pod_template(name, template), KUBE_VERSION, strict=True)
    bad = copy.deepcopy(templates(rayjob)["head"])
    bad["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo: strict validation refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod_template("bad", bad), KUBE_VERSION, strict=True)


def test_the_recipe_runs_musiq_bulk_on_the_bulk_image(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["musiq", "bulk"] and "--resume" in args
    assert args[args.index("--address") + 1] == "auto", "the driver joins the RayJob's own cluster"
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bulk"]
    pin = re.fullmatch(r"ray\[data\]==(\S+)", extra[0])
    assert pin, "the bulk extra pins one Ray version (driver and cluster must match)"
    assert spec["rayClusterSpec"]["rayVersion"] == pin.group(1)
    for name, template in templates(rayjob).items():
        pod = template["spec"]
        (container,) = pod["containers"]
        assert re.search(r"/musiq:bulk(-cuda)?$", container["image"]), (name, container["image"])
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounts, "Ray writes its session and object store there"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus is not None) == container["image"].endswith("-cuda"), name
