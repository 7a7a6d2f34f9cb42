"""`musiq score` gives the server's scores: the same runtime (ONNX Runtime), rows, cap and error
codes as `/v1/score` and `musiq bulk` (issue 18). No torch here: this file is one of the Makefile's
SERVE_TESTS, so `musiq score` is also proven on the serving install (3.12, 3.13) that has none.

PyTorch on the same rows differs from ONNX Runtime by up to ~6e-5 (float32 rounding;
`bench/score_agreement.py`); on this image set by up to ~1.3e-5, so the exact comparisons below
fail if `musiq score` scores in PyTorch again (tests/test_cli.py checks that the set tells the two
runtimes apart)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.offline import batcher_config, packing_for, plan_batches, prepare_file, score_packed
from service.runtime import ModelRuntime, Prediction
from service.settings import EMBEDDED_ONNX, ServiceSettings
from tests.bulk.images import EXPECTED, MISSING, write_images
from tests.helpers import musiq, start_server

GOOD = sorted(name for name, code in EXPECTED.items() if code is None)
# The bound between `musiq score` and `musiq bulk`, which batches (padding an image inside
# a batch changes only the float summation order).
BULK_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("score-images")
    return root, write_images(root)


@pytest.fixture(scope="module")
def scored(images: tuple[Path, dict[str, bytes]]) -> subprocess.CompletedProcess[str]:
    """`musiq score` on the folder and one missing file, as a user runs it."""
    root, _ = images
    return musiq("score", root, root / MISSING)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A server with default settings (its native-token cap, pixel limit, session options)."""
    srv, thread, url = start_server(ServiceSettings(grpc_enabled=False, host="127.0.0.1"))
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


def post(server: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/score", content=data, headers={"Content-Type": "application/octet-stream"}, timeout=60
    )


def records(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    return {r["image"]: r for r in map(json.loads, result.stdout.splitlines())}


def error_lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """image -> error code, from the lines `musiq score: IMAGE: CODE: message`."""
    out = {}
    for line in result.stderr.splitlines():
        if line.startswith("musiq score: "):
            image, code, _ = line.removeprefix("musiq score: ").split(": ", 2)
            out[image] = code
    return out


def test_scores_equal_the_rest_api_exactly(
    scored: subprocess.CompletedProcess[str], images: tuple[Path, dict[str, bytes]], server: str
) -> None:
    root, files = images
    assert scored.returncode == 1, scored.stderr  # some images failed
    got = records(scored)
    assert sorted(got) == [str(root / n) for n in GOOD]
    for name in GOOD:
        reply = post(server, files[name])
        assert reply.status_code == 200, reply.text
        record = got[str(root / name)]
        # The CLI prints 6 decimals; the server's float, rounded so, is the very same number.
        assert record["score"] == round(reply.json()["score"], 6), name
        assert set(record) == {"image", "score"}  # the default model's head: one score


def test_errors_carry_the_rest_api_codes(
    scored: subprocess.CompletedProcess[str], images: tuple[Path, dict[str, bytes]], server: str
) -> None:
    root, files = images
    assert "Traceback" not in scored.stderr
    codes = error_lines(scored)
    bad = {str(root / n): code for n, code in EXPECTED.items() if code is not None}
    assert codes == bad | {str(root / MISSING): "image_not_found"}
    for name, code in EXPECTED.items():
        if code is not None:
            reply = post(server, files[name])
            assert reply.json()["error"]["code"] == codes[str(root / name)], name


def test_scores_equal_bulks_scoring(
    scored: subprocess.CompletedProcess[str], images: tuple[Path, dict[str, bytes]]
) -> None:
    """`musiq bulk`'s actors call `score_packed` on `prepare_file`'s rows: alone, the same
    number; batched as the actors batch them, within the issue's 1e-5."""
    root, _ = images
    got = records(scored)
    runtime = ModelRuntime(EMBEDDED_ONNX)
    packing = packing_for(runtime.packing, None)
    items = [prepare_file(str(root / n), packing).compute for n in GOOD]
    config = batcher_config(runtime)
    batched = score_packed(runtime, items, config)
    padded = [runtime.padded_length(it.num_tokens) for it in items]
    assert any(len(batch) > 1 for batch in plan_batches(padded, config))  # some share a batch
    for name, item, together in zip(GOOD, items, batched, strict=True):
        (alone,) = score_packed(runtime, [item], config)
        assert isinstance(alone, Prediction) and isinstance(together, Prediction)
        score = got[str(root / name)]["score"]
        assert score == round(alone.score, 6), name
        assert abs(float(score) - together.score) <= BULK_TOLERANCE, name


def test_the_default_path_imports_no_torch(images: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = images
    probe = (
        "import sys; from cli.main import main; rc = main(['score', sys.argv[1]]); "
        "print('torch' in sys.modules, rc, file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(root / GOOD[0])], capture_output=True, text=True, timeout=120
    )
    assert result.stderr.strip().splitlines()[-1] == "False 0", result.stderr
    assert json.loads(result.stdout)["image"] == str(root / GOOD[0])


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from cli.main import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_model_and_checkpoint_together_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = run_main(["score", "--model", "m.onnx", "--checkpoint", "c.safetensors", "x.jpg"], capsys)
    assert rc == 2 and "not allowed with argument --model" in err, err


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"not an onnx file" * 10, "bad.onnx", "cannot load model"),
        (None, "missing.onnx", "model file not found"),
        (b"x", "koniq.safetensors", "pass it as --checkpoint"),
    ],
)
def test_a_bad_model_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, name: str, message: str
) -> None:
    model = tmp_path / name
    if content is not None:
        model.write_bytes(content)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    rc, err = run_main(["score", "--model", str(model), str(image)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and message in lines[0] and name in lines[0], err


def test_a_cap_above_the_models_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_main(["score", "--max-native-tokens", "100000", str(tmp_path / "a.jpg")], capsys)
    assert rc == 1 and "--max-native-tokens must be between 0 and 512" in err, err


def test_score_without_any_model_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import settings

    monkeypatch.setattr(settings, "EMBEDDED_ONNX", tmp_path / "none.onnx")
    rc, err = run_main(["score", "x.jpg"], capsys)
    assert rc == 1 and "--model" in err and "--checkpoint" in err, err


def test_checkpoint_without_torch_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a serving install (no torch) `--checkpoint` cannot run: one line that points to --model."""
    from model.checkpoint import EMBEDDED_DEFAULT

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    rc, err = run_main(["score", "--checkpoint", str(EMBEDDED_DEFAULT), str(tmp_path / "a.jpg")], capsys)
    assert rc == 1 and "--model FILE.onnx" in err, err
