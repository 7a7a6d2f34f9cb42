"""The benchmark harness's arithmetic and parsing (the long runs themselves are not tests)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from bench import prom
from bench.load import completion_rate
from bench.report import markdown, saturation, targets
from bench.stats import Latency, percentile, roofline_fraction, roofline_images_per_s
from model.config import OFFICIAL
from model.flops import forward_flops
from service.batcher import BatchInfo
from service.metrics import ServiceMetrics
from tests.helpers import jpeg


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    xs = list(np.random.default_rng(1).exponential(size=37))
    assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_percentile_edges() -> None:
    assert percentile([4.0, 1.0], 50) == 2.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    lat = Latency.of([0.1, 0.2, 0.3, 0.4])
    assert (lat.n, lat.p50, lat.mean) == (4, pytest.approx(0.25), pytest.approx(0.25))


def test_roofline_arithmetic() -> None:
    flops = forward_flops(OFFICIAL, 385)
    assert 20e9 < flops < 40e9  # ~ 30 GFLOP for a 512x384 image at the official size
    # 300 GFLOP/s and 5 images/s of 30 GFLOP each: half the peak; the roofline is 10 images/s
    assert roofline_fraction(30e9, 5.0, 300.0) == pytest.approx(0.5)
    assert roofline_images_per_s(30e9, 300.0) == pytest.approx(10.0)


def test_completion_rate_ignores_the_fill_time() -> None:
    # batches of 4 answered every 2 s, the first after a 5 s fill: 2 images/s, not 12 / 11 s
    done = [5.0, 5.001, 5.002, 5.01] + [7.0] * 4 + [9.0] * 4
    assert completion_rate(done, wall_s=11.0) == pytest.approx(2.0)
    assert completion_rate([3.0, 3.0], wall_s=4.0) == pytest.approx(0.5)  # one instant: over wall
    assert completion_rate([3.0, 3.001], wall_s=4.0) == pytest.approx(0.5)  # one batch, two answers
    assert completion_rate([1.0, 2.0, 3.0], wall_s=3.2) == pytest.approx(1.0)  # c=1: one per second
    assert completion_rate([], wall_s=4.0) == 0.0


def _metrics_text(batches: list[BatchInfo], model: str = "m") -> str:
    metrics = ServiceMetrics()
    hook = metrics.batch_hook(model)
    for b in batches:
        hook(b)
    return generate_latest(metrics.registry).decode()


def test_prom_reads_the_services_own_metrics() -> None:
    first = [BatchInfo(2, 400, 769, (0.0, 0.0), 0.1)]
    later = [BatchInfo(4, 1000, 3000, (0.0,) * 4, 0.3), BatchInfo(1, 385, 385, (0.0,), 0.1)]
    before = prom.parse(_metrics_text(first), "m")
    after = prom.parse(_metrics_text(first + later), "m")
    assert before.padding_efficiency == pytest.approx(769 / 800)
    phase = after.since(before)
    assert phase.real_tokens == 3385 and phase.computed_tokens == 4385
    assert phase.padding_efficiency == pytest.approx(3385 / 4385)
    assert phase.batch_size.count == 2 and phase.batch_size.mean == pytest.approx(2.5)
    assert phase.batch_size.distribution() == [("<= 1", 1), ("<= 4", 1)]
    assert phase.batch_tokens.distribution() == [("<= 512", 1), ("<= 4096", 1)]
    assert prom.parse(_metrics_text(first), "other").computed_tokens == 0
    metrics = ServiceMetrics()
    metrics.watch_queues(lambda: [("m", 3, 2, 512)])
    assert prom.busy(generate_latest(metrics.registry).decode()) == 5


def _results(fp32_rate: float, int8_rate: float, eff: float) -> dict:
    def served(rate: float) -> dict:
        level = {
            "concurrency": 4,
            "images_per_s": rate,
            "completed": 10,
            "cancelled": 0,
            "latency": {"p50": 0.5, "p99": 0.9},
            "batching": {"mean_batch_size": 2.0, "padding_efficiency": eff},
        }
        c1 = {
            "latency": {"p50": 0.2, "p99": 0.3},
            "per_image_p50_s": {"a": 0.2},
            "server_median_s": {"decode_s": 0.002, "pack_s": 0.004, "queue_s": 0.004, "infer_s": 0.18},
            "overhead_median_s": 0.02,
        }
        batching = {
            "padding_efficiency": eff,
            "batches": 5,
            "batch_size_distribution": [("<= 2", 5)],
            "batch_tokens_distribution": [("<= 1024", 5)],
        }
        return {"mixed": {"rest_c1": c1, "grpc_c1": c1, "sweep": [level], "sweep_batching": batching}}

    return {
        "machine": {
            "cpus": 2,
            "processor": "x",
            "python": "3.11",
            "onnxruntime": "1",
            "loadavg_at_start": [0, 0, 0],
        },
        "wall_s": 60,
        "sgemm": {"gflops": 300.0, "engine": "numpy"},
        "mixes": {
            "mixed": {
                "images": [{"name": "a", "width": 1, "height": 1, "tokens": 385}],
                "flops_per_image": 30e9,
                "flops": {"a": 30e9},
            }
        },
        "pyiqa": {"forward_s": {"a": 0.5}, "parameters": 27125825, "torch": "2", "threads": 2},
        "ort": {"fp32": {"mixed": {"a": {"forward_s": 0.18, "decode_s": 0.002, "pack_s": 0.004}}}},
        "int8_parity": {"srcc": 0.996},
        "service": {"fp32": served(fp32_rate), "int8": served(int8_rate)},
    }


def test_targets_are_computed_from_the_measurements() -> None:
    rows = {(r["target"], r["precision"]): r for r in targets(_results(9.0, 4.0, 0.95))}
    roof = rows[("fp32 throughput / fp32 roofline", "fp32")]
    assert roof["value"] == pytest.approx(0.9) and roof["met"]  # 9 img/s x 30 GFLOP / 300 GFLOP/s
    vs = rows[("int8 throughput / pyiqa throughput", "int8")]
    assert vs["value"] == pytest.approx(2.0) and not vs["met"]  # 4 img/s vs 1 / 0.5 s
    over = rows[("(REST latency - inference) / inference, c=1", "fp32")]
    assert over["value"] == pytest.approx(0.02 / 0.18) and not over["met"]
    rest = rows[("REST p50 (c=1) / pyiqa forward, same image", "fp32")]
    assert rest["value"] == pytest.approx(0.4) and rest["met"]
    assert rows[("padding efficiency (sweep)", "fp32")]["met"]
    assert rows[("int8 SRCC vs fp32 (56 real photos, exporter)", "int8")]["met"]
    rows = {(r["target"], r["precision"]): r for r in targets(_results(3.0, 4.0, 0.5))}
    assert not rows[("fp32 throughput / fp32 roofline", "fp32")]["met"]
    assert not rows[("padding efficiency (sweep)", "int8")]["met"]


def test_report_renders_and_picks_the_saturation_level() -> None:
    results = _results(9.0, 4.0, 0.95)
    text = markdown(results)
    assert "| fp32 throughput / fp32 roofline | mixed | fp32 | 0.900 | >= 0.85 | yes |" in text
    assert (
        saturation([{"images_per_s": 1.0}, {"images_per_s": 3.0}, {"images_per_s": 2.0}])["images_per_s"]
        == 3.0
    )


def test_mixes_are_the_issues_images(tmp_path: Path) -> None:
    from bench.workload import load_mix

    # A data folder laid out as ../shared/data, with photos of the released sizes.
    for folder, name, (w, h) in [
        ("bsds500/images/train", "1.jpg", (481, 321)),
        ("bsds500/images/test", "2.jpg", (321, 481)),
        ("clive/images", "3.jpg", (500, 500)),
        ("clive/images", "4.jpg", (500, 500)),
        ("clive/images", "5.jpg", (640, 480)),
    ]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(jpeg(h, w))
    mixed = load_mix("mixed", OFFICIAL, data=tmp_path)
    assert [(i.width, i.height) for i in mixed] == [
        (481, 321),
        (321, 481),
        (1024, 768),
        (2000, 1500),
        (300, 4000),
    ]
    assert [i.tokens for i in mixed] == [369, 369, 961, 3154, 1443]
    assert [(i.width, i.height, i.tokens) for i in load_mix("512x384", OFFICIAL, data=tmp_path)] == [
        (512, 384, 385)
    ]
    clive = load_mix("clive", OFFICIAL, clive_count=3, data=tmp_path)
    assert [(i.width, i.height) for i in clive] == [(500, 500), (500, 500)]


def test_closed_loop_counts_answers_and_cancels_at_the_deadline() -> None:
    import asyncio

    from bench.load import Record, closed_loop
    from bench.workload import BenchImage

    images = [BenchImage(n, b"", 1, 1, 1) for n in "ab"]

    async def fast(image: BenchImage) -> Record:
        await asyncio.sleep(0.001)
        return Record(image.name, 0.001, 0, 0, 0, 0.001, asyncio.get_running_loop().time())

    async def stuck(image: BenchImage) -> Record:
        await asyncio.sleep(60)
        raise AssertionError("never answered")

    phase = asyncio.run(closed_loop(fast, images, 3, requests=10, duration_s=30))
    assert len(phase.records) == 10 and phase.cancelled == 0 and phase.errors == 0
    assert {r.image for r in phase.records} == {"a", "b"}
    phase = asyncio.run(closed_loop(stuck, images, 4, requests=100, duration_s=0.2))
    assert len(phase.records) == 0 and phase.cancelled == 4 and phase.wall_s < 5


def test_a_window_that_answered_cheap_images_is_not_credited_with_the_mix_mean() -> None:
    from bench.report import answered_flops, mix_rate

    results = {"mixes": {"m": {"flops": {"a": 10.0, "b": 30.0}, "flops_per_image": 20.0}}}
    level = {"images_per_s": 4.0, "answered_by_image": {"a": 3, "b": 1}}
    assert answered_flops(results, "m", level) == pytest.approx(15.0)
    assert mix_rate(results, "m", level) == pytest.approx(3.0)  # 4 img/s x 15 / 20
