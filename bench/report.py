"""results.json -> BENCHMARK.md (tables, the five targets) and latency-vs-throughput PNG plots.

Every number in the report is computed here from the measured figures; `targets` is a pure
function of the results dict so the tests check its arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.stats import roofline_fraction, roofline_images_per_s

TARGETS = {
    "rest_vs_pyiqa": 0.8,  # end-to-end REST p50 (c=1) / pyiqa bare forward, same image: at most
    "fp32_roofline": 0.85,  # fp32 saturation throughput / fp32 roofline: at least
    "int8_vs_pyiqa": 2.5,  # int8 saturation throughput / pyiqa throughput: at least
    "int8_srcc": 0.995,  # int8 vs fp32 on real photos: at least
    "padding_mixed": 0.9,  # padding efficiency on the mixed load: at least
    "overhead": 0.10,  # (REST latency - inference) / inference at c=1: at most
}


def answered_flops(results: dict[str, Any], mix: str, level: dict[str, Any]) -> float:
    """Mean FLOPs per answered image of a level: in a short window of a mixed load the cheap
    images are answered more often than the round-robin mean would say."""
    counts = level.get("answered_by_image") or {}
    flops = results["mixes"][mix]["flops"]
    total = sum(counts.values())
    if not total:
        return results["mixes"][mix]["flops_per_image"]
    return sum(flops[name] * n for name, n in counts.items()) / total


def mix_rate(results: dict[str, Any], mix: str, level: dict[str, Any]) -> float:
    """A level's images/s converted to round-robin images of the mix (same FLOP rate)."""
    return (
        level["images_per_s"] * answered_flops(results, mix, level) / results["mixes"][mix]["flops_per_image"]
    )


def saturation(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep level with the highest throughput."""
    return max(sweep, key=lambda e: e["images_per_s"])


def pyiqa_images_per_s(results: dict[str, Any], mix: str) -> float:
    """pyiqa's throughput on a mix, serial batch-1 forwards (how pyiqa is used), round-robin."""
    times = [results["pyiqa"]["forward_s"][im["name"]] for im in results["mixes"][mix]["images"]]
    return len(times) / sum(times)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, mix, precision): measured value, goal, met?"""
    rows: list[dict[str, Any]] = []
    peak = results["sgemm"]["gflops"]
    has_pyiqa = "pyiqa" in results
    for mix, served in results["service"].get("fp32", {}).items():
        sat = saturation(served["sweep"])
        flops = answered_flops(results, mix, sat)
        rows.append(
            _row(
                "fp32 throughput / fp32 roofline",
                mix,
                "fp32",
                roofline_fraction(flops, sat["images_per_s"], peak),
                TARGETS["fp32_roofline"],
                ">=",
                f"{sat['images_per_s']:.2f} img/s at c={sat['concurrency']} vs roofline "
                f"{roofline_images_per_s(flops, peak):.2f} img/s",
            )
        )
    for precision, mixes in results["service"].items():
        for mix, served in mixes.items():
            c1 = served["rest_c1"]
            infer = c1["server_median_s"]["infer_s"]
            rows.append(
                _row(
                    "(REST latency - inference) / inference, c=1",
                    mix,
                    precision,
                    c1["overhead_median_s"] / infer if infer else math.nan,
                    TARGETS["overhead"],
                    "<=",
                    f"medians: decode {c1['server_median_s']['decode_s'] * 1e3:.1f} ms, pack "
                    f"{c1['server_median_s']['pack_s'] * 1e3:.1f} ms, queue {c1['server_median_s']['queue_s'] * 1e3:.1f} ms, "
                    f"inference {infer * 1e3:.1f} ms",
                )
            )
            if has_pyiqa:
                for name, p50 in sorted(c1["per_image_p50_s"].items()):
                    ref = results["pyiqa"]["forward_s"][name]
                    rows.append(
                        _row(
                            "REST p50 (c=1) / pyiqa forward, same image",
                            f"{mix}: {name}",
                            precision,
                            p50 / ref,
                            TARGETS["rest_vs_pyiqa"],
                            "<=",
                            f"{p50 * 1e3:.0f} ms vs {ref * 1e3:.0f} ms",
                        )
                    )
            if has_pyiqa and precision == "int8":
                sat = saturation(served["sweep"])
                ref = pyiqa_images_per_s(results, mix)
                ours = mix_rate(results, mix, sat)
                rows.append(
                    _row(
                        "int8 throughput / pyiqa throughput",
                        mix,
                        precision,
                        ours / ref,
                        TARGETS["int8_vs_pyiqa"],
                        ">=",
                        f"{ours:.2f} vs {ref:.2f} img/s (round-robin mix)",
                    )
                )
            if mix == "mixed":
                eff = served["sweep_batching"]["padding_efficiency"]
                rows.append(
                    _row(
                        "padding efficiency (sweep)", mix, precision, eff, TARGETS["padding_mixed"], ">=", ""
                    )
                )
    srcc = results.get("int8_parity", {}).get("srcc")
    if srcc is not None:
        rows.append(
            _row(
                "int8 SRCC vs fp32 (56 real photos, exporter)",
                "photos",
                "int8",
                srcc,
                TARGETS["int8_srcc"],
                ">=",
                "",
            )
        )
    return rows


def _row(
    name: str, mix: str, precision: str, value: float, goal: float, op: str, note: str
) -> dict[str, Any]:
    met = value >= goal if op == ">=" else value <= goal
    return {
        "target": name,
        "mix": mix,
        "precision": precision,
        "value": value,
        "goal": f"{op} {goal:g}",
        "met": bool(met),
        "note": note,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark: this service vs pyiqa, and the fp32 roofline",
        "",
        f"One run of `musiq bench{' --quick' if results.get('quick') else ''}` ({results['wall_s'] / 60:.1f} min): {m['cpus']} CPUs, {m['processor']}, "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])}. Official-size model (27.1 M, random weights), "
        f"full native resolution (no token cap). sgemm: {results['sgemm']['gflops']:.1f} GFLOP/s "
        f"({results['sgemm']['engine']}, 2048^3 float32, measured in this run).",
    ]
    if "pyiqa" in results:
        p = results["pyiqa"]
        lines.append(
            f"pyiqa: MUSIQ arch, {p['parameters']:,} parameters, torch {p['torch']}, {p['threads']} threads, "
            "batch 1, median of the timed runs."
        )
    lines += ["", "## Targets", "", "| target | mix / image | precision | measured | goal | met | note |"]
    lines.append("|---|---|---|---:|---|---|---|")
    for r in targets(results):
        lines.append(
            f"| {r['target']} | {r['mix']} | {r['precision']} | {r['value']:.3f} | {r['goal']} | "
            f"{'yes' if r['met'] else '**no**'} | {r['note']} |"
        )
    lines += ["", "## Forward time per image (batch 1, median)", ""]
    lines += [
        "Tokens: official layout (real patches); GFLOP: real patches only. ORT columns: the compact",
        "sequence the service computes (padding rows dropped), and in brackets the official layout.",
        "",
    ]
    header = "| mix | image | tokens | GFLOP | pyiqa ms |"
    precisions = list(results["ort"])
    header += "".join(f" ORT {p} ms |" for p in precisions) + " decode + pack ms |"
    lines += [header, "|---" * (5 + len(precisions) + 1) + "|"]
    for mix, info in results["mixes"].items():
        for im in info["images"]:
            name = im["name"]
            py = results.get("pyiqa", {}).get("forward_s", {}).get(name)
            first = results["ort"][precisions[0]][mix][name]
            row = (
                f"| {mix} | {name} ({im['width']}x{im['height']}) | {im['tokens']} ({im.get('valid', im['tokens'])}) | "
                f"{info['flops'][name] / 1e9:.1f} | "
            )
            row += f"{py * 1e3:.0f} |" if py else "- |"
            for p in precisions:
                o = results["ort"][p][mix][name]
                row += f" {o['forward_s'] * 1e3:.1f} ({o.get('forward_full_s', math.nan) * 1e3:.1f}) |"
            row += f" {(first['decode_s'] + first['pack_s']) * 1e3:.1f} |"
            lines.append(row)
    lines += [
        "",
        "## Service, concurrency 1 (p50 / p99 ms)",
        "",
        "| precision | mix | REST | gRPC |",
        "|---|---|---|---|",
    ]
    for precision, mixes in results["service"].items():
        for mix, s in mixes.items():
            r, g = s["rest_c1"]["latency"], s["grpc_c1"]["latency"]
            lines.append(
                f"| {precision} | {mix} | {r['p50'] * 1e3:.1f} / {r['p99'] * 1e3:.1f} | {g['p50'] * 1e3:.1f} / {g['p99'] * 1e3:.1f} |"
            )
    lines += [
        "",
        "## REST sweep (closed loop; latency of requests answered inside each level's window)",
        "",
        "| precision | mix | clients | img/s | of roofline | p50 ms | p99 ms | mean batch | padding eff. | answered | cut off |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peak = results["sgemm"]["gflops"]
    for precision, mixes in results["service"].items():
        for mix, s in mixes.items():
            for e in s["sweep"]:
                flops = answered_flops(results, mix, e)
                b = e["batching"]
                lines.append(
                    f"| {precision} | {mix} | {e['concurrency']} | {e['images_per_s']:.2f} | "
                    f"{roofline_fraction(flops, e['images_per_s'], peak):.0%} | {e['latency']['p50'] * 1e3:.0f} | "
                    f"{e['latency']['p99'] * 1e3:.0f} | {b['mean_batch_size']:.2f} | {b['padding_efficiency']:.3f} | "
                    f"{e['completed']} | {e['cancelled']} |"
                )
    lines += ["", "## Batching over each sweep (from the service's /metrics)", ""]
    lines += [
        "| precision | mix | padding eff. | batches | batch sizes | batch tokens |",
        "|---|---|---:|---:|---|---|",
    ]
    for precision, mixes in results["service"].items():
        for mix, s in mixes.items():
            b = s["sweep_batching"]
            sizes = ", ".join(f"{k}: {v}" for k, v in b["batch_size_distribution"])
            tokens = ", ".join(f"{k}: {v}" for k, v in b["batch_tokens_distribution"])
            lines.append(
                f"| {precision} | {mix} | {b['padding_efficiency']:.3f} | {b['batches']:.0f} | {sizes} | {tokens} |"
            )
    lines += ["", "Plots: " + ", ".join(f"`latency_vs_throughput_{mix}.png`" for mix in results["mixes"]), ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per mix: p50 and p99 latency against throughput, one line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mix in results["mixes"]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for precision, mixes in results["service"].items():
            sweep = mixes[mix]["sweep"]
            x = [e["images_per_s"] for e in sweep]
            color = None
            for q, style in (("p50", "-o"), ("p99", "--x")):
                (line,) = ax.plot(
                    x, [e["latency"][q] * 1e3 for e in sweep], style, color=color, label=f"{precision} {q}"
                )
                color = line.get_color()  # p99 in the colour of its precision's p50
            for e in sweep:
                ax.annotate(
                    str(e["concurrency"]),
                    (e["images_per_s"], e["latency"]["p50"] * 1e3),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        if "pyiqa" in results:
            ax.axvline(pyiqa_images_per_s(results, mix), color="grey", ls=":", label="pyiqa throughput")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(f"MUSIQ service, {mix} (labels: concurrent clients)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"latency_vs_throughput_{mix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(results: dict[str, Any], out: Path) -> Path:
    path = out / "BENCHMARK.md"
    path.write_text(markdown(results))
    plots(results, out)
    return path
