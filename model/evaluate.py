"""Image-quality evaluation: the correlation metrics IQA papers report, with bootstrap intervals.

MUSIQ's published numbers are SRCC and PLCC against the mean opinion scores (MOS). Comparisons are
only fair when everyone computes them the same way, so this module follows the conventions of
the IQA literature (VQEG Phase I / II reports):

* SRCC (Spearman, average ranks for ties) and KRCC (Kendall tau-b) measure monotonicity and
  ignore any monotone rescaling of the predictions.
* PLCC is reported twice. `plcc` is the raw Pearson correlation; `plcc_logistic` is Pearson after
  mapping the predictions to the MOS scale with a fitted 4-parameter logistic, the VQEG
  procedure, which removes the penalty for a prediction that is monotone but not linear in MOS.
  `rmse_logistic` is the RMSE of that mapped prediction; `rmse` is the raw one (meaningful only
  when the model was trained on the same MOS scale).
* Each metric comes with a percentile-bootstrap interval from resampling the images with
  replacement: a 0.01 difference in SRCC between two models on 1000 images is often noise.

numpy and scipy only (matplotlib is imported inside `scatter_plot`): evaluating a CSV of scores
needs no torch.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

METRICS: tuple[str, ...] = ("srcc", "krcc", "plcc", "plcc_logistic", "rmse", "rmse_logistic")
LABELS: dict[str, str] = {
    "srcc": "SRCC",
    "krcc": "KRCC",
    "plcc": "PLCC",
    "plcc_logistic": "PLCC (logistic)",
    "rmse": "RMSE",
    "rmse_logistic": "RMSE (logistic)",
}

# curve_fit's default budget (200 * (n + 1) evaluations for 4 parameters) gives up too early on
# badly scaled predictions; a fit costs milliseconds, so be generous.
MAXFEV = 20_000
# Fewer points than this cannot pin four parameters meaningfully; a straight line is used instead.
MIN_LOGISTIC_POINTS = 5
# Bootstrap resamples are evaluated in blocks of about this many values per array (~16 MB of
# float64), so memory stays flat whatever n_boot and n are.
BOOT_BLOCK_VALUES = 2_000_000


def _pair(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    m = np.asarray(mos, dtype=np.float64)
    if p.ndim != 1 or m.ndim != 1:
        raise ValueError(f"pred and mos must be 1-D, got shapes {p.shape} and {m.shape}")
    if p.shape != m.shape:
        raise ValueError(f"pred and mos differ in length: {p.shape[0]} vs {m.shape[0]}")
    if p.size == 0:
        raise ValueError("no scores to evaluate")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise ValueError("pred and mos must be finite (found nan or inf)")
    return p, m


def _logistic4_curve(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / abs(b4))) + b2


def logistic4(x: Any, params: Sequence[float] | np.ndarray) -> np.ndarray:
    """The mapping fitted by `logistic4_fit`, applied to predictions `x`.

    Four parameters: f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (VQEG). Two parameters
    are the straight-line fallback: f(x) = slope * x + intercept.
    """
    x = np.asarray(x, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    if params.shape == (2,):
        line: np.ndarray = params[0] * x + params[1]
        return line
    if params.shape != (4,):
        raise ValueError(f"expected 4 logistic parameters (or 2 linear ones), got shape {params.shape}")
    return _logistic4_curve(x, *params)


def _linear_fit(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Least-squares line; a constant (mean MOS) when the predictions do not vary."""
    if pred.size < 2 or pred.max() == pred.min():
        return np.array([0.0, float(mos.mean())])
    slope, intercept = np.polyfit(pred, mos, 1)
    return np.array([float(slope), float(intercept)])


def logistic4_fit(pred: Any, mos: Any, *, p0: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Fits the VQEG 4-parameter logistic mapping predictions to MOS; returns [b1, b2, b3, b4].

    Initial values: b1 = max(mos), b2 = min(mos) (swapped when the predictions correlate
    negatively with MOS, so the fit starts on the right branch), b3 = mean(pred),
    b4 = std(pred) / 4, or 1 for constant predictions; `p0` overrides them (the bootstrap warm
    starts from the full-set fit). When the fit cannot be made (fewer than MIN_LOGISTIC_POINTS
    points, constant predictions, no convergence, non-finite parameters) the result is the
    least-squares line [slope, intercept] instead, which `logistic4` also accepts: an
    evaluation should report a slightly less flattering PLCC rather than crash.
    """
    pred, mos = _pair(pred, mos)
    if pred.size < MIN_LOGISTIC_POINTS or pred.max() == pred.min():
        return _linear_fit(pred, mos)
    if p0 is None:
        hi, lo = float(mos.max()), float(mos.min())
        if _pearson(pred[None], mos[None])[0] < 0:
            hi, lo = lo, hi
        spread = float(pred.std()) / 4.0
        p0 = [hi, lo, float(pred.mean()), spread if spread > 0 else 1.0]
    try:
        with warnings.catch_warnings():
            # OptimizeWarning: covariance not estimable (flat data); RuntimeWarning: exp overflow
            # while the optimiser explores. Neither makes the fitted curve wrong.
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            params, _ = optimize.curve_fit(_logistic4_curve, pred, mos, p0=list(p0), maxfev=MAXFEV)
    except (RuntimeError, ValueError, TypeError, np.linalg.LinAlgError):
        return _linear_fit(pred, mos)
    fitted = np.asarray(params, dtype=np.float64)
    if not np.isfinite(fitted).all() or fitted[3] == 0 or not np.isfinite(logistic4(pred, fitted)).all():
        return _linear_fit(pred, mos)
    return fitted


def _constant_rows(x: np.ndarray) -> np.ndarray:
    # Exact test on the raw values: after centring, float rounding leaves tiny non-zero residues
    # in a constant row, which would turn into a meaningless correlation instead of nan.
    constant: np.ndarray = x.max(axis=-1) == x.min(axis=-1)
    return constant


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of [k, n] arrays; nan where either row is constant."""
    da = a - a.mean(axis=-1, keepdims=True)
    db = b - b.mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r: np.ndarray = (da * db).sum(axis=-1) / np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1))
    r = np.clip(r, -1.0, 1.0)
    r[_constant_rows(a) | _constant_rows(b)] = np.nan
    return r


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation (Pearson of average ranks, as scipy.stats.spearmanr)."""
    return _pearson(stats.rankdata(a, axis=-1), stats.rankdata(b, axis=-1))


def _kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Kendall tau-b; scipy's O(n log n) algorithm per row (the bootstrap's slow part)."""
    out = np.full(a.shape[0], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for i in range(a.shape[0]):
            if a.shape[1] >= 2:
                try:
                    out[i] = stats.kendalltau(a[i], b[i], method="asymptotic").statistic
                except ZeroDivisionError:  # scipy's variance term for tiny, tied samples (n = 2)
                    out[i] = np.nan
    return out


def _rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rmse: np.ndarray = np.sqrt(np.mean((a - b) ** 2, axis=-1))
    return rmse


def _all_metrics(pred: np.ndarray, mos: np.ndarray, mapped: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of [k, n] arrays (`mapped` = logistic-mapped predictions)."""
    return {
        "srcc": _spearman(pred, mos),
        "krcc": _kendall(pred, mos),
        "plcc": _pearson(pred, mos),
        "plcc_logistic": _pearson(mapped, mos),
        "rmse": _rmse(pred, mos),
        "rmse_logistic": _rmse(mapped, mos),
    }


def iqa_metrics(
    pred: Any,
    mos: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    refit_logistic: bool = False,
) -> dict[str, Any]:
    """SRCC, KRCC, PLCC, logistic PLCC, RMSE and logistic RMSE of predictions against MOS.

    Returns {metric: {"value", "lo", "hi"}} for each name in METRICS, plus "n" (images),
    "n_boot" and "ci". [lo, hi] is the percentile bootstrap interval at level `ci`: `n_boot`
    resamples of the image indices with replacement (seeded, so reruns agree); resamples where a
    metric is undefined (a constant resample) are left out of its percentiles. `n_boot=0` skips
    the bootstrap (lo = hi = nan).

    By default the logistic is fitted once on the full set and the same mapping is applied
    inside every resample. Refitting per resample would also count the mapping's own
    uncertainty, but costs a nonlinear least-squares fit per resample (seconds for 1000 of them
    on a large set) and the occasional non-converging resample; the mapping is a nuisance
    parameter, so its variation is small next to the sampling variation of the correlation.
    `refit_logistic=True` refits anyway (warm-started from the full-set parameters).

    Degenerate inputs do not raise: correlations of constant predictions (or constant MOS) are
    nan, and a logistic that cannot be fitted falls back to a straight line (`logistic4_fit`).
    """
    pred, mos = _pair(pred, mos)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n = pred.size
    params = logistic4_fit(pred, mos)
    mapped = logistic4(pred, params)
    point = _all_metrics(pred[None], mos[None], mapped[None])

    boot: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    rng = np.random.default_rng(seed)
    block = max(1, BOOT_BLOCK_VALUES // n)
    done = 0
    while done < n_boot:
        k = min(block, n_boot - done)
        idx = rng.integers(0, n, size=(k, n))
        p, m = pred[idx], mos[idx]
        if refit_logistic and params.shape == (4,):
            mapped_k = np.stack([logistic4(p[i], logistic4_fit(p[i], m[i], p0=params)) for i in range(k)])
        else:
            mapped_k = mapped[idx]
        for name, values in _all_metrics(p, m, mapped_k).items():
            boot[name].append(values)
        done += k

    q_lo, q_hi = 100.0 * (1.0 - ci) / 2.0, 100.0 * (1.0 + ci) / 2.0
    result: dict[str, Any] = {}
    for name in METRICS:
        lo = hi = math.nan
        if n_boot:
            samples = np.concatenate(boot[name])
            samples = samples[np.isfinite(samples)]
            if samples.size:
                lo, hi = (float(v) for v in np.percentile(samples, [q_lo, q_hi]))
        result[name] = {"value": float(point[name][0]), "lo": lo, "hi": hi}
    result["n"] = int(n)
    result["n_boot"] = int(n_boot)
    result["ci"] = float(ci)
    return result


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """A Markdown table of `iqa_metrics` output: metric, value, bootstrap interval."""
    level = metrics.get("ci", 0.95)
    lines = [
        f"| metric | value | {100 * level:g}% CI |",
        "|:--|--:|:--|",
    ]
    for name in METRICS:
        if name not in metrics:
            continue
        m = metrics[name]
        interval = (
            ""
            if not (math.isfinite(m["lo"]) and math.isfinite(m["hi"]))
            else f"[{m['lo']:.4f}, {m['hi']:.4f}]"
        )
        lines.append(f"| {LABELS[name]} | {_fmt(m['value'])} | {interval} |")
    if "n" in metrics:
        lines.append(f"| n | {metrics['n']} | |")
    return "\n".join(lines)


def scatter_plot(
    pred: Any,
    mos: Any,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Saves a PNG of predicted score vs MOS with the fitted logistic curve.

    SRCC and PLCC appear in the legend (from `metrics` if given, else computed without the
    bootstrap). Uses matplotlib's object API on the Agg canvas, never pyplot: no global figure
    state, no display needed, safe to call from any thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pred, mos = _pair(pred, mos)
    if metrics is None:
        metrics = iqa_metrics(pred, mos, n_boot=0)
    params = logistic4_fit(pred, mos)
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    srcc, plcc = _fmt(metrics["srcc"]["value"]), _fmt(metrics["plcc"]["value"])
    ax.scatter(pred, mos, s=8, alpha=0.5, linewidths=0, label=f"{pred.size} images: SRCC {srcc}, PLCC {plcc}")
    grid = np.linspace(pred.min(), pred.max(), 256)
    fit = "logistic fit" if params.shape == (4,) else "linear fit"
    label = f"{fit}: PLCC {_fmt(metrics['plcc_logistic']['value'])}" if "plcc_logistic" in metrics else fit
    ax.plot(grid, logistic4(grid, params), color="C3", linewidth=2, label=label)
    ax.set_xlabel("predicted score")
    ax.set_ylabel("MOS")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
