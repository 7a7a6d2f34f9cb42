"""Configuration objects: one for packing (numpy side), one for the network (torch side).

Both are plain frozen dataclasses with no torch import, so the server can read a checkpoint's
settings without installing torch. They serialise to JSON dicts for checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

PatchEncoder = Literal["resnet", "conv", "linear"]
HeadKind = Literal["score", "distribution", "classes"]
GeluKind = Literal["tanh", "erf"]


@dataclass(frozen=True)
class PackingConfig:
    """How an image becomes tokens (MUSIQ_SPEC section 1).

    `longer_sides` are the resized scales (ascending; scale ids 0..len-1); the native image is
    always the last scale, id `len(longer_sides)`. `max_native_tokens` caps the native scale:
    -1 keeps every patch, 0 drops the native scale, n > 0 cuts it to n rows and, with
    `pad_native` (the official fixed-length layout), pads shorter images to exactly n rows.
    Batching pads per batch anyway, so training and serving turn `pad_native` off: a padded row
    costs a full token of compute and changes nothing (it is masked).
    """

    patch_size: int = 32
    grid_size: int = 10
    longer_sides: tuple[int, ...] = (224, 384)
    max_native_tokens: int = -1
    pad_native: bool = True

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {self.grid_size}")
        if self.max_native_tokens < -1:
            raise ValueError(f"max_native_tokens must be -1 (all) or >= 0, got {self.max_native_tokens}")
        sides = tuple(int(s) for s in self.longer_sides)
        if any(s < 1 for s in sides):
            raise ValueError(f"longer_sides must be positive, got {sides}")
        # The official code sorts the scales so that scale ids are deterministic.
        object.__setattr__(self, "longer_sides", tuple(sorted(sides)))

    @property
    def num_scales(self) -> int:
        return len(self.longer_sides) + 1

    @property
    def native_scale_id(self) -> int:
        return len(self.longer_sides)

    @property
    def token_dim(self) -> int:
        """Width of one patch row: P*P*3 (the official row adds 3 more columns)."""
        return self.patch_size * self.patch_size * 3

    def resized_scale_tokens(self, longer_side: int) -> int:
        """Rows reserved for a resized scale: ceil(L / P)^2, whatever the aspect ratio."""
        n = -(-longer_side // self.patch_size)
        return n * n

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["longer_sides"] = list(self.longer_sides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackingConfig:
        return cls(**_known_fields(cls, d))


@dataclass(frozen=True)
class MusiqConfig:
    """Every hyperparameter of the network, plus the packing it was trained with.

    The defaults are the official 27.1 M-parameter model (MUSIQ_SPEC section 2).
    """

    hidden_size: int = 384
    num_layers: int = 14
    num_heads: int = 6
    mlp_dim: int = 1152
    patch_size: int = 32
    grid_size: int = 10
    longer_sides: tuple[int, ...] = (224, 384)
    patch_encoder: PatchEncoder = "resnet"
    head: HeadKind = "score"
    num_outputs: int = 1
    gelu: GeluKind = "tanh"
    use_scale_embedding: bool = True
    layer_norm_eps: float = 1e-6
    # Training-only regularisation; zero at inference, as in the official code.
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    max_native_tokens: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "longer_sides", tuple(sorted(int(s) for s in self.longer_sides)))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.patch_encoder not in ("resnet", "conv", "linear"):
            raise ValueError(f"unknown patch_encoder {self.patch_encoder!r}")
        if self.patch_encoder != "linear" and self.patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 for the {self.patch_encoder} encoder")
        if self.head not in ("score", "distribution", "classes"):
            raise ValueError(f"unknown head {self.head!r}")
        if self.head == "score" and self.num_outputs != 1:
            raise ValueError("a 'score' head has exactly one output")
        if self.head == "distribution" and self.num_outputs < 2:
            raise ValueError("a 'distribution' head needs at least two bins")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"unknown gelu {self.gelu!r}")

    @property
    def num_scales(self) -> int:
        return len(self.longer_sides) + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def packing(self, max_native_tokens: int | None = None, pad_native: bool = False) -> PackingConfig:
        """The packing this network expects; the native-token cap may be overridden per call.

        A cap, not a fixed length, by default (`pad_native=False`): padding rows change no output.
        """
        cap = self.max_native_tokens if max_native_tokens is None else max_native_tokens
        return PackingConfig(self.patch_size, self.grid_size, self.longer_sides, cap, pad_native)

    def replace(self, **changes: Any) -> MusiqConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["longer_sides"] = list(self.longer_sides)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MusiqConfig:
        return cls(**_known_fields(cls, d))


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    out = dict(d)
    if "longer_sides" in out:
        out["longer_sides"] = tuple(out["longer_sides"])
    return out


OFFICIAL = MusiqConfig()
"""The published configuration: 27,125,825 parameters (the paper's 27.1 M) with a one-output head."""

OFFICIAL_PARAMETER_COUNT = 27_125_825

SMALL = MusiqConfig(hidden_size=192, num_layers=6, num_heads=3, mlp_dim=576)
"""A CPU-trainable model with the official packing and patch encoder."""

PRESETS: dict[str, MusiqConfig] = {"official": OFFICIAL, "small": SMALL}


def preset(name: str, **overrides: Any) -> MusiqConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
