"""IQA metrics, batched scoring and `musiq eval`.

The metrics are checked against scipy's reference implementations and hand-computable cases; the
batched scorer against one-image-at-a-time forward passes; the CLI end to end in a subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from cli.main import main as cli_main
from model.checkpoint import save_checkpoint
from model.decode import ImageDecodeError, decode_image
from model.eval_command import read_dataset
from model.evaluate import (
    METRICS,
    format_metrics,
    iqa_metrics,
    logistic4,
    logistic4_fit,
    scatter_plot,
)
from model.network import to_checkpoint
from model.packing import collate, pack
from model.scoring import planned_tokens, score_images
from tests.helpers import musiq
from tests.test_network import TINY, randomised

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# TINY with small resized scales: still multi-scale with a native block, a tenth of the tokens.
FAST = TINY.replace(longer_sides=(64, 96))


def synthetic(n: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and MOS related through a monotone, noisy, nonlinear link."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(0.0, 1.0, n)
    mos = 50 + 30 * np.tanh(pred) + rng.normal(0.0, noise * 10, n)
    return pred, mos


# --- metrics -------------------------------------------------------------------------------------


def test_perfect_monotone_and_reversed() -> None:
    x = np.linspace(0.0, 1.0, 20)
    up = iqa_metrics(x, np.exp(3 * x), n_boot=0)
    assert up["srcc"]["value"] == pytest.approx(1.0) and up["krcc"]["value"] == pytest.approx(1.0)
    assert up["plcc"]["value"] < 1.0  # nonlinear: raw PLCC sees it, the logistic mapping mostly not
    assert up["plcc_logistic"]["value"] > up["plcc"]["value"]
    down = iqa_metrics(x, -(x**3), n_boot=0)
    assert down["srcc"]["value"] == pytest.approx(-1.0) and down["krcc"]["value"] == pytest.approx(-1.0)
    assert down["plcc"]["value"] < -0.9
    assert up["n"] == down["n"] == 20


def test_metrics_match_scipy_on_a_small_example() -> None:
    pred = np.array([3.1, 1.2, 4.8, 2.2, 2.2, 5.9, 0.4, 3.3])  # a tie in pred
    mos = np.array([60.0, 35.0, 70.0, 50.0, 41.0, 88.0, 20.0, 55.0])
    m = iqa_metrics(pred, mos, n_boot=0)
    assert m["srcc"]["value"] == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert m["krcc"]["value"] == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert m["plcc"]["value"] == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert m["rmse"]["value"] == pytest.approx(math.sqrt(np.mean((pred - mos) ** 2)), abs=1e-12)
    mapped = logistic4(pred, logistic4_fit(pred, mos))
    assert m["plcc_logistic"]["value"] == pytest.approx(stats.pearsonr(mapped, mos).statistic, abs=1e-12)
    assert m["rmse_logistic"]["value"] == pytest.approx(math.sqrt(np.mean((mapped - mos) ** 2)), abs=1e-12)
    assert m["rmse_logistic"]["value"] < 8.0  # mapped onto the MOS scale, unlike the raw predictions
    assert set(METRICS) <= set(m) and all(math.isnan(m[k]["lo"]) for k in METRICS)  # n_boot=0


def test_logistic_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    truth = np.array([90.0, 10.0, 0.5, 0.8])
    x = rng.uniform(-4.0, 5.0, 400)
    y = logistic4(x, truth) + rng.normal(0.0, 0.5, x.size)
    params = logistic4_fit(x, y)
    assert params.shape == (4,)
    params[3] = abs(params[3])
    np.testing.assert_allclose(params, truth, rtol=0.05, atol=0.05)
    # A decreasing link is found as well (the initial guess follows the correlation's sign).
    down = logistic4_fit(x, logistic4(-x, truth) + rng.normal(0.0, 0.5, x.size))
    assert stats.pearsonr(logistic4(x, down), logistic4(-x, truth)).statistic > 0.999


def test_logistic_fit_falls_back_to_a_line() -> None:
    assert logistic4_fit([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx([2.0, 0.0])  # too few points
    assert logistic4_fit(np.ones(10), np.arange(10.0)) == pytest.approx([0.0, 4.5])  # constant predictions
    assert logistic4([0.0, 1.0], [2.0, 1.0]) == pytest.approx([1.0, 3.0])


def test_bootstrap_interval_contains_the_value_and_narrows_with_data() -> None:
    small = iqa_metrics(*synthetic(40), n_boot=300, seed=1)
    large = iqa_metrics(*synthetic(1500), n_boot=300, seed=1)
    for name in METRICS:
        for m in (small, large):
            assert m[name]["lo"] <= m[name]["value"] <= m[name]["hi"], (name, m[name])
        assert large[name]["hi"] - large[name]["lo"] < small[name]["hi"] - small[name]["lo"], name
    assert small == iqa_metrics(*synthetic(40), n_boot=300, seed=1)  # seeded: reproducible
    wider = iqa_metrics(*synthetic(40), n_boot=300, seed=1, ci=0.99)
    assert wider["srcc"]["hi"] - wider["srcc"]["lo"] > small["srcc"]["hi"] - small["srcc"]["lo"]


def test_bootstrap_with_refitted_logistic() -> None:
    fixed = iqa_metrics(*synthetic(60), n_boot=50, seed=2)
    refit = iqa_metrics(*synthetic(60), n_boot=50, seed=2, refit_logistic=True)
    assert refit["plcc_logistic"]["value"] == fixed["plcc_logistic"]["value"]
    assert refit["srcc"] == fixed["srcc"]  # rank metrics do not involve the mapping
    r = refit["plcc_logistic"]
    assert r["lo"] <= r["value"] <= r["hi"]


def test_constant_predictions_give_nan_without_raising() -> None:
    mos = np.arange(12.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = iqa_metrics(np.full(12, 0.1), mos, n_boot=100)
    for name in ("srcc", "krcc", "plcc", "plcc_logistic"):
        assert all(math.isnan(m[name][k]) for k in ("value", "lo", "hi")), name
    assert m["rmse_logistic"]["value"] == pytest.approx(np.std(mos))  # best constant: the mean MOS
    assert "nan" in format_metrics(m)
    one = iqa_metrics([1.0], [2.0], n_boot=10)
    assert math.isnan(one["srcc"]["value"]) and one["rmse"]["value"] == 1.0


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="length"):
        iqa_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        iqa_metrics([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="no scores"):
        iqa_metrics([], [])


def test_format_metrics_is_a_markdown_table() -> None:
    table = format_metrics(iqa_metrics(*synthetic(50), n_boot=50))
    lines = table.splitlines()
    assert lines[0].startswith("| metric | value | 95% CI |") and lines[1].startswith("|:--")
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert any(line.startswith("| SRCC | 0.") for line in lines) and "| n | 50 |" in table


def test_scatter_plot_writes_a_png(tmp_path: Path) -> None:
    pred, mos = synthetic(80)
    out = scatter_plot(pred, mos, tmp_path / "sub" / "s.png", title="synthetic")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as img:
        assert img.size == (600, 500)


# --- batched scoring -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return randomised(FAST)


def write_images(folder: Path, shapes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(shapes):
        path = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


SHAPES = [(64, 96), (200, 40), (33, 33), (120, 150), (48, 48), (90, 17), (64, 96)]


def one_at_a_time(model: torch.nn.Module, images: list) -> np.ndarray:
    out = []
    for image in images:
        array = image if isinstance(image, np.ndarray) else decode_image(image)
        batch = collate([pack(array, model.config.packing())])
        inputs = [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
        with torch.inference_mode():
            out.append(float(model.score(model(*inputs))[0]))
    return np.array(out)


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_scores_equal_single_image_scores(tiny_model, tmp_path: Path, workers: int) -> None:
    paths = write_images(tmp_path, SHAPES)
    arrays = [np.random.default_rng(9).integers(0, 256, (70, 30, 3), dtype=np.uint8)]
    images = [*paths[:3], arrays[0], *[str(p) for p in paths[3:]]]  # Path, ndarray and str inputs
    expected = one_at_a_time(tiny_model, images)
    got = score_images(tiny_model, images, batch_size=3, workers=workers)
    assert got.dtype == np.float64 and got.shape == (len(images),)
    assert expected.std() > 0.05  # the scores differ by image, so order is really checked
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_flip_scores_each_image_mirrored(tiny_model, tmp_path: Path, workers: int) -> None:
    paths = write_images(tmp_path, SHAPES[:4])
    mirrored = [decode_image(p)[:, ::-1] for p in paths]
    got = score_images(tiny_model, paths, batch_size=3, workers=workers, flip=True)
    np.testing.assert_allclose(got, one_at_a_time(tiny_model, mirrored), atol=1e-5, rtol=0)
    # the network is not mirror-symmetric (hashed positions), so this compares different numbers
    assert np.abs(got - score_images(tiny_model, paths)).max() > 1e-3


def test_planned_tokens_match_the_packing() -> None:
    packing = FAST.packing()
    for h, w in SHAPES:
        assert planned_tokens(h, w, packing) == pack(np.zeros((h, w, 3), np.uint8), packing).num_tokens
    capped = FAST.packing(max_native_tokens=5)
    assert planned_tokens(300, 300, capped) == pack(np.zeros((300, 300, 3), np.uint8), capped).num_tokens


def test_score_images_edge_cases(tiny_model, tmp_path: Path) -> None:
    assert score_images(tiny_model, []).shape == (0,)
    good, whole = write_images(tmp_path, [(40, 40), (120, 90)])
    # A readable header (the token count is planned from it) over truncated pixel data, so the
    # error comes from the decode step: in-process, or pickled back from a worker process.
    bad = tmp_path / "broken.jpg"
    data = whole.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for workers in (0, 1):
        with pytest.raises(ImageDecodeError, match=r"broken\.jpg.*truncated") as caught:
            score_images(tiny_model, [good, bad], workers=workers)
        assert caught.value.reason == "corrupt"
    header_only = tmp_path / "header.jpg"
    header_only.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDecodeError, match=r"header\.jpg"):
        score_images(tiny_model, [good, header_only])
    with pytest.raises(ImageDecodeError, match=r"nothere\.png"):
        score_images(tiny_model, [tmp_path / "nothere.png"])
    tiny_model.train()
    try:
        score_images(tiny_model, [good])
        assert tiny_model.training  # the caller's mode is restored
    finally:
        tiny_model.eval()


# --- musiq eval ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("eval")
    ckpt = save_checkpoint(to_checkpoint(tiny_model, name="t"), d / "tiny.safetensors")
    (d / "imgs").mkdir()
    paths = write_images(d / "imgs", [(64, 96), (200, 40), (33, 33), (120, 150), (48, 48), (90, 17)])
    with (d / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos", "split"])
        for i, p in enumerate(paths):
            name = p.relative_to(d).as_posix() if i % 2 else str(p)  # relative and absolute paths
            writer.writerow([name, 10.0 * i + 5, "test" if i < 5 else "train"])
    return ckpt, d / "data.csv"


def test_eval_cli_end_to_end(eval_setup: tuple[Path, Path], tiny_model, tmp_path: Path) -> None:
    ckpt, data = eval_setup
    out = tmp_path / "report"
    result = musiq(
        "eval", "--checkpoint", ckpt, "--data", data, "--split", "test", "--out", out, "--n-boot", "50"
    )
    assert result.returncode == 0, result.stderr
    assert "| SRCC |" in result.stdout and "| PLCC (logistic) |" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRICS) | {"n"} <= set(metrics) and metrics["n"] == 5 and metrics["model"] == "t"
    assert set(metrics["srcc"]) == {"value", "lo", "hi"}
    assert (out / "scatter.png").read_bytes()[:8] == PNG_SIGNATURE
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mos"]) for r in rows] == [5.0, 15.0, 25.0, 35.0, 45.0]
    dataset = read_dataset(data, split="test")
    expected = one_at_a_time(tiny_model, dataset.paths)
    np.testing.assert_allclose([float(r["pred"]) for r in rows], expected, atol=1e-5)


def test_eval_cli_flip_averages_each_image_with_its_mirror(
    eval_setup: tuple[Path, Path], tiny_model, tmp_path: Path
) -> None:
    ckpt, data = eval_setup
    out = tmp_path / "report"
    argv = [
        "eval",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--n-boot",
        "0",
        "--flip",
    ]
    assert cli_main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["flip_averaged"] is True
    with (out / "predictions.csv").open() as f:
        pred = [float(r["pred"]) for r in csv.DictReader(f)]
    paths = read_dataset(data).paths
    mirrored = [decode_image(p)[:, ::-1] for p in paths]
    expected = (one_at_a_time(tiny_model, paths) + one_at_a_time(tiny_model, mirrored)) / 2
    np.testing.assert_allclose(pred, expected, atol=1e-5)


def test_eval_cli_rejects_a_csv_without_mos(eval_setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = eval_setup
    bad = tmp_path / "bad.csv"
    bad.write_text("image,score\nimgs/img0.jpg,3.0\n")
    result = musiq("eval", "--checkpoint", ckpt, "--data", bad)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing column(s) mos" in lines[0], result.stderr


def test_read_dataset_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    cases = {
        "image,mos\na.jpg,abc\n": "not a number",
        "image,mos\nmissing.jpg,1\n": "1 image file(s) not found",
        "image,mos,split\na.jpg,1,train\n": "no rows with split 'test'",
        "": "missing column(s) image, mos",
    }
    for text, message in cases.items():
        (tmp_path / "d.csv").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_dataset(tmp_path / "d.csv", split="test" if "split" in text else None)
    (tmp_path / "d.csv").write_text("image,mos\na.jpg,1\n")
    with pytest.raises(ValueError, match="no 'split' column"):
        read_dataset(tmp_path / "d.csv", split="test")
    with pytest.raises(ValueError, match="no such CSV"):
        read_dataset(tmp_path / "nope.csv")


def test_two_images_do_not_raise() -> None:
    m = iqa_metrics(np.array([1.0, 2.0]), np.array([3.0, 4.0]), n_boot=100, seed=1)
    assert m["n"] == 2 and m["srcc"]["value"] == pytest.approx(1.0)
