"""`musiq export`."""

from __future__ import annotations

import argparse
import json
import math


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="export a checkpoint to a verified ONNX file (fp32, fp16 or int8)",
        description="Trace, fuse and verify against PyTorch; the file is written only if every check passes.",
    )
    e.add_argument("--checkpoint", required=True, help="project checkpoint (.safetensors)")
    e.add_argument("-o", "--output", required=True, help="output .onnx path")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    e.add_argument("--opset", type=int, default=17, help="ai.onnx opset (default 17)")
    e.add_argument(
        "--rollout", action="store_true", help="also write NAME.rollout.onnx with the CLS attention rollout"
    )
    e.add_argument(
        "--split",
        action="store_true",
        help="also write NAME.features.onnx and NAME.head.onnx, the halves a CPU server runs faster "
        "(fp32, or int8: an int8 head after fp32 convolutions)",
    )
    e.add_argument(
        "--rollout-weights",
        choices=["fp32", "fp16"],
        default="fp32",
        help="store the rollout graph's weights in fp16 (half the file; still computes in fp32)",
    )
    e.add_argument(
        "--min-int8-srcc", type=float, default=0.995, help="refuse int8 below this SRCC against fp32"
    )
    e.add_argument("--photos", type=int, help="use only the first N of the 56 check photos (faster)")
    e.add_argument(
        "--tolerance",
        type=_positive_float,
        metavar="ABS",
        help="largest fp32 ONNX-vs-PyTorch output difference accepted, absolute (default: "
        "max(1e-4, 2e-5 x the largest |score| in the checks); the bound used is printed and recorded)",
    )
    e.set_defaults(handler=cmd_export)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def cmd_export(args: argparse.Namespace) -> int:
    from export.exporter import export_checkpoint
    from export.photos import distorted_photos

    result = export_checkpoint(
        args.checkpoint,
        args.output,
        precision=args.precision,
        opset=args.opset,
        rollout=args.rollout,
        rollout_weights=args.rollout_weights,
        split=args.split,
        min_int8_srcc=args.min_int8_srcc,
        photos=distorted_photos(limit=args.photos),
        tolerance=args.tolerance,
    )
    print(
        json.dumps(
            {
                "path": str(result.path),
                "rollout": str(result.rollout_path) if result.rollout_path else None,
                "split": [str(p) for p in result.split_paths] if result.split_paths else None,
                "fused": result.fused,
                "parity": result.metadata.parity,
            }
        )
    )
    return 0
