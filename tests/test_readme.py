"""The README and the pages under docs/ tell the truth: the README's quickstart is the two
commands CI and users run, its grpcurl lines work against a real server on 127.0.0.1, and it stays
a short entry point; docs/configuration.md's table lists every setting with its real default; and
every relative link in these pages leads to a file and a heading that exist."""

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
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
README_MAX_LINES = 220
# The pages whose relative links must resolve: the README, docs/, and the READMEs and model card
# that link into them.
LINKED_PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy" / "README.md",
    ROOT / "deploy" / "helm" / "musiq" / "README.md",
    ROOT / "model" / "weights" / "MODEL_CARD.md",
]


def code_block(heading: str) -> list[str]:
    """The lines of the first fenced block after `heading`."""
    after = README.split(heading + "\n", 1)[1]
    block = after.split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def prose(text: str) -> str:
    """`text` without its fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens; a repeated
    heading gets -1, -2, ..."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = repeats.get(slug, 0)
        repeats[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    commands = [line.split("#")[0].strip() for line in code_block("## Quickstart")]
    assert commands == ["make run", "make test"]
    assert "\nrun:" in (ROOT / "Makefile").read_text()
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test")


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `MUSIQ_(\w+)` \| `(.*?)` \|", CONFIGURATION, flags=re.MULTILINE))
    fields = ServiceSettings.model_fields
    assert {name.lower() for name in rows} == set(fields), (
        "docs/configuration.md table vs service/settings.py"
    )
    for name, shown in rows.items():
        default = fields[name.lower()].get_default(call_default_factory=True)
        assert shown == json.dumps(default), (
            f"MUSIQ_{name}: docs/configuration.md says {shown}, settings say {default!r}"
        )


def test_readme_is_a_short_entry_point() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the details to a page under docs/"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in README, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


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
