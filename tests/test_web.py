"""The web page at `/` end to end in a real headless Chromium (Debian's `chromium`, driven by
Playwright; never `playwright install`): pick and drop images, wait for the scores, check each
equals the API's score for the same bytes, the heatmaps and the ranking. A screenshot is saved
(to $MUSIQ_SCREENSHOT when set), tagged with the model and the scores it shows. That is how
docs/web-page.png is made, and a test checks it still shows the current default model:

    MUSIQ_SCREENSHOT=docs/web-page.png .venv/bin/python -m pytest tests/test_web.py -k page_scores
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.settings import ServiceSettings
from tests.helpers import jpeg, require_tool, start_server

CHROMIUM = "/usr/bin/chromium"  # Debian's, when not on PATH
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def photo(longer: int, name: str = "astronaut", quality: int = 90) -> bytes:
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((longer, longer))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "web-page.png"


def page_photos() -> dict[str, bytes]:
    """The photos the page test picks (the first two) and drops (the last), as docs/web-page.png shows."""
    return {
        "astronaut.jpg": photo(400),
        "coffee-blocky.jpg": photo(400, "coffee", quality=5),
        "chelsea.jpg": photo(300, "chelsea"),
    }


def tag_screenshot(path: Path, model: str, model_version: str, scores: dict[str, float]) -> None:
    """Shrinks the screenshot for the docs (3/4 size, 256 colours: about 0.2 MB instead of 0.7) and
    records in it (PNG text chunks) which model made the scores it shows, and the scores."""
    import json

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("musiq:model", model)
    info.add_text("musiq:model_version", model_version)
    info.add_text("musiq:scores", json.dumps(scores, sort_keys=True))
    with Image.open(path) as image:
        small = image.convert("RGB").resize(
            (image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS
        )
    small.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, pnginfo=info, optimize=True)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv, thread, url = start_server(ServiceSettings(host="127.0.0.1", grpc_enabled=False))
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    chromium = require_tool("chromium", "Debian package chromium; tools/system_deps.sh installs it", CHROMIUM)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        yield b
        b.close()


def api_score(url: str, data: bytes) -> float:
    r = httpx.post(f"{url}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["score"]


# `browser` stays untyped: under playwright's types every query here would need a None check.
def test_page_scores_explains_and_ranks(server: str, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = page_photos()
    dropped = {"chelsea.jpg": files.pop("chelsea.jpg")}
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto(server + "/")
    page.wait_for_selector("#model:has-text('musiq-clive-small')")

    page.set_input_files(
        "#files", [{"name": n, "mimeType": "image/jpeg", "buffer": data} for n, data in files.items()]
    )
    # Dropping: a real `drop` event carrying a DataTransfer with the file, as the browser makes it.
    ((name, data),) = dropped.items()
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [name, base64.b64encode(data).decode()],
    )
    files.update(dropped)

    scores = {}
    for name, data in files.items():
        score = page.wait_for_selector(f'.card[data-name="{name}"] .score', timeout=120_000)
        shown = scores[name] = float(score.get_attribute("data-score"))
        assert shown == api_score(server, data), name  # exactly the API's score for the same bytes
        assert score.inner_text() == f"{shown:.2f}"
        heatmaps = page.locator(f'.card[data-name="{name}"] figure.heatmap img')
        assert heatmaps.count() == 3
        for i in range(3):  # decoded by the browser, not just present
            assert heatmaps.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")

    ranking = page.locator("#ranking li")
    ranked = [
        (ranking.nth(i).get_attribute("data-name"), float(ranking.nth(i).get_attribute("data-score")))
        for i in range(ranking.count())
    ]
    assert sorted(n for n, _ in ranked) == sorted(files)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)

    assert all(u.startswith(server) or u.startswith("data:") for u in requests), requests  # no CDN
    shot = Path(os.environ.get("MUSIQ_SCREENSHOT", tmp_path / "web-page.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    (default,) = (m["metadata"] for m in models["models"] if m["name"] == models["default"])
    tag_screenshot(shot, default["name"], default["version"], scores)
    page.close()


def test_page_shows_the_error_of_a_bad_file(server: str, browser) -> None:  # type: ignore[no-untyped-def]  # as above
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files(
        "#files",
        [
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"},
            {"name": "ok.jpg", "mimeType": "image/jpeg", "buffer": jpeg()},
        ],
    )
    error = page.wait_for_selector('.card[data-name="notes.txt"] .error', timeout=60_000)
    assert error.inner_text().startswith("image_unrecognised: not a recognised image format")
    page.wait_for_selector('.card[data-name="ok.jpg"] .score', timeout=120_000)
    assert page.locator("#ranking li").count() == 1  # the failed file is not ranked
    page.close()


def test_docs_screenshot_shows_the_current_model() -> None:
    """docs/web-page.png records (PNG text chunks) the model and the scores it shows; they must be the
    embedded default model's, for the same photos. Regenerate it with
    `MUSIQ_SCREENSHOT=docs/web-page.png python -m pytest tests/test_web.py -k page_scores`."""
    import json

    from model.decode import decode_image
    from model.packing import pack
    from service.runtime import ModelRuntime
    from service.settings import EMBEDDED_ONNX

    with Image.open(DOCS_SHOT) as shot:
        recorded = dict(shot.text)  # type: ignore[attr-defined]  # a PNG: PngImageFile has .text
    regenerate = "stale: MUSIQ_SCREENSHOT=docs/web-page.png python -m pytest tests/test_web.py -k page_scores"
    assert {"musiq:model", "musiq:model_version", "musiq:scores"} <= set(recorded), regenerate
    runtime = ModelRuntime(EMBEDDED_ONNX)
    meta = runtime.metadata
    assert (recorded["musiq:model"], recorded["musiq:model_version"]) == (meta.name, meta.version), regenerate
    scores = json.loads(recorded["musiq:scores"])
    assert set(scores) == set(page_photos())
    for name, data in page_photos().items():
        now = runtime.predict([pack(decode_image(data), runtime.packing)])[0].score
        assert scores[name] == pytest.approx(now, abs=1e-3), (name, regenerate)
    assert max(scores.values()) - min(scores.values()) > 1.0, scores  # v1 showed 65.7-66.0 for all three
