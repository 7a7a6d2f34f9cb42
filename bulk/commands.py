"""`musiq bulk SRC... --output OUT`: score folders, files or path lists into a Parquet dataset on Ray."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bulk",
        help="score many images on Ray Data into a Parquet dataset (docs/bulk.md)",
        description=(
            "Scores every image the sources name into OUT, a folder of Parquet parts with one row per "
            "input (image, score, distribution, model, model_version, tokens, error). Same model, "
            "packing and error codes as the server. Needs the `bulk` extra (ray[data])."
        ),
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="folders (recursive), image files, or .txt / .parquet lists of paths; local or pyarrow.fs URIs",
    )
    p.add_argument("--output", "-o", required=True, help="output folder (local or a pyarrow.fs URI)")
    p.add_argument("--model", type=Path, help="ONNX file (default: the embedded model, as the server)")
    p.add_argument(
        "--address", help="Ray cluster to join (e.g. ray://head:10001, auto); default: a local one"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="images in one inference batch (default: 1 on CPUs, the server's 64 on GPUs)",
    )
    p.add_argument(
        "--max-native-tokens",
        type=int,
        help="cap on native-resolution tokens (default: the server's default cap)",
    )
    p.add_argument("--resume", action="store_true", help="skip inputs already in OUT and add the rest")
    p.add_argument(
        "--part-rows",
        type=int,
        default=64,
        help="rows per output part (one actor call; the unit that resume saves) (default: 64)",
    )
    p.add_argument(
        "--actors",
        type=int,
        help="inference actors (default: one per GPU, else one per --cpus-per-actor CPUs)",
    )
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPU actors: CPUs each reserves, and its ONNX Runtime threads (default: 1)",
    )
    p.add_argument(
        "--decode",
        choices=("auto", "tasks", "actors"),
        default="auto",
        help="where decoding and packing run: their own CPU tasks, or the scoring actors "
        "(default: tasks with GPUs, actors on CPUs alone)",
    )
    p.add_argument("--num-cpus", type=int, help="local cluster only: CPUs Ray may use (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is printed)")
    p.set_defaults(handler=cmd_bulk)


def cmd_bulk(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("ray is not installed: pip install 'musiq-service[bulk]' (ray[data])")
    from bulk.pipeline import BulkOptions, init_ray, progress_bar, run
    from bulk.sources import done_images, expand_sources, part_files, remove_temporary
    from service.settings import EMBEDDED_ONNX

    for name in ("batch_size", "part_rows", "actors"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.cpus_per_actor <= 0:
        raise ValueError("--cpus-per-actor must be > 0")
    model = args.model or EMBEDDED_ONNX
    if not model.is_file():
        raise ValueError(f"no such model file: {model}")
    inputs = expand_sources(args.sources)
    if not inputs:
        raise ValueError("no image files found in " + ", ".join(args.sources))
    skipped = 0
    if args.resume:
        removed = remove_temporary(args.output)
        done = done_images(args.output)
        kept = [i for i in inputs if i.image not in done]
        skipped = len(inputs) - len(kept)
        inputs = kept
        print(
            f"musiq bulk: resuming {args.output}: {skipped} inputs already done, {len(inputs)} to score"
            + (f" ({removed} unfinished part files removed)" if removed else ""),
            file=sys.stderr,
        )
    elif part_files(args.output):
        raise ValueError(
            f"{args.output} already holds output parts: pass --resume to continue it, or choose another folder"
        )
    options = BulkOptions(
        model=model,
        output=args.output,
        batch_size=args.batch_size,
        max_native_tokens=args.max_native_tokens,
        part_rows=args.part_rows,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        decode=args.decode,
    )
    init_kwargs = {"num_cpus": args.num_cpus} if args.num_cpus and not args.address else {}
    if inputs:
        init_ray(args.address, **init_kwargs)
    bar = progress_bar(len(inputs), enabled=not args.no_progress and sys.stderr.isatty())
    try:
        summary = run(inputs, options, skipped=skipped, on_progress=bar.update)
    finally:
        bar.close()
        if inputs:
            import ray

            ray.shutdown()
    print(f"musiq bulk: {summary.line()}", file=sys.stderr)
    return 0
