"""`musiq score`: score image files and folders, one JSON line (or CSV row) per image.

By default it scores with ONNX Runtime through the server's own code path (`service.offline`:
`prepare_image` with padding rows dropped, the server's default native-token cap, `ModelRuntime`
with the server's session options and batching limits), on the embedded `default.onnx` or on
`--model FILE.onnx`: its scores are those `/v1/score` and `musiq bulk` give for the same bytes.
PyTorch and ONNX Runtime differ by up to ~6e-5 on the 0-100 scale (float32 rounding,
`bench/score_agreement.py`), so a CLI on PyTorch could not promise that.

`--checkpoint FILE.safetensors` scores a checkpoint that has no ONNX export yet, in PyTorch (on the
full official rows, with the checkpoint's own native-token cap). Its imports (torch) are made only
there, so the default path runs on a serving install without torch.

Why here and not in model/: the default path needs service/, and model/ never imports service/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from model.commands import IMAGE_SUFFIXES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "score",
        help="score images or folders of images (JSON lines or CSV)",
        description=(
            "Scores images with ONNX Runtime as the server does (the embedded model, or --model "
            "FILE.onnx): the same scores as /v1/score and musiq bulk. --checkpoint scores a "
            ".safetensors checkpoint in PyTorch instead (needs torch)."
        ),
    )
    s.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    s.add_argument(
        "--format", choices=["jsonl", "csv"], default="jsonl", help="output format (default jsonl)"
    )
    s.add_argument("-o", "--output", help="write here instead of stdout")
    s.add_argument("--rank", action="store_true", help="sort by score, best first, with a rank column")
    model = s.add_mutually_exclusive_group()
    model.add_argument(
        "--model", help="exported ONNX file, as the server loads it (default: the embedded model)"
    )
    model.add_argument(
        "--checkpoint", help="project checkpoint (.safetensors), scored in PyTorch (needs torch)"
    )
    s.add_argument(
        "--max-native-tokens",
        type=int,
        help="cap native-resolution tokens (default: the server's cap, 512, or the model's if lower; "
        "with --checkpoint: the checkpoint's)",
    )
    s.set_defaults(handler=cmd_score)


def expand_images(inputs: list[str]) -> list[str]:
    """Files as given; folders become their image files (recursive, sorted)."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            out.append(item)
    return out


Record = dict[str, object]


def cmd_score(args: argparse.Namespace) -> int:
    images = expand_images(args.images)
    if args.checkpoint:
        records = score_checkpoint(args.checkpoint, images, args.max_native_tokens)
    else:
        records = score_onnx(onnx_model(args.model), images, args.max_native_tokens)
    if not images:
        raise ValueError("no image files found in " + ", ".join(args.images))
    streaming = not args.rank and args.format == "jsonl" and not args.output  # print as we go
    from tqdm import tqdm

    done: list[Record] = []
    failures = 0
    progress = tqdm(
        total=len(images), desc="scoring", unit="img", disable=len(images) < 2 or streaming, file=sys.stderr
    )
    with progress:
        for image, record in zip(images, records, strict=True):
            progress.update()
            if isinstance(record, str):  # the image's error line (above the progress bar)
                progress.write(f"musiq score: {image}: {record}", file=sys.stderr)
                failures += 1
            elif streaming:
                print(json.dumps(record), flush=True)
            else:
                done.append(record)
    if not streaming:
        write_records(done, args.format, args.output, rank=args.rank)
    return 1 if failures else 0


def onnx_model(given: str | None) -> Path:
    """The ONNX file to score with: `--model`, else the embedded model; a clear error if neither."""
    from service.settings import EMBEDDED_ONNX

    if given is None:
        if not EMBEDDED_ONNX.is_file():
            raise ValueError(
                "no embedded default model in this build; pass --model FILE.onnx "
                "(`musiq export`) or --checkpoint FILE.safetensors"
            )
        return EMBEDDED_ONNX
    path = Path(given)
    if path.suffix.lower() in (".safetensors", ".pth", ".npz"):
        raise ValueError(f"{path} is a checkpoint, not an ONNX file: pass it as --checkpoint")
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    return path


def score_onnx(model: Path, images: list[str], max_native_tokens: int | None) -> Iterator[Record | str]:
    """A record per image, or its error line `CODE: message` with the REST API's error code.

    The model loads (and a bad file or cap fails) before the first image. One image per
    inference, as a server with one client runs it: on CPU a batch costs about the sum of its
    images (`service.runtime.DeviceDefaults`), and the output streams in order."""
    from service.errors import ScoringError
    from service.offline import batcher_config, packing_for, prepare_file, score_packed
    from service.runtime import ModelRuntime

    runtime = ModelRuntime(model)  # the server's default session options
    packing = packing_for(runtime.packing, max_native_tokens)
    config = batcher_config(runtime)  # its token budget refuses what the server's batcher refuses

    def records() -> Iterator[Record | str]:
        for image in images:
            try:
                prepared = prepare_file(image, packing)
            except ScoringError as exc:
                yield f"{exc.code}: {exc.message}"
                continue
            (prediction,) = score_packed(runtime, [prepared.compute], config)
            if isinstance(prediction, str):
                yield f"{prediction}: {prepared.compute.num_tokens} tokens exceed the batch budget"
                continue
            record: Record = {"image": image, "score": round(prediction.score, 6)}
            if prediction.distribution is not None:
                record["distribution"] = [round(v, 6) for v in prediction.distribution]
            yield record

    return records()


def score_checkpoint(
    checkpoint_path: str, images: list[str], max_native_tokens: int | None
) -> Iterator[Record | str]:
    """PyTorch on a checkpoint's full official rows; a record per image, or its error line.
    Scores differ from the server's by the runtimes' float rounding (up to ~6e-5)."""
    from model.checkpoint import load_named_or_default

    checkpoint = load_named_or_default(checkpoint_path)
    try:
        import torch
    except ImportError:
        raise ValueError(
            "--checkpoint scores in PyTorch, which this installation lacks: pass the exported "
            "model instead (--model FILE.onnx, from `musiq export`), or install torch"
        ) from None

    from model.decode import ImageDecodeError, decode_image
    from model.network import build_model
    from model.packing import collate, pack

    model = build_model(checkpoint)
    head = checkpoint.config.head
    packing = checkpoint.config.packing(max_native_tokens)

    def records() -> Iterator[Record | str]:
        for image in images:
            try:
                packed = pack(decode_image(image), packing)
            except ImageDecodeError as exc:
                yield str(exc)
                continue
            batch = collate([packed])
            inputs = [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
            with torch.inference_mode():
                output = model(*inputs)
            record: Record = {"image": image}
            if head != "classes":
                record["score"] = round(float(model.score(output)[0]), 6)
            if head == "distribution":
                record["distribution"] = [round(float(v), 6) for v in output.softmax(-1)[0]]
            if head == "classes":
                record["logits"] = [round(float(v), 6) for v in output[0]]
            yield record

    return records()


def write_records(records: list[Record], fmt: str, output: str | None, *, rank: bool) -> None:
    if rank:
        # A record's values are typed object; its score is a float.
        records = sorted(records, key=lambda r: -float(cast(float, r.get("score", float("-inf")))))
        records = [{"rank": i, **r} for i, r in enumerate(records, start=1)]
    buf = io.StringIO()
    if fmt == "jsonl":
        buf.writelines(json.dumps(r) + "\n" for r in records)
    else:
        columns = [c for c in ("rank", "image", "score") if any(c in r for r in records)]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[r.get(c, "") for c in columns] for r in records])
    if output:
        Path(output).write_text(buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
