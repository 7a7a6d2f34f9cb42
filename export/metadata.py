"""What an exported ONNX file says about itself (its `metadata_props`).

The server configures itself from the file alone: packing settings, head, score range, names,
provenance and the parity figures measured when the file was written. Values are strings in ONNX;
lists and dicts are stored as JSON. No torch, no onnx: `from_props` takes the plain dict that
`onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map` returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import PackingConfig

PREFIX = "musiq."
SCHEMA_VERSION = 1
INPUT_NAMES = ("patches", "spatial", "scale", "mask")
# Set by `export.external` on a file whose weights are external data in a checkpoint: JSON
# {"location": path relative to the ONNX file's folder, "sha256": that file's sha256 when linked}.
LINKED_CHECKPOINT = PREFIX + "linked_checkpoint"


class MetadataError(ValueError):
    """An ONNX file without (complete) MUSIQ metadata."""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str
    patch_size: int
    grid_size: int
    longer_sides: tuple[int, ...]
    max_native_tokens: int
    head: str
    num_outputs: int
    score_range: tuple[float, float]
    precision: str  # fp32 | fp16 | int8 | fp16-weights (fp16 storage, fp32 compute)
    source_sha256: str
    outputs: tuple[str, ...]
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    mlp_dim: int = 0
    patch_encoder: str = "resnet"
    rollout: bool = False  # the graph also outputs the CLS attention rollout
    parity: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, str] = field(default_factory=dict)

    @property
    def packing(self) -> PackingConfig:
        return PackingConfig(
            self.patch_size, self.grid_size, self.longer_sides, self.max_native_tokens, pad_native=False
        )

    def to_props(self) -> dict[str, str]:
        values: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "patch_size": self.patch_size,
            "grid_size": self.grid_size,
            "longer_sides": list(self.longer_sides),
            "max_native_tokens": self.max_native_tokens,
            "head": self.head,
            "num_outputs": self.num_outputs,
            "score_range": list(self.score_range),
            "precision": self.precision,
            "source_sha256": self.source_sha256,
            "outputs": list(self.outputs),
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "patch_encoder": self.patch_encoder,
            "rollout": self.rollout,
            "parity": self.parity,
            "exporter": self.exporter,
        }
        return {
            PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        ours = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise MetadataError("the ONNX file carries no musiq.* metadata: export it with `musiq export`")
        version = int(ours.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise MetadataError(
                f"metadata schema {version} is newer than this build reads ({SCHEMA_VERSION})"
            )
        strings = {"name", "version", "head", "precision", "source_sha256", "patch_encoder"}
        try:
            values: dict[str, Any] = {
                k: v if k in strings else json.loads(v) for k, v in ours.items() if k != "schema_version"
            }
            values["longer_sides"] = tuple(values["longer_sides"])
            values["score_range"] = tuple(float(x) for x in values["score_range"])
            values["outputs"] = tuple(values["outputs"])
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"malformed musiq metadata ({exc})") from exc


def split_paths(model_path: str | Path) -> tuple[Path, Path]:
    """Where the two halves of NAME.onnx lie (`musiq export --split`, `service.split`):
    NAME.features.onnx and NAME.head.onnx."""
    path = Path(model_path)
    stem = path.name.removesuffix(".onnx")
    return path.with_name(stem + ".features.onnx"), path.with_name(stem + ".head.onnx")
