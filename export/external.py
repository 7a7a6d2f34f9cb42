"""Stores an exported graph's weights once: ONNX external data that points into the checkpoint.

An fp32 export holds the same numbers as the checkpoint it was made from, so shipping both stores
the model twice. `link_to_checkpoint` replaces every initializer whose bytes are found in the
checkpoint's safetensors file, as stored or after the exporter's rearrangements (a transpose, the
packed QKV concatenation, the patch encoder's row permutation), by ONNX external data
(`data_location` EXTERNAL with `location` / `offset` / `length`) pointing into that file, plus the
Concat / Reshape / Transpose nodes that rebuild the tensor. Every candidate is compared with the
initializer byte for byte before it is used; whatever is not found (the standardised conv kernels,
shape constants, fp16 copies) stays inline. ONNX Runtime folds the rebuilding nodes into constants
when a session is created (basic graph optimisations, on by default), so the session computes with
exactly the same float32 values as the inline file, at the same speed.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON header, then the raw
little-endian tensor data; a tensor's `data_offsets` are relative to the start of the data (8 + N).

A linked file needs its checkpoint at the recorded location, relative to the ONNX file's folder:
open it by path (ONNX Runtime resolves the location against the model's folder; a session made
from bytes cannot) and copy the two files together. `onnx.load` reads the data back in, and
`onnx.save` of that model writes a self-contained file again.

    python -m export.external --checkpoint model/weights/default.safetensors \\
        model/weights/default.onnx model/weights/default.rollout.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.metadata import LINKED_CHECKPOINT as LINK_PROP  # {"location", "sha256"} of the checkpoint
from model.checkpoint import CheckpointError, file_sha256, read_header

if TYPE_CHECKING:
    import onnxruntime as ort

MIN_BYTES = 512  # smaller initializers stay inline (a reference costs about 100 bytes)
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64, "I64": np.int64}


class LinkError(ValueError):
    """The checkpoint cannot back this file (unreadable, outside its folder, or a check failed)."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    length: int


def read_safetensors_index(path: str | os.PathLike[str]) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file (absolute byte ranges) and its header metadata."""
    path = Path(path)
    try:
        header, start = read_header(path)
        file_size = path.stat().st_size
    except (CheckpointError, OSError) as exc:
        raise LinkError(f"cannot read {path} as safetensors: {exc}") from exc
    meta = header.pop("__metadata__", None) or {}
    index: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            continue  # a dtype ONNX external data here would not need (bf16, ints): never linked
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end or start + end > file_size:
            raise LinkError(f"{path}: tensor {name} lies outside the file")
        index[name] = StoredTensor(name, np.dtype(dtype), tuple(entry["shape"]), start + begin, end - begin)
    return index, meta


@dataclass(frozen=True)
class Derivation:
    """A tensor rebuilt from checkpoint tensors: concatenated along axis 0 (when several), then
    optionally reshaped and transposed; the result is reshaped to the initializer's dims."""

    sources: tuple[str, ...]
    reshape: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None

    @property
    def is_plain(self) -> bool:
        """The initializer is the stored bytes themselves: no node needed."""
        return len(self.sources) == 1 and self.reshape is None and self.perm is None

    def nbytes(self, index: dict[str, StoredTensor]) -> int:
        return sum(index[s].length for s in self.sources)

    def build(
        self, inputs: Sequence[str], shapes: Sequence[tuple[int, ...]], target: TensorProto
    ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """The nodes that compute `target` from the source initializers named `inputs` (the last
        one writes the target's name) and the shape constants they need."""
        nodes: list[onnx.NodeProto] = []
        constants: list[TensorProto] = []

        def step(op: str, args: list[str], **attrs: Any) -> str:
            out = f"{target.name}::{op.lower()}{len(nodes) + 1}"
            nodes.append(helper.make_node(op, args, [out], **attrs))
            return out

        def reshape(x: str, dims: Sequence[int]) -> str:
            shape = numpy_helper.from_array(
                np.asarray(dims, np.int64), f"{target.name}::shape{len(nodes) + 1}"
            )
            constants.append(shape)
            return step("Reshape", [x, shape.name])

        current = inputs[0] if len(inputs) == 1 else step("Concat", list(inputs), axis=0)
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        if self.reshape is not None:
            current, shape = reshape(current, self.reshape), self.reshape
        if self.perm is not None:
            current = step("Transpose", [current], perm=list(self.perm))
            shape = tuple(shape[p] for p in self.perm)
        if tuple(shape) != tuple(target.dims):
            reshape(current, tuple(target.dims))
        nodes[-1].output[0] = target.name
        return nodes, constants

    def evaluate(self, values: dict[str, np.ndarray]) -> np.ndarray:
        parts = [values[s] for s in self.sources]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.reshape is not None:
            x = x.reshape(self.reshape)
        if self.perm is not None:
            x = x.transpose(self.perm)
        return np.ascontiguousarray(x)


def candidate_derivations(index: dict[str, StoredTensor], meta: dict[str, str]) -> Iterator[Derivation]:
    """What an exporter makes of checkpoint tensors, plainest first (each is checked byte for byte
    before use, so a candidate that matches nothing costs only its evaluation)."""
    for name in index:
        yield Derivation((name,))
    for name, t in index.items():
        if len(t.shape) == 2:
            yield Derivation((name,), perm=(1, 0))  # nn.Linear weight -> MatMul operand
    # export.graph.FusedAttention: [query; key; value] stacked, transposed for the weight.
    for name in index:
        head, sep, leaf = name.rpartition(".query.")
        if not sep:
            continue
        group = tuple(f"{head}.{part}.{leaf}" for part in ("query", "key", "value"))
        if all(g in index for g in group):
            yield Derivation(group)
            if len(index[name].shape) == 2:
                yield Derivation(group, perm=(1, 0))
    # export.graph.ExportPatchEncoder: embedding rows read in the feature map's (c, h, w) order.
    config = json.loads(meta.get("config", "{}") or "{}")
    emb = index.get("patch_encoder.embedding.weight")
    patch = int(config.get("patch_size", 0) or 0)
    if emb is not None and len(emb.shape) == 2 and patch >= 4:
        d, features = emb.shape
        side = patch // 4
        channels, rest = divmod(features, side * side)
        if channels and not rest:
            shape = (d, side, side, channels)
            yield Derivation((emb.name,), reshape=shape, perm=(3, 1, 2, 0))  # MatMul operand
            yield Derivation((emb.name,), reshape=shape, perm=(0, 3, 1, 2))  # Gemm (transB) operand


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def _initializer_bytes(init: TensorProto) -> bytes | None:
    if init.data_location == TensorProto.EXTERNAL:
        return None  # already external: left as it is
    return np.ascontiguousarray(numpy_helper.to_array(init)).tobytes()


@dataclass
class LinkStats:
    linked: int = 0  # initializers now read from the checkpoint
    derived: int = 0  # of those, rebuilt by nodes
    linked_bytes: int = 0
    inline: int = 0  # initializers left inline
    inline_bytes: int = 0


def link_to_checkpoint(
    model: onnx.ModelProto,
    checkpoint_path: str | os.PathLike[str],
    *,
    location: str | None = None,
    min_bytes: int = MIN_BYTES,
    stats: LinkStats | None = None,
) -> onnx.ModelProto:
    """A copy of `model` whose initializers found in the checkpoint are external data in it.

    `location` is the checkpoint's path as the linked file will name it, relative to the folder
    the ONNX file is saved in (default: the checkpoint's file name, i.e. saved beside it).
    """
    checkpoint_path = Path(checkpoint_path)
    location = location or checkpoint_path.name
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise LinkError(f"external data location {location!r} must lie inside the ONNX file's folder")
    index, meta = read_safetensors_index(checkpoint_path)
    raw = np.memmap(checkpoint_path, dtype=np.uint8, mode="r")
    values = {
        n: np.frombuffer(raw[t.offset : t.offset + t.length], t.dtype).reshape(t.shape)
        for n, t in index.items()
    }
    stats = stats if stats is not None else LinkStats()

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wanted: dict[tuple[int, int], list[int]] = {}  # (ONNX dtype, bytes) -> initializer positions
    digests: dict[int, str] = {}
    for i, init in enumerate(graph.initializer):
        data = _initializer_bytes(init)
        if data is None or len(data) < min_bytes:
            continue
        wanted.setdefault((init.data_type, len(data)), []).append(i)
        digests[i] = _digest(data)

    found: dict[int, Derivation] = {}
    for candidate in candidate_derivations(index, meta):
        dtype = helper.np_dtype_to_tensor_dtype(index[candidate.sources[0]].dtype)
        if len({index[s].dtype for s in candidate.sources}) != 1:
            continue
        positions = [p for p in wanted.get((dtype, candidate.nbytes(index)), []) if p not in found]
        if not positions:
            continue
        digest = _digest(candidate.evaluate(values).data)
        for p in positions:
            if digests[p] == digest:
                found[p] = candidate

    def external(name: str, stored: StoredTensor, dims: Sequence[int]) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(stored.dtype)
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", stored.offset), ("length", stored.length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        return t

    kept: list[TensorProto] = []
    sources: dict[str, TensorProto] = {}  # one external initializer per checkpoint tensor used
    nodes: list[onnx.NodeProto] = []
    for i, init in enumerate(graph.initializer):
        derivation = found.get(i)
        if derivation is None:
            kept.append(init)
            stats.inline += 1
            stats.inline_bytes += len(init.raw_data) or init.ByteSize()
            continue
        stats.linked += 1
        stats.linked_bytes += derivation.nbytes(index)
        if derivation.is_plain:
            kept.append(external(init.name, index[derivation.sources[0]], init.dims))
            continue
        stats.derived += 1
        inputs = []
        for src in derivation.sources:
            if src not in sources:
                sources[src] = external(f"checkpoint::{src}", index[src], index[src].shape)
            inputs.append(sources[src].name)
        built, constants = derivation.build(inputs, [index[src].shape for src in derivation.sources], init)
        nodes.extend(built)
        kept.extend(constants)
    del graph.initializer[:]
    graph.initializer.extend([*sources.values(), *kept])
    if nodes:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend([*nodes, *existing])
    _set_prop(out, LINK_PROP, json.dumps({"location": location, "sha256": file_sha256(checkpoint_path)}))
    return out


def _set_prop(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def linked_location(model: onnx.ModelProto) -> set[str]:
    """The files a model's external data lives in (empty for a self-contained file)."""
    return {
        e.value
        for init in model.graph.initializer
        if init.data_location == TensorProto.EXTERNAL
        for e in init.external_data
        if e.key == "location"
    }


def _sample_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Inputs for a MUSIQ graph (its metadata's packing): a random image and a smooth one, packed.
    The split halves (`musiq export --split`) take the patch rows alone (features half) or
    feature maps in place of patches (head half: random non-negative maps of its width)."""
    from export.metadata import ModelMetadata
    from model.packing import collate, pack

    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 300, dtype=np.float32)
    images = [
        rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
        np.stack([np.add.outer(ramp[:200], ramp) / 2] * 3, axis=-1).astype(np.uint8),
    ]
    first = model.graph.input[0]
    half = first.type.tensor_type.elem_type == TensorProto.FLOAT16
    width = first.type.tensor_type.shape.dim[-1].dim_value
    feeds = []
    for img in images:
        batch = collate([pack(img, meta.packing)])
        patches = batch.patches
        if first.name == "rows":
            feeds.append({"rows": patches.reshape(-1, patches.shape[-1])})
            continue
        if width and width != patches.shape[-1]:
            patches = np.abs(rng.standard_normal((*patches.shape[:2], width), dtype=np.float32))
        feeds.append(
            {
                "patches": patches.astype(np.float16) if half else patches,
                "spatial": batch.spatial,
                "scale": batch.scale,
                "mask": batch.mask,
            }
        )
    return feeds


def _session(model: str | bytes) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def link_file(
    onnx_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    *,
    verify: bool = True,
    min_bytes: int = MIN_BYTES,
) -> LinkStats:
    """Links one ONNX file to a checkpoint in its folder (or below it), in place and atomically.

    With `verify`, ONNX Runtime runs the file before and after on two packed images and the
    outputs must be identical bit for bit; otherwise nothing is written.
    """
    onnx_path, checkpoint_path = Path(onnx_path), Path(checkpoint_path)
    location = os.path.relpath(checkpoint_path.resolve(), onnx_path.resolve().parent)
    if ".." in Path(location).parts:
        raise LinkError(
            f"{checkpoint_path} is outside {onnx_path.parent}: ONNX Runtime reads external data only "
            "from the model's folder"
        )
    model = onnx.load(str(onnx_path))  # reads any external data back in: relinking is fine
    stats = LinkStats()
    linked = link_to_checkpoint(model, checkpoint_path, location=location, min_bytes=min_bytes, stats=stats)
    fd, tmp = tempfile.mkstemp(dir=onnx_path.parent, prefix=onnx_path.name, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(linked, tmp)
        onnx.checker.check_model(tmp)
        if verify:
            before, after = _session(model.SerializeToString()), _session(tmp)
            for feeds in _sample_feeds(model):
                for want, got in zip(before.run(None, feeds), after.run(None, feeds), strict=True):
                    if want.dtype != got.dtype or not np.array_equal(want, got):
                        raise LinkError(f"{onnx_path}: the linked graph's outputs differ; nothing written")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, onnx_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.external",
        description="Point ONNX files' weights into the checkpoint beside them (ONNX external data), "
        "verified bit-identical with ONNX Runtime before each file is replaced.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="the safetensors checkpoint the files were exported from"
    )
    parser.add_argument("onnx", nargs="+", help="ONNX files in the checkpoint's folder (or above it)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the before/after ONNX Runtime comparison"
    )
    args = parser.parse_args(argv)
    for path in args.onnx:
        before = Path(path).stat().st_size
        try:
            s = link_file(path, args.checkpoint, verify=not args.no_verify)
        except LinkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"{path}: {before / 2**20:.1f} MiB -> {Path(path).stat().st_size / 2**20:.2f} MiB; "
            f"{s.linked} initializers ({s.linked_bytes / 2**20:.1f} MiB) read from {args.checkpoint}, "
            f"{s.derived} of them rebuilt by Concat/Reshape/Transpose; {s.inline} left inline "
            f"({s.inline_bytes / 2**20:.2f} MiB)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
