"""Converters from the published MUSIQ checkpoints to the project format.

Two sources (MUSIQ_SPEC section 3):
- the official Flax `.npz` files: flat '/'-separated parameter paths under a prefix such as
  `opt/target/`, kernels in HWIO / (in, heads, head_dim) layouts;
- the PyTorch port's `.pth` state dicts (chaofengc/IQA-PyTorch), already in torch layouts.

Both are matched by structure and shape rather than by exact names alone: the prefix is found, the
attention / LayerNorm / MLP modules of each encoder block are recognised by what they contain, and
the network config (width, depth, heads, MLP size, patch size, grid, scales, head) is inferred from
the shapes. Every source tensor must be used and every target tensor filled; otherwise the
conversion fails with a report that lists each problem. Numpy only, except reading a `.pth`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import Checkpoint, default_score_range, expected_shapes, file_sha256
from model.config import HeadKind, MusiqConfig

OFFICIAL_LONGER_SIDES = (224, 384)
_ROOT_NAMES = ("conv_root", "gn_root", "block1", "embedding", "Transformer", "head", "pre_logits")


class ConversionError(ValueError):
    """The source could not be mapped completely; `report` lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"cannot convert {source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


@dataclass
class ConversionReport:
    """What a conversion did: target <- source (+ transform), and what it skipped."""

    mapped: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{t:<48} <- {s} {shape}" for t, s, shape in self.mapped]
        if self.ignored:
            out.append(f"ignored {len(self.ignored)} non-parameter entries: {', '.join(self.ignored[:8])}")
        return out


@dataclass(frozen=True)
class Overrides:
    """What the weights cannot tell: choices a user may pass on the command line."""

    num_heads: int | None = None  # the .pth layout merges heads; 6 is the official value
    longer_sides: tuple[int, ...] | None = None
    head: HeadKind | None = None
    name: str | None = None
    version: str = "1"
    score_range: tuple[float, float] | None = None


class _Source:
    """Source tensors by name; records which ones a mapping consumed."""

    def __init__(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.tensors = dict(tensors)
        self.used: set[str] = set()

    def take(self, name: str) -> np.ndarray:
        self.used.add(name)
        return np.asarray(self.tensors[name], dtype=np.float32)

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


class _Mapper:
    """Collects target tensors, checking each against the expected shape."""

    def __init__(self, source: _Source, report: ConversionReport) -> None:
        self.src = source
        self.report = report
        self.out: dict[str, np.ndarray] = {}

    def put(
        self, target: str, name: str | None, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a
    ) -> None:
        if name is None or name not in self.src.tensors:
            self.report.problems.append(
                f"no source tensor for {target} (looked for {name or 'a matching module'})"
            )
            return
        value = np.ascontiguousarray(fn(self.src.take(name)), dtype=np.float32)
        self.out[target] = value
        self.report.mapped.append((target, name, tuple(self.src.tensors[name].shape)))

    def check(self, config: MusiqConfig | None) -> None:
        """Reports misshapen or missing targets (when the config is known) and unused sources."""
        for k, shape in expected_shapes(config).items() if config else ():
            if k in self.out and self.out[k].shape != shape:
                src = next((s for t, s, _ in self.report.mapped if t == k), "?")
                self.report.problems.append(
                    f"{k}: source {src} gives shape {self.out[k].shape}, expected {shape} for the inferred config"
                )
            elif k not in self.out and not any(k in p for p in self.report.problems):
                self.report.problems.append(f"no source tensor for {k} {shape}")
        for name in self.src.unused():
            self.report.problems.append(
                f"unmapped source tensor {name} {tuple(self.src.tensors[name].shape)}"
            )


# --------------------------------------------------------------------------- official Flax .npz


def _param_subtree(keys: list[str]) -> tuple[str, list[str]]:
    """Finds the prefix under which the model parameters live (e.g. 'opt/target/').

    Real training checkpoints also hold optimizer state whose paths repeat the parameter names
    (e.g. 'opt/state/param_states/...'), so the prefix that explains the most keys wins, and a
    prefix containing 'target' or 'params' wins ties.
    """
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split("/")
        for i, part in enumerate(parts):
            if part in _ROOT_NAMES:
                prefix = "/".join(parts[:i])
                prefix = prefix + "/" if prefix else ""
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        return "", []

    def rank(p: str) -> tuple[int, int, int]:
        return counts[p], int("target" in p or "params" in p), -len(p)

    best = max(counts, key=rank)
    ignored = [k for k in keys if not k.startswith(best)]
    return best, ignored


def _children(paths: list[str], parent: str) -> dict[str, list[str]]:
    """Immediate child module names under `parent/` and the leaf paths under each."""
    out: dict[str, list[str]] = {}
    for p in paths:
        if p.startswith(parent + "/"):
            rest = p[len(parent) + 1 :]
            if "/" in rest:
                out.setdefault(rest.split("/", 1)[0], []).append(p)
    return out


def _suffix_index(name: str) -> int:
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else -1


def _flax_block_parts(paths: list[str], block: str) -> dict[str, str | None]:
    """Recognises a Flax encoder block's modules by content, whatever they are called."""
    kids = _children(paths, block)
    leafs = {name: {p.rsplit("/", 1)[-1] for p in ps} for name, ps in kids.items()}
    attn = [
        n for n, ps in kids.items() if {"query", "key", "value", "out"} <= set(_children(ps, f"{block}/{n}"))
    ]
    norms = sorted((n for n, ls in leafs.items() if ls == {"scale", "bias"}), key=_suffix_index)
    mlps = [n for n, ps in kids.items() if len(_children(ps, f"{block}/{n}")) == 2 and n not in attn]
    return {
        "attention": attn[0] if len(attn) == 1 else None,
        "norm1": norms[0] if len(norms) == 2 else None,
        "norm2": norms[1] if len(norms) == 2 else None,
        "mlp": mlps[0] if len(mlps) == 1 else None,
    }


def _infer_patch_size(features: int, encoder: str) -> int:
    per_cell = {"resnet": 256, "conv": 64}.get(encoder)
    if per_cell is None:
        p = math.isqrt(features // 3)
        return p if 3 * p * p == features else -1
    cells = features // per_cell
    side = math.isqrt(cells)
    return 4 * side if side * side * per_cell == features else -1


def _infer_head(num_outputs: int, override: HeadKind | None) -> HeadKind:
    if override:
        return override
    if num_outputs == 1:
        return "score"
    return "classes" if num_outputs >= 100 else "distribution"


def _longer_sides(num_scales: int, override: tuple[int, ...] | None, problems: list[str]) -> tuple[int, ...]:
    if override is not None:
        if len(override) + 1 != num_scales:
            problems.append(
                f"--longer-sides gives {len(override)} resized scales but the scale embedding has {num_scales} rows "
                f"({num_scales - 1} resized scales + native)"
            )
        return override
    if num_scales == 3:
        return OFFICIAL_LONGER_SIDES
    if num_scales == 1:
        return ()
    problems.append(f"the scale embedding has {num_scales} rows; pass the resized longer sides explicitly")
    return tuple(range(num_scales - 1))


def convert_official(
    tensors: Mapping[str, np.ndarray], overrides: Overrides = Overrides()
) -> tuple[MusiqConfig, dict[str, np.ndarray], ConversionReport]:
    """Maps an official Flax parameter set to the project layout and infers its config."""
    report = ConversionReport()
    prefix, report.ignored = _param_subtree(sorted(tensors))
    params = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    src = _Source(params)
    m = _Mapper(src, report)
    paths = sorted(params)
    problems = report.problems

    def has(p: str) -> bool:
        return p in params

    encoder = (
        "resnet" if has("block1/unit1/conv1/kernel") else "conv" if has("conv_root/kernel") else "linear"
    )
    if "embedding/kernel" not in params or "Transformer/encoder_norm/scale" not in params:
        problems.append(
            "no 'embedding/kernel' or 'Transformer/encoder_norm' found: not a MUSIQ parameter set"
        )
        raise ConversionError("official checkpoint", problems)
    features, hidden = params["embedding/kernel"].shape
    blocks = sorted(
        {n for n in _children(paths, "Transformer") if re.fullmatch(r"encoderblock_\d+", n)},
        key=_suffix_index,
    )
    if [_suffix_index(b) for b in blocks] != list(range(len(blocks))):
        problems.append(f"encoder blocks are not numbered 0..n-1: {blocks}")

    # Leaf transforms from Flax layouts to torch layouts.
    hwio = lambda a: a.transpose(3, 2, 0, 1)  # noqa: E731
    flat = lambda a: a.reshape(-1)  # noqa: E731
    dense = lambda a: a.T  # noqa: E731
    heads_in = lambda a: a.reshape(a.shape[0], -1).T  # (D, H, dh) -> (H*dh, D)  # noqa: E731
    heads_out = lambda a: a.reshape(-1, a.shape[-1]).T  # (H, dh, D) -> (D, H*dh)  # noqa: E731

    if encoder in ("resnet", "conv"):
        m.put("patch_encoder.root.conv.weight", "conv_root/kernel", hwio)
        m.put("patch_encoder.root.norm.weight", "gn_root/scale", flat)
        m.put("patch_encoder.root.norm.bias", "gn_root/bias", flat)
    if encoder == "resnet":
        for conv, gn in [("conv_proj", "gn_proj"), ("conv1", "gn1"), ("conv2", "gn2"), ("conv3", "gn3")]:
            m.put(f"patch_encoder.block.{conv}.weight", f"block1/unit1/{conv}/kernel", hwio)
            m.put(f"patch_encoder.block.{gn}.weight", f"block1/unit1/{gn}/scale", flat)
            m.put(f"patch_encoder.block.{gn}.bias", f"block1/unit1/{gn}/bias", flat)
    m.put("patch_encoder.embedding.weight", "embedding/kernel", dense)
    m.put("patch_encoder.embedding.bias", "embedding/bias")

    # Embeddings and CLS: by name, else by shape among the Transformer's own parameters.
    own = {p: params[p].shape for p in paths if p.startswith("Transformer/") and "encoderblock_" not in p}

    def find(name: str, test: Callable[[tuple[int, ...]], bool]) -> str | None:
        if name in params:
            return name
        hits = [p for p, s in own.items() if test(s) and "encoder_norm" not in p]
        return hits[0] if len(hits) == 1 else None

    pos = find("Transformer/posembed_input/pos_embedding", lambda s: len(s) == 3 and s[1] > 3 and s[0] == 1)
    scl = find("Transformer/scaleembed_input/scale_embedding", lambda s: len(s) == 3 and 1 < s[1] <= 8)
    cls = find("Transformer/cls", lambda s: s == (1, 1, hidden))
    m.put("pos_embedding", pos, lambda a: a.reshape(-1, a.shape[-1]))
    m.put("scale_embedding", scl, lambda a: a.reshape(-1, a.shape[-1]))
    m.put("cls", cls)

    heads, mlp = overrides.num_heads, 0
    for i, block in enumerate(blocks):
        parts = _flax_block_parts(paths, f"Transformer/{block}")
        for role, module in parts.items():
            if module is None:
                problems.append(f"Transformer/{block}: cannot identify its {role} module")
        t, base = f"blocks.{i}", f"Transformer/{block}"
        for norm in ("norm1", "norm2"):
            mod = parts[norm]
            m.put(f"{t}.{norm}.weight", mod and f"{base}/{mod}/scale")
            m.put(f"{t}.{norm}.bias", mod and f"{base}/{mod}/bias")
        att = parts["attention"]
        if att:
            qk = params[f"{base}/{att}/query/kernel"]
            if qk.ndim == 3:
                heads = heads or qk.shape[1]
                if qk.shape[1] != heads:
                    problems.append(f"{base}/{att}: {qk.shape[1]} heads, expected {heads}")
        for proj in ("query", "key", "value"):
            m.put(f"{t}.attention.{proj}.weight", att and f"{base}/{att}/{proj}/kernel", heads_in)
            m.put(f"{t}.attention.{proj}.bias", att and f"{base}/{att}/{proj}/bias", flat)
        m.put(f"{t}.attention.out.weight", att and f"{base}/{att}/out/kernel", heads_out)
        m.put(f"{t}.attention.out.bias", att and f"{base}/{att}/out/bias")
        mod = parts["mlp"]
        if mod:
            dense_names = sorted(_children(paths, f"{base}/{mod}"), key=_suffix_index)
            mlp = params[f"{base}/{mod}/{dense_names[0]}/kernel"].shape[-1]
            for fc, dn in zip(("fc1", "fc2"), dense_names, strict=True):
                m.put(f"{t}.mlp.{fc}.weight", f"{base}/{mod}/{dn}/kernel", dense)
                m.put(f"{t}.mlp.{fc}.bias", f"{base}/{mod}/{dn}/bias")
    m.put("encoder_norm.weight", "Transformer/encoder_norm/scale")
    m.put("encoder_norm.bias", "Transformer/encoder_norm/bias")
    m.put("head.weight", "head/kernel", dense)
    m.put("head.bias", "head/bias")

    config = _build_config(
        problems,
        overrides,
        hidden=hidden,
        layers=len(blocks),
        heads=heads or 6,
        mlp=mlp,
        features=features,
        encoder=encoder,
        grid_rows=params[pos].shape[1] if pos else 100,
        num_scales=params[scl].shape[1] if scl else 3,
        num_outputs=params["head/kernel"].shape[-1] if has("head/kernel") else 1,
    )
    m.check(config)
    if problems:
        raise ConversionError("official checkpoint", problems)
    assert config is not None
    return config, m.out, report


def _build_config(problems: list[str], overrides: Overrides, **f: Any) -> MusiqConfig | None:
    """The config implied by the shapes, or None (with the reasons added to `problems`)."""
    known = len(problems)
    grid = math.isqrt(f["grid_rows"])
    if grid * grid != f["grid_rows"]:
        problems.append(f"spatial embedding has {f['grid_rows']} rows, not a square grid")
    patch = _infer_patch_size(f["features"], f["encoder"])
    if patch < 0:
        problems.append(
            f"embedding input width {f['features']} fits no patch size for a {f['encoder']} encoder"
        )
    if f["hidden"] % f["heads"]:
        problems.append(f"hidden size {f['hidden']} is not divisible by {f['heads']} heads")
    head = _infer_head(f["num_outputs"], overrides.head)
    sides = _longer_sides(f["num_scales"], overrides.longer_sides, problems)
    if len(problems) > known:
        return None
    try:
        return MusiqConfig(
            hidden_size=f["hidden"],
            num_layers=f["layers"],
            num_heads=f["heads"],
            mlp_dim=f["mlp"],
            patch_size=patch,
            grid_size=grid,
            longer_sides=sides,
            patch_encoder=f["encoder"],
            head=head,
            num_outputs=f["num_outputs"],
        )
    except ValueError as exc:
        problems.append(f"inferred config is invalid: {exc}")
        return None


# --------------------------------------------------------------------------- PyTorch port .pth

_PYIQA_RULES: list[tuple[str, str]] = [
    (r"conv_root\.weight", "patch_encoder.root.conv.weight"),
    (r"gn_root\.(weight|bias)", r"patch_encoder.root.norm.\1"),
    (r"block1\.(conv\w+|gn\w+)\.(weight|bias)", r"patch_encoder.block.\1.\2"),
    (r"embedding\.(weight|bias)", r"patch_encoder.embedding.\1"),
    (r"transformer_encoder\.cls", "cls"),
    (r"transformer_encoder\.posembed_input\.\w+", "pos_embedding"),
    (r"transformer_encoder\.scaleembed_input\.\w+", "scale_embedding"),
    (r"transformer_encoder\.encoder_norm\.(weight|bias)", r"encoder_norm.\1"),
    (
        r"transformer_encoder\.transformer\.encoderblock_(\d+)\.(norm1|norm2|attention\.\w+|mlp\.fc[12])\.(weight|bias)",
        r"blocks.\1.\2.\3",
    ),
    (r"head(?:\.0)?\.(weight|bias)", r"head.\1"),
]


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """A plain name -> array dict from what torch.load returned (unwrapping {'params': ...} etc.)."""
    for key in ("params", "params_ema", "state_dict", "model", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ConversionError("PyTorch checkpoint", [f"expected a state dict, found {type(obj).__name__}"])
    return {
        k: v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
        for k, v in obj.items()
    }


def convert_pyiqa(
    tensors: Mapping[str, np.ndarray], overrides: Overrides = Overrides()
) -> tuple[MusiqConfig, dict[str, np.ndarray], ConversionReport]:
    """Maps the PyTorch port's state dict to the project layout and infers its config."""
    report = ConversionReport()
    problems = report.problems
    src = _Source(tensors)
    m = _Mapper(src, report)
    targets: dict[str, str] = {}
    for name in sorted(tensors):
        bare = re.sub(r"^(module\.)+", "", name)  # DataParallel / DDP wrappers
        for pattern, repl in _PYIQA_RULES:
            if re.fullmatch(pattern, bare):
                target = re.sub(pattern, repl, bare)
                if target in targets:
                    problems.append(f"{name} and {targets[target]} both map to {target}")
                targets[target] = name
                break
    reshape_rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    for target, name in sorted(targets.items()):
        m.put(target, name, reshape_rows if target in ("pos_embedding", "scale_embedding") else lambda a: a)

    out = m.out
    if "patch_encoder.embedding.weight" not in out or "encoder_norm.weight" not in out:
        problems.append(
            "no 'embedding.weight' or 'transformer_encoder.encoder_norm' found: not a MUSIQ state dict"
        )
        raise ConversionError("PyTorch checkpoint", problems + [f"unmapped {n}" for n in src.unused()])
    hidden = out["patch_encoder.embedding.weight"].shape[0]
    encoder = (
        "resnet"
        if "patch_encoder.block.conv1.weight" in out
        else "conv"
        if "patch_encoder.root.conv.weight" in out
        else "linear"
    )
    layers = len({t.split(".")[1] for t in out if t.startswith("blocks.")})
    config = _build_config(
        problems,
        overrides,
        hidden=hidden,
        layers=layers,
        heads=overrides.num_heads or 6,
        mlp=out["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in out else 0,
        features=out["patch_encoder.embedding.weight"].shape[1],
        encoder=encoder,
        grid_rows=out["pos_embedding"].shape[0] if "pos_embedding" in out else 100,
        num_scales=out["scale_embedding"].shape[0] if "scale_embedding" in out else 3,
        num_outputs=out["head.weight"].shape[0] if "head.weight" in out else 1,
    )
    m.check(config)
    if problems:
        raise ConversionError("PyTorch checkpoint", problems)
    assert config is not None
    return config, m.out, report


# --------------------------------------------------------------------------- files


def _default_name(path: Path) -> str:
    stem = path.stem.split("-")[0]
    stem = re.sub(r"^musiq_", "", stem)
    return re.sub(r"_ckpt$", "", stem) or "musiq"


def convert_file(
    kind: str, src: str | os.PathLike[str], overrides: Overrides = Overrides()
) -> tuple[Checkpoint, ConversionReport]:
    """Reads a published checkpoint file ('official' .npz or 'pyiqa' .pth) and converts it."""
    path = Path(src)
    if not path.is_file():
        raise ConversionError(str(path), [f"no such file: {path}"])
    if kind == "official":
        try:
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ConversionError(str(path), [f"not a readable .npz file ({exc})"]) from exc
        config, weights, report = convert_official(tensors, overrides)
    elif kind == "pyiqa":
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConversionError(str(path), ["reading a .pth needs torch: pip install '.[export]'"]) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise ConversionError(str(path), [f"not a readable PyTorch checkpoint ({exc})"]) from exc
        config, weights, report = convert_pyiqa(unwrap_state_dict(obj), overrides)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected 'official' or 'pyiqa'")
    checkpoint = Checkpoint(
        config=config,
        tensors=weights,
        name=overrides.name or _default_name(path),
        version=overrides.version,
        score_range=overrides.score_range or default_score_range(config),
        source=f"{kind}:{path.name} sha256:{file_sha256(path)}",
    )
    return checkpoint, report
