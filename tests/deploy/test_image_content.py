"""The container image's Python content, built as the Dockerfile builds it, serves.

No container engine runs in CI, so this rebuilds what the image holds without one: the build
stage's COPY set (filtered by .dockerignore) goes into an empty folder, the stage's RUN steps run
there with /opt/musiq moved to a temporary prefix (a fresh venv, `pip install .` without extras,
the same pruning: `deploy/build_venv.sh`), and `musiq serve` starts from that venv, outside the
source tree, with an environment that holds nothing of this checkout. It must answer one REST
score and a gRPC health check. The image itself is built and run by `make image-proof`
(deploy/container_proof.sh, buildah).

pip keeps its cache here (the Dockerfile's PIP_NO_CACHE_DIR only keeps the image small); PyPI
must be reachable, as it is for `make test` itself.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import jpeg
from tests.reliability.serve import ServerProcess, serve_process

ROOT = Path(__file__).resolve().parents[2]
IMAGE_PREFIX = "/opt/musiq"

pytestmark = pytest.mark.slow


def build_stage() -> list[str]:
    """The build stage's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = re.split(r"^FROM\s+\S+\s+AS\s+build\s*$", text, flags=re.M | re.I)[1]
    stage = re.split(r"^FROM\s", stage, flags=re.M)[0]
    return [ln.strip() for ln in stage.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**/` spans folders, `*` and `?` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        regex = dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not pattern.startswith("!")
    return verdict


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def copy_context(dest: Path) -> None:
    """Copies each COPY source of the build stage into `dest`, as the build context would hold it."""
    patterns = dockerignore()
    copies = [shlex.split(ln)[1:] for ln in build_stage() if ln.upper().startswith("COPY ")]
    assert copies and not any(a[0].startswith("--") for a in copies), (
        "the build stage copies from the context"
    )
    for *sources, target in copies:
        for source in sources:
            src = ROOT / source
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if ignored(rel, patterns):
                    continue
                to = dest / target.rstrip("/") / (f.name if src.is_file() else f.relative_to(src))
                if src.is_file() and not target.endswith("/"):
                    to = dest / target
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, to)


def run_build(src: Path, prefix: Path) -> None:
    """Runs the build stage's RUN steps in `src`, with its ARG defaults and ENV set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != ROOT / ".venv/bin")
    # The image's interpreter is its base's python3; here, this interpreter's base one.
    env["PYTHON"] = str(
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    runs = []
    for line in build_stage():
        word, _, rest = line.partition(" ")
        if word.upper() == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            env[name] = value
        elif word.upper() == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
        elif word.upper() == "RUN":
            runs.append(rest.replace(IMAGE_PREFIX, str(prefix)))
    env.pop("PIP_NO_CACHE_DIR", None)
    assert runs, "the build stage runs something"
    for cmd in runs:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"RUN {cmd}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("image")
    copy_context(work / "src")
    prefix = work / "opt-musiq"
    run_build(work / "src", prefix)
    return prefix


@pytest.fixture(scope="module")
def server(image_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    outside = tmp_path_factory.mktemp("cwd")
    env = {"PATH": f"{image_venv}/bin:/usr/bin:/bin", "HOME": str(outside), "PYTHONDONTWRITEBYTECODE": "1"}
    with serve_process(musiq=[str(image_venv / "bin" / "musiq")], cwd=outside, base_env=env) as srv:
        yield srv


def test_the_copy_set_holds_no_tests_or_bench() -> None:
    """The context filter itself: what .dockerignore keeps out stays out of the copy."""
    patterns = dockerignore()
    assert ignored("bench/commands.py", patterns)
    assert ignored("tests/test_cli.py", patterns)
    assert ignored("model/__pycache__/x.pyc", patterns)
    assert not ignored("model/packing.py", patterns)
    assert not ignored("deploy/build_venv.sh", patterns)


def test_image_content_serves_rest_and_grpc(server: ServerProcess, image_venv: Path) -> None:
    reply = httpx.post(
        f"{server.url}/v1/score", content=jpeg(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert 0.0 <= reply.json()["score"] <= 100.0
    with grpc.insecure_channel(server.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    # The model it serves is the one inside the built venv, not this checkout's.
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    assert all(Path(m["path"]).is_relative_to(image_venv) for m in models), models


def test_image_content_has_no_torch_bench_or_pip(image_venv: Path, tmp_path: Path) -> None:
    py = str(image_venv / "bin" / "python")
    env = {"PATH": f"{image_venv}/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    for module in ("torch", "bench", "pip", "ray"):  # ray: only with --build-arg EXTRAS=bulk
        probe = subprocess.run([py, "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True)
        assert probe.returncode != 0, f"{module} is in the image's venv"
    bench = subprocess.run(
        [str(image_venv / "bin" / "musiq"), "bench"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bench.returncode == 2 and "Traceback" not in bench.stderr
    assert "does not include bench/" in bench.stderr
