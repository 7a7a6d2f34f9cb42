"""`musiq pack` and `musiq convert`. (`musiq score` lives in cli/score.py: it scores through the
service's runtime by default, and model/ never imports service/.)

Heavy imports (torch) happen inside the handlers that need them, so packing and conversion run
on a serving install that has no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from model.checkpoint import save_checkpoint
from model.config import PackingConfig
from model.decode import ImageDecodeError, decode_image
from model.packing import pack


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack an image into official MUSIQ token rows (.npz)")
    p.add_argument("image", help="image file (any format Pillow reads)")
    p.add_argument("-o", "--output", required=True, help="output .npz path")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--grid-size", type=int, default=10)
    p.add_argument("--longer-sides", type=int, nargs="*", default=[224, 384], metavar="L")
    p.add_argument("--max-native-tokens", type=int, default=-1, help="-1 keeps every native patch")
    p.set_defaults(handler=cmd_pack)

    c = sub.add_parser("convert", help="convert a published checkpoint to the project format")
    c.add_argument(
        "kind", choices=["official", "pyiqa"], help="official Flax .npz or the PyTorch port's .pth"
    )
    c.add_argument("source", help="checkpoint file to convert")
    c.add_argument("-o", "--output", required=True, help="output .safetensors path")
    c.add_argument("--name", help="model name (default: from the file name, e.g. 'koniq')")
    c.add_argument("--model-version", default="1", help="model version string (default: 1)")
    c.add_argument("--num-heads", type=int, help="attention heads (a .pth cannot tell; default 6)")
    c.add_argument(
        "--longer-sides", type=int, nargs="*", metavar="L", help="resized scales (default 224 384)"
    )
    c.add_argument(
        "--head", choices=["score", "distribution", "classes"], help="head kind (default: inferred)"
    )
    c.add_argument("--score-range", type=float, nargs=2, metavar=("MIN", "MAX"))
    c.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    c.set_defaults(handler=cmd_convert)


def cmd_pack(args: argparse.Namespace) -> int:
    config = PackingConfig(args.patch_size, args.grid_size, tuple(args.longer_sides), args.max_native_tokens)
    try:
        packed = pack(decode_image(args.image), config)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{args.image}: {exc}", reason=exc.reason) from exc
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        tokens=packed.official_rows(),
        patch_size=np.int32(config.patch_size),
        grid_size=np.int32(config.grid_size),
        longer_sides=np.asarray(config.longer_sides, np.int32),
        max_native_tokens=np.int32(config.max_native_tokens),
        packing=np.asarray(json.dumps(config.to_dict())),
    )
    shapes = ", ".join(
        f"scale {s.scale_id}: {s.width}x{s.height} -> {s.valid}/{s.length}" for s in packed.layout
    )
    print(
        f"{args.image}: {packed.num_tokens} tokens ({packed.num_valid} valid; {shapes}) -> {out}",
        file=sys.stderr,
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from model.convert import Overrides, convert_file

    overrides = Overrides(
        num_heads=args.num_heads,
        longer_sides=tuple(args.longer_sides) if args.longer_sides is not None else None,
        head=args.head,
        name=args.name,
        version=args.model_version,
        score_range=tuple(args.score_range) if args.score_range else None,
    )
    checkpoint, report = convert_file(args.kind, args.source, overrides)
    if not args.quiet:
        for line in report.lines():
            print(line)
    path = save_checkpoint(checkpoint, args.output)
    cfg = checkpoint.config
    print(
        f"converted {len(report.mapped)} tensors -> {path}: {cfg.num_layers} layers, D={cfg.hidden_size}, "
        f"{cfg.num_heads} heads, MLP {cfg.mlp_dim}, P={cfg.patch_size}, G={cfg.grid_size}, "
        f"scales {list(cfg.longer_sides)} + native, {cfg.patch_encoder} encoder, {cfg.head} head "
        f"({cfg.num_outputs} outputs), name {checkpoint.name!r}"
    )
    return 0


# The image files `musiq score` and `musiq bulk` take from a folder.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".ppm", ".avif"}
