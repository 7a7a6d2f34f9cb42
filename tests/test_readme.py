"""The README tells the truth: its quickstart is the two commands CI and users run, its
configuration table lists every setting with its real default, and its grpcurl lines work
against a real server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.settings import ServiceSettings
from tests.helpers import start_server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_block(heading: str) -> list[str]:
    """The lines of the first fenced block after `heading`."""
    after = README.split(heading + "\n", 1)[1]
    block = after.split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    commands = [line.split("#")[0].strip() for line in code_block("## Quickstart")]
    assert commands == ["make run", "make test"]
    assert "\nrun:" in (ROOT / "Makefile").read_text()
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test")


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `MUSIQ_(\w+)` \| `(.*?)` \|", README, flags=re.MULTILINE))
    fields = ServiceSettings.model_fields
    assert {name.lower() for name in rows} == set(fields), "README configuration table vs service/settings.py"
    for name, shown in rows.items():
        default = fields[name.lower()].get_default(call_default_factory=True)
        assert shown == json.dumps(default), f"MUSIQ_{name}: README says {shown}, settings say {default!r}"


def test_readme_grpcurl_lines_work(tmp_path: Path) -> None:
    grpcurl = Path(sys.executable).parent / "grpcurl"
    assert grpcurl.exists() or shutil.which("grpcurl"), "grpcurl comes with the dev extra"
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1024, 1024)).save(buf, format="JPEG", quality=90)
    assert len(buf.getvalue()) * 4 / 3 > 131072  # its base64 is longer than Linux allows one argument
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    lines = [line for line in code_block("### grpcurl") if "grpcurl" in line]
    assert len(lines) == 2

    srv, thread, url = start_server(ServiceSettings(host="127.0.0.1", grpc_port=0))
    try:
        target = f"127.0.0.1:{srv.config.app.state.grpc_port}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        outputs = [
            subprocess.run(
                ["bash", "-o", "pipefail", "-c", line.replace("localhost:50051", target)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            for line in lines
        ]
        rest = httpx.post(
            f"{url}/v1/score", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"}, timeout=120
        ).json()
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    for out in outputs:
        assert out.returncode == 0, out.stderr
    listed = outputs[0].stdout.split()
    assert {"musiq.v1.Quality.Score", "musiq.v1.Quality.Explain"} <= set(listed)
    reply = json.loads(outputs[1].stdout)
    assert reply["score"] == pytest.approx(rest["score"], abs=1e-9) and reply["model"] == rest["model"]
