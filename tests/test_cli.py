"""The `musiq` console script, run as a real subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import default_checkpoint_path, load_checkpoint
from model.decode import decode_image
from model.network import build_model
from model.packing import collate, pack
from tests.helpers import musiq
from tests.reference.official_numpy import make_official_params, save_official_npz

SMALL = dict(hidden=64, layers=2, heads=4, mlp=96)


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    for needle in needles:
        assert any(needle in ln for ln in lines), result.stderr


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, classes in [("koniq", 1), ("ava", 10)]:
        src = save_official_npz(make_official_params(3, **SMALL, num_classes=classes), d / f"{name}_ckpt.npz")
        result = musiq("convert", "official", src, "-o", d / f"{name}.safetensors", "--num-heads", "4")
        assert result.returncode == 0, result.stderr
        out[name] = d / f"{name}.safetensors"
    return out


def test_pack_writes_official_rows(tmp_path: Path) -> None:
    img = write_jpeg(tmp_path / "a.jpg", 384, 512)
    result = musiq("pack", img, "-o", tmp_path / "a.npz")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "a.npz") as z:
        tokens = z["tokens"]
        assert tokens.shape == (385, 3075) and tokens.dtype == np.float32
        np.testing.assert_array_equal(tokens, pack(decode_image(img)).official_rows())
        assert (
            z["patch_size"] == 32
            and z["longer_sides"].tolist() == [224, 384]
            and z["max_native_tokens"] == -1
        )
        assert json.loads(str(z["packing"]))["grid_size"] == 10


def test_pack_settings(tmp_path: Path) -> None:
    img = write_jpeg(tmp_path / "a.jpg", 100, 60)
    result = musiq(
        "pack",
        img,
        "-o",
        tmp_path / "b.npz",
        "--patch-size",
        "16",
        "--longer-sides",
        "--max-native-tokens",
        "5",
    )
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "b.npz") as z:
        assert z["tokens"].shape == (5, 16 * 16 * 3 + 3)


def test_convert_prints_the_mapping(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = save_official_npz(make_official_params(3, **SMALL), tmp_path / "spaq_ckpt.npz")
    result = musiq("convert", "official", src, "-o", tmp_path / "spaq.safetensors", "--num-heads", "4")
    assert result.returncode == 0, result.stderr
    assert (
        "blocks.0.attention.query.weight" in result.stdout and "Transformer/encoderblock_0" in result.stdout
    )
    assert "converted" in result.stdout and "name 'spaq'" in result.stdout
    assert load_checkpoint(tmp_path / "spaq.safetensors").name == "spaq"


def test_convert_failure_is_one_clear_report(tmp_path: Path) -> None:
    params = make_official_params(3, **SMALL)
    del params["head/bias"]
    src = save_official_npz(params, tmp_path / "broken.npz")
    result = musiq("convert", "official", src, "-o", tmp_path / "x.safetensors")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "head.bias" in result.stderr and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name", ["koniq", "ava"])
def test_score_prints_json_lines_equal_to_the_model(
    checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    imgs = [write_jpeg(tmp_path / f"{i}.jpg", 90 + 40 * i, 120, seed=i) for i in range(2)]
    result = musiq("score", "--checkpoint", checkpoints[name], *imgs)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in imgs]
    model = build_model(load_checkpoint(checkpoints[name]))
    for r, img in zip(records, imgs, strict=True):
        batch = collate([pack(decode_image(img), model.config.packing())])
        with torch.inference_mode():
            out = model(
                *[torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
            )
        assert r["score"] == pytest.approx(float(model.score(out)[0]), abs=1e-5)
        assert ("distribution" in r) == (name == "ava")
        if name == "ava":
            assert sum(r["distribution"]) == pytest.approx(1.0, abs=1e-5) and len(r["distribution"]) == 10


def test_score_bad_inputs_are_one_line_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    good = write_jpeg(tmp_path / "good.jpg", 64, 64)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    result = musiq(
        "score", "--checkpoint", checkpoints["koniq"], good, tmp_path / "missing.jpg", not_image, truncated
    )
    assert_one_line_error(result, "missing.jpg", "notes.jpg", "cut.jpg")
    # the good image is still scored
    assert json.loads(result.stdout.splitlines()[0])["image"] == str(good)


def test_score_runs_onnx_runtime_by_default_and_pytorch_with_checkpoint(tmp_path: Path) -> None:
    """The default is the server's runtime (tests/test_score_cli.py: equal to /v1/score); the
    embedded checkpoint in PyTorch agrees to the export's parity yet differs measurably on this
    image set (up to ~1.3e-5 on noise-tall), which is what lets those exact comparisons catch a return to PyTorch."""
    from tests.bulk.images import write_images

    write_images(tmp_path)
    some = [tmp_path / n for n in ("a/b/noise-tall.jpg", "a/noise-wide.jpg", "photo-coffee.jpg")]
    default = musiq("score", *some)
    torch_path = musiq("score", "--checkpoint", default_checkpoint_path(), *some)
    onnx = {r["image"]: r["score"] for r in map(json.loads, default.stdout.splitlines())}
    pytorch = {r["image"]: r["score"] for r in map(json.loads, torch_path.stdout.splitlines())}
    assert len(onnx) == 3 and onnx.keys() == pytorch.keys()
    diffs = [abs(onnx[k] - pytorch[k]) for k in onnx]
    assert max(diffs) <= 1e-4 and max(diffs) > 2e-6, diffs


def test_score_a_distribution_head_onnx_model(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`--model` with a 10-bin head prints its distribution, as `--checkpoint` does in PyTorch."""
    from export.exporter import export_checkpoint
    from export.photos import distorted_photos

    model = export_checkpoint(
        checkpoints["ava"],
        tmp_path / "ava.onnx",
        photos=distorted_photos(limit=2, longer_side=160),
        shapes=((1, 40, "none"),),
        log=lambda s: None,
    ).path
    img = write_jpeg(tmp_path / "a.jpg", 120, 160)
    onnx = musiq("score", "--model", model, img)
    pytorch = musiq("score", "--checkpoint", checkpoints["ava"], img)
    assert onnx.returncode == 0 and pytorch.returncode == 0, onnx.stderr + pytorch.stderr
    a, b = json.loads(onnx.stdout), json.loads(pytorch.stdout)
    assert set(a) == set(b) == {"image", "score", "distribution"}
    assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert a["distribution"] == pytest.approx(b["distribution"], abs=1e-5)


def test_bad_checkpoint_and_missing_image_for_pack(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"garbage!")
    assert_one_line_error(
        musiq("score", "--checkpoint", bogus, write_jpeg(tmp_path / "a.jpg", 8, 8)), "bogus"
    )
    assert_one_line_error(musiq("pack", tmp_path / "nope.png", "-o", tmp_path / "o.npz"), "nope.png")


def test_score_a_folder_ranked_as_csv(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.jpg", "sub/c.jpg"]):
        write_jpeg(folder / name, 80 + 30 * i, 100, seed=i)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "ranking.csv"
    result = musiq("score", folder, "--format", "csv", "--rank", "-o", out)
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "rank,image,score" and len(lines) == 4
    rows = [ln.split(",") for ln in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {Path(r[1]).name for r in rows} == {"a.jpg", "b.jpg", "c.jpg"}
    jsonl = musiq("score", folder, "--rank")
    assert [json.loads(ln)["rank"] for ln in jsonl.stdout.splitlines()] == [1, 2, 3]


def test_a_command_imports_only_its_own_module() -> None:
    """`musiq serve` in the image has no bench/ and no torch: choosing it loads neither, nor training."""
    probe = (
        "import sys; from cli.main import build_parser; build_parser('serve').parse_args(['serve']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('bench', 'torch', 'export', 'model', 'onnx') or m.startswith('model.train')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_listing_names_every_installed_command() -> None:
    result = musiq("--help")
    assert result.returncode == 0
    for command in ("pack", "convert", "score", "eval", "train", "split", "export", "serve", "bench"):
        assert command in result.stdout
