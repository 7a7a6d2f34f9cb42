"""The project's checkpoint format: one safetensors file with weights, config and model card.

A checkpoint is self-describing: besides the tensors (named as `model.network.Musiq`'s state dict,
float32) its header carries the network config, the packing settings, the score range and a name
and version, so exporters and servers need nothing else. Reading and writing are numpy-only
(`safetensors.numpy`): converting a published checkpoint or inspecting one never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from model.config import MusiqConfig, PackingConfig

FORMAT = "musiq-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable project checkpoint; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    config: MusiqConfig
    tensors: dict[str, np.ndarray]
    name: str = "musiq"
    version: str = "0"
    score_range: tuple[float, float] = (0.0, 100.0)
    source: str = ""  # where the weights came from (e.g. "official:koniq_ckpt.npz sha256:...")
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def packing(self) -> PackingConfig:
        return self.config.packing()


def default_score_range(config: MusiqConfig) -> tuple[float, float]:
    """Bins 1..K for a distribution head; the 0..100 MOS scale of KonIQ/SPAQ/PaQ-2-PiQ otherwise."""
    if config.head == "distribution":
        return 1.0, float(config.num_outputs)
    return 0.0, 100.0


def expected_shapes(config: MusiqConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for `config` must hold, with its shape.

    Lets numpy-only code (converters, the server) validate a checkpoint without building the
    torch module; a test keeps it equal to `Musiq(config).state_dict()`.
    """
    d, p = config.hidden_size, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embedding": (config.grid_size**2, d),
        "scale_embedding": (config.num_scales, d),
        "cls": (1, 1, d),
    }
    cells = (p // 4) ** 2
    if config.patch_encoder in ("resnet", "conv"):
        shapes["patch_encoder.root.conv.weight"] = (64, 3, 7, 7)
        shapes["patch_encoder.root.norm.weight"] = (64,)
        shapes["patch_encoder.root.norm.bias"] = (64,)
    if config.patch_encoder == "resnet":
        for conv, cin, cout, k in [
            ("conv_proj", 64, 256, 1),
            ("conv1", 64, 64, 1),
            ("conv2", 64, 64, 3),
            ("conv3", 64, 256, 1),
        ]:
            shapes[f"patch_encoder.block.{conv}.weight"] = (cout, cin, k, k)
            gn = "gn_proj" if conv == "conv_proj" else f"gn{conv[-1]}"
            shapes[f"patch_encoder.block.{gn}.weight"] = (cout,)
            shapes[f"patch_encoder.block.{gn}.bias"] = (cout,)
    features = {"resnet": cells * 256, "conv": cells * 64, "linear": p * p * 3}[config.patch_encoder]
    shapes["patch_encoder.embedding.weight"] = (d, features)
    shapes["patch_encoder.embedding.bias"] = (d,)
    for i in range(config.num_layers):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{b}.{norm}.weight"] = (d,)
            shapes[f"{b}.{norm}.bias"] = (d,)
        for proj in ("query", "key", "value", "out"):
            shapes[f"{b}.attention.{proj}.weight"] = (d, d)
            shapes[f"{b}.attention.{proj}.bias"] = (d,)
        shapes[f"{b}.mlp.fc1.weight"] = (config.mlp_dim, d)
        shapes[f"{b}.mlp.fc1.bias"] = (config.mlp_dim,)
        shapes[f"{b}.mlp.fc2.weight"] = (d, config.mlp_dim)
        shapes[f"{b}.mlp.fc2.bias"] = (d,)
    shapes["encoder_norm.weight"] = (d,)
    shapes["encoder_norm.bias"] = (d,)
    shapes["head.weight"] = (config.num_outputs, d)
    shapes["head.bias"] = (config.num_outputs,)
    return shapes


def validate_tensors(config: MusiqConfig, tensors: dict[str, np.ndarray]) -> None:
    """Raises CheckpointError listing every missing, unexpected or misshapen tensor."""
    expected = expected_shapes(config)
    problems = [f"missing {k} {v}" for k, v in expected.items() if k not in tensors]
    problems += [f"unexpected {k} {tuple(tensors[k].shape)}" for k in tensors if k not in expected]
    problems += [
        f"shape of {k}: {tuple(tensors[k].shape)}, expected {v}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    ]
    problems += [f"non-finite values in {k}" for k, v in tensors.items() if not np.isfinite(v).all()]
    if problems:
        raise CheckpointError("checkpoint does not fit its config:\n  " + "\n  ".join(problems))


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Writes atomically (temp file + rename) so an interrupted save never leaves a torn file."""
    validate_tensors(checkpoint.config, checkpoint.tensors)
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": checkpoint.config.to_json(),
        "packing": json.dumps(checkpoint.packing.to_dict(), sort_keys=True),
        "name": checkpoint.name,
        "version": checkpoint.version,
        "score_range": json.dumps(list(checkpoint.score_range)),
        "source": checkpoint.source,
        "extra": json.dumps(checkpoint.extra, sort_keys=True),
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in checkpoint.tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header, and where its data section starts (the tensors' offsets
    count from there), without reading the tensors."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise CheckpointError(f"{path} is not a safetensors file")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a safetensors file ({exc})") from exc
    return header, 8 + size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a project checkpoint, without reading the tensors."""
    header, _ = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {FORMAT} file (convert published weights with `musiq convert` first)"
        )
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta['format_version']}; this build reads {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    meta = read_metadata(path)
    try:
        config = MusiqConfig.from_dict(json.loads(meta["config"]))
        score_range = tuple(float(v) for v in json.loads(meta["score_range"]))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({exc})") from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from exc
    validate_tensors(config, tensors)
    return Checkpoint(
        config=config,
        tensors=tensors,
        name=meta.get("name", "musiq"),
        version=meta.get("version", "0"),
        score_range=(score_range[0], score_range[1]),
        source=meta.get("source", ""),
        extra=extra,
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


EMBEDDED_DEFAULT = Path(__file__).parent / "weights" / "default.safetensors"


def default_checkpoint_path() -> Path | None:
    """The model shipped inside the package, if this build carries one."""
    return EMBEDDED_DEFAULT if EMBEDDED_DEFAULT.is_file() else None


def load_named_or_default(path: str | os.PathLike[str] | None) -> Checkpoint:
    """The checkpoint a command was given, else the embedded default model, else a clear error."""
    path = path or default_checkpoint_path()
    if path is None:
        raise CheckpointError(
            "no embedded default model in this build; pass --checkpoint FILE "
            "(convert published weights with `musiq convert`)"
        )
    return load_checkpoint(path)
