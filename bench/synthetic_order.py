"""Does a model order graded distortions of the same photo? Pairwise order accuracy on held-out photos.

The check of issue 17: pristine photos the pretraining never trains on (every tenth photo,
`model.distortions.split_photos`), each distorted by blur, noise, JPEG and darkening at four graded
strengths (`CHECK`). Within one photo and one distortion, every pair of strengths should be scored
in order (milder = better): 6 pairs per photo and kind. A model's accuracy is the share of pairs
it orders right (ties count half), overall and per kind, with a 95 % bootstrap interval over
photos; the JPEG row also gets each pair of qualities on its own (where the old default failed).

The strengths are not the training levels (`model.distortions.STRENGTHS`): JPEG 60 and 25 fall
between levels, so the check also asks whether a model interpolates.

    python -m bench.synthetic_order make                      # the images + index.csv (runs/)
    python -m bench.synthetic_order score --name default      # the embedded model
    python -m bench.synthetic_order score --checkpoint runs/x/best.safetensors --name x
    .venv-brisque/bin/python bench/synthetic_order.py brisque # BRISQUE (numpy<2: its own venv)
    python -m bench.synthetic_order report                    # bench/results/synthetic_order.md + .png

`make synthetic-order` runs all of it for the default model and BRISQUE.
"""

from __future__ import annotations

import argparse
import csv
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

OUT = Path("runs/synthetic_order")
RESULTS = Path("bench/results")

# kind -> (distortion kind in model.distortions, four strengths from mildest to worst)
CHECK: dict[str, tuple[str, tuple[float, ...]]] = {
    "blur": ("gaussian_blur", (0.8, 1.6, 3.0, 5.0)),  # Gaussian sigma, pixels
    "noise": ("gaussian_noise", (5.0, 10.0, 20.0, 35.0)),  # sigma, 0..255 units
    "jpeg": ("jpeg", (60, 25, 10, 3)),  # encoder quality
    "darkening": ("brightness_down", (0.5, 1.0, 1.5, 2.25)),  # exposure stops, linear light
}


def make(out: Path, photo_roots: list[Path] | None = None) -> None:
    """Writes the distorted held-out photos as PNG (lossless: the check sees the distortion only).

    `photo_roots` come before `default_roots()`, as a training recipe's `photos` do, so a machine
    without ../shared/data (a lent GPU, with BSDS500 carried elsewhere) holds out the same photos.
    """
    from PIL import Image
    from tqdm import tqdm

    from model.decode import decode_image
    from model.distortions import apply_strength, photo_split

    _, photos = photo_split(photo_roots or [])
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p, photo in enumerate(tqdm(photos, desc="distorting", unit="photo")):
        image = decode_image(photo)
        for kind, (name, strengths) in CHECK.items():
            for rank, strength in enumerate(strengths):
                # One seed per photo and kind: the noise pattern is the same at every strength.
                rng = np.random.default_rng((p, list(CHECK).index(kind)))
                path = out / "images" / f"{p:03d}_{kind}_{rank}.png"
                if not path.exists():
                    Image.fromarray(apply_strength(image, name, strength, rng)).save(path, compress_level=1)
                rows.append(
                    {
                        "image": path.name,
                        "photo": p,
                        "source": photo.name,
                        "kind": kind,
                        "rank": rank,
                        "strength": strength,
                    }
                )
    with (out / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} images of {len(photos)} held-out photos -> {out}")


def read_index(out: Path) -> list[dict[str, str]]:
    path = out / "index.csv"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m bench.synthetic_order make` first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_scores(out: Path, name: str, images: list[str], quality: list[float]) -> None:
    """`quality` is higher-is-better (BRISQUE's score is stored negated)."""
    (out / "scores").mkdir(exist_ok=True)
    with (out / "scores" / f"{name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "quality"])
        writer.writerows(zip(images, quality, strict=True))
    print(f"{len(images)} scores -> {out / 'scores' / (name + '.csv')}")


def score_musiq(out: Path, checkpoint: str | None, name: str, max_native_tokens: int, flip: bool) -> None:
    """Scores with the PyTorch network at the server's native-token cap; `flip`: the mean of each
    image's score and its mirror's (test-time flip averaging, two forwards an image)."""
    from model.checkpoint import load_named_or_default
    from model.network import build_model
    from model.scoring import flip_averaged, score_images

    ckpt = load_named_or_default(checkpoint)
    model = build_model(ckpt).eval()
    packing = ckpt.config.packing(max_native_tokens)
    images = [r["image"] for r in read_index(out)]
    paths = [out / "images" / im for im in images]
    scores = (flip_averaged if flip else score_images)(model, paths, packing=packing, progress=True)
    write_scores(out, name, images, [float(v) for v in scores])


def score_brisque(out: Path) -> None:
    from brisque import BRISQUE
    from PIL import Image

    model = BRISQUE(url=False)
    images = [r["image"] for r in read_index(out)]
    quality = []
    for k, im in enumerate(images):
        quality.append(-float(model.score(np.asarray(Image.open(out / "images" / im).convert("RGB")))))
        if k % 100 == 0:
            print(f"brisque {k}/{len(images)}", file=sys.stderr)
    write_scores(out, "brisque", images, quality)


def pair_outcomes(
    index: list[dict[str, str]], quality: dict[str, float]
) -> dict[tuple[str, int, int], np.ndarray]:
    """(kind, milder rank, worse rank) -> per-photo outcome: 1 ordered right, 0.5 tie, 0 wrong."""
    by_key: dict[tuple[str, int], dict[int, float]] = {}
    for r in index:
        by_key.setdefault((r["kind"], int(r["photo"])), {})[int(r["rank"])] = quality[r["image"]]
    photos = sorted({int(r["photo"]) for r in index})
    outcomes = {}
    for kind in CHECK:
        for a, b in combinations(range(len(CHECK[kind][1])), 2):
            diff = np.array([by_key[(kind, p)][a] - by_key[(kind, p)][b] for p in photos])
            outcomes[(kind, a, b)] = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    return outcomes


def accuracy(
    outcomes: dict[tuple[str, int, int], np.ndarray], kinds: list[str], n_boot: int = 1000
) -> tuple[float, float, float]:
    """Mean over pairs, with a percentile bootstrap over photos (a photo's pairs move together)."""
    per_photo = np.stack([v for (k, _, _), v in outcomes.items() if k in kinds], 1)  # [photos, pairs]
    rng = np.random.default_rng(0)
    boots = [per_photo[rng.integers(0, len(per_photo), len(per_photo))].mean() for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(per_photo.mean()), float(lo), float(hi)


def report(out: Path, names: list[str], md: Path) -> None:
    index = read_index(out)
    if not names:
        names = sorted(p.stem for p in (out / "scores").glob("*.csv"))
    results = {}
    for name in names:
        with (out / "scores" / f"{name}.csv").open(newline="") as f:
            quality = {r["image"]: float(r["quality"]) for r in csv.DictReader(f)}
        results[name] = pair_outcomes(index, quality)
    n_photos = len({r["photo"] for r in index})
    fmt = lambda a: f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]"  # noqa: E731
    lines = [
        "# Synthetic order: graded distortions of held-out photos",
        "",
        f"{n_photos} held-out photos (every tenth of BSDS500 + the wheel photos, never trained on) x "
        f"{len(CHECK)} distortions x 4 strengths; 6 pairs per photo and distortion. Share of pairs "
        "ordered right (ties half), 95 % bootstrap interval over photos. "
        "Reproduce: `make synthetic-order` (`bench/synthetic_order.py`).",
        "",
        "| model | overall | "
        + " | ".join(f"{k} ({', '.join(f'{s:g}' for s in CHECK[k][1])})" for k in CHECK)
        + " |",
        "|---|---|" + "---|" * len(CHECK),
    ]
    for name, outcomes in results.items():
        lines.append(
            f"| {name} | {fmt(accuracy(outcomes, list(CHECK)))} | "
            + " | ".join(fmt(accuracy(outcomes, [k])) for k in CHECK)
            + " |"
        )
    q = CHECK["jpeg"][1]
    pairs = list(combinations(range(len(q)), 2))
    lines += [
        "",
        "JPEG, each pair of qualities (share of photos ordered right):",
        "",
        "| model | " + " | ".join(f"{q[a]:g} > {q[b]:g}" for a, b in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for name, outcomes in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{outcomes[('jpeg', a, b)].mean():.2f}" for a, b in pairs) + " |"
        )
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, md.with_suffix(".png"))


def plot(results: dict[str, dict[tuple[str, int, int], np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["overall", *CHECK]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (name, outcomes) in enumerate(results.items()):
        accs = [accuracy(outcomes, list(CHECK) if g == "overall" else [g]) for g in groups]
        x = np.arange(len(groups)) + i * width
        ax.bar(
            x,
            [a[0] for a in accs],
            width,
            label=name,
            yerr=np.array([[a[0] - a[1] for a in accs], [a[2] - a[0] for a in accs]]),
            capsize=3,
        )
    ax.axhline(0.975, color="grey", ls="--", lw=1)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set(ylim=(0.5, 1.0), ylabel="pairs ordered right", title="Synthetic order on held-out photos")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"work folder (default {OUT})")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the distorted held-out photos and index.csv")
    m.add_argument("--photos", type=Path, action="append", help="photo folder before the default ones")
    s = sub.add_parser("score", help="score them with a MUSIQ checkpoint (PyTorch)")
    s.add_argument("--checkpoint", help="project checkpoint (default: the embedded model)")
    s.add_argument("--name", required=True, help="column name in the report")
    s.add_argument("--max-native-tokens", type=int, default=512, help="the server's default cap")
    s.add_argument("--flip", action="store_true", help="average each image's score with its mirror's")
    sub.add_parser("brisque", help="score them with BRISQUE (run in .venv-brisque)")
    r = sub.add_parser("report", help="order accuracies, markdown and plot")
    r.add_argument("names", nargs="*", help="score files to compare (default: all)")
    r.add_argument("--md", type=Path, default=RESULTS / "synthetic_order.md")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.photos)
    elif args.command == "score":
        score_musiq(args.out, args.checkpoint, args.name, args.max_native_tokens, args.flip)
    elif args.command == "brisque":
        score_brisque(args.out)
    else:
        report(args.out, args.names, args.md)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
