"""The Ray Data pipeline behind `musiq bulk`: read -> decode + pack -> score (actors).

- **Decode and pack** call the server's own `service.prepare.prepare_image` with the server's
  defaults (pixel limit, padding rows dropped): the same bytes give the same rows, hence the same
  score, as `/v1/score`. Where they run depends on the cluster (`decode_stage`):
  - **with GPUs**, as `map_batches` tasks on the CPUs, so that CPU nodes keep the GPU actors fed;
  - **on CPUs only**, inside the scoring actors, just before inference. There the two stages
    share the same cores, and a packed image (~5 MB of float32 patches) that crosses between
    processes costs more CPU than its decode: on a 2-core machine, separate tasks made bulk take
    16-24 % longer end to end than decoding in the actors (docs/bulk.md).
- **Scoring** runs in an actor pool: each actor loads the ONNX file once (`ModelRuntime`, the
  server's class: same metadata, same providers logic; CUDA with `num_gpus=1` when the cluster
  has GPUs), groups the rows it receives by the server's length buckets and forms each inference
  batch with the server's rule (`service.batcher.take_batch`), then writes its rows as one
  output part, atomically (`bulk.sources.write_part`), and returns only a summary to the driver.
- **Failures.** Bad input becomes a row with the REST API's error code; it never raises. A
  worker process that dies is Ray's to handle: tasks are retried (`max_retries`) and actors
  restarted with their pending batches retried (`max_restarts`, `max_task_retries`). A retried
  batch writes the same part name (a hash of its images), so a retry replaces, never duplicates.

The steps both offline commands share (packing, reading a file into rows or an error code, the
batching rule around `ModelRuntime`) live in `service.offline`, which `musiq score` also calls: a
score from either command is the server's for the same bytes.

Ray is imported only inside `run`: the listing, the stages' functions and the tests of them work
without a cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from bulk.sources import Input, filesystem, write_part
from model.config import PackingConfig
from model.decode import DEFAULT_MAX_PIXELS
from model.packing import PackedImage
from service.errors import ScoringError
from service.offline import batcher_config, prepare_file, score_packed

# Re-exported: the offline glue lives in service/offline.py, shared with `musiq score`.
from service.offline import error_code as error_code
from service.offline import packing_for as packing_for
from service.offline import plan_batches as plan_batches
from service.runtime import ModelRuntime, RuntimeOptions

logger = logging.getLogger(__name__)

PREPARE_CPUS = 0.25  # decode tasks on a CPU-only cluster (`--decode tasks`): what one reserves
DECODE_STAGES = ("auto", "tasks", "actors")
# A batch whose decoding killed its process runs again this often, then the job stops: Ray Data
# would otherwise retry it without end (its tasks' max_retries and actors' max_task_retries are -1).
DECODE_RETRIES = 3

# Columns between separate stages: the packed rows travel as raw bytes (no per-value conversion).
_PACKED = ("patches", "spatial", "scale", "mask")


@dataclass(frozen=True)
class BulkOptions:
    model: Path
    output: str
    # Batching: None takes the server's default for the actor's device (`ModelRuntime.defaults`).
    batch_size: int | None = None  # images in one inference batch
    max_batch_tokens: int | None = None  # batch size x padded length
    max_native_tokens: int | None = None  # None: the server's default cap
    part_rows: int = 64  # rows per output part: the actors' batch, and resume's granularity
    actors: int | None = None  # inference actors (None: one per GPU, else one per cpus_per_actor)
    cpus_per_actor: float = 1.0  # CPU actors: reserved CPUs; ORT uses that many threads (>= 1)
    decode: str = "auto"  # where decode + pack run: "tasks", "actors", or auto (`decode_stage`)
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    ray_init: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    images: int
    errors: int
    skipped: int  # already in the output (--resume)
    wall_s: float
    errors_by_code: dict[str, int]
    operators: tuple[str, ...] = ()  # the Ray Data operators that ran (from the dataset's stats)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_code.items()))
        return (
            f"{self.images} images, {self.errors} errors{f' ({codes})' if codes else ''}, "
            f"{self.images_per_s:.1f} images/s, wall time {self.wall_s:.1f} s"
            + (f"; {self.skipped} already done (skipped)" if self.skipped else "")
        )


# ------------------------------------------------------------------------- stage 1: decode + pack

_LOCAL = pafs.LocalFileSystem()


def read_bytes(uri: str) -> bytes:
    """The file's bytes: a local path, or a URI `pyarrow.fs` opens."""
    fs, inner = filesystem(uri) if "://" in uri else (_LOCAL, uri)
    with fs.open_input_stream(inner) as f:
        data: bytes = f.read()
    return data


@dataclass(frozen=True)
class Row:
    """One input after decode + pack: its packed rows, or the REST API's error code."""

    image: str
    packed: PackedImage | None
    tokens: int | None  # the packed image's token count, as `/v1/score` reports it
    error: str | None


def prepare_rows(
    images: Sequence[str], uris: Sequence[str], packing: PackingConfig, max_pixels: int
) -> list[Row]:
    """Reads, decodes and packs each input; a failure becomes its error code, never an exception."""
    rows: list[Row] = []
    for image, uri in zip(images, uris, strict=True):
        try:
            prepared = prepare_file(uri, packing, read=read_bytes, max_pixels=max_pixels)
        except ScoringError as exc:  # the REST API's code for the same bytes
            rows.append(Row(image, None, None, exc.code))
        else:
            rows.append(Row(image, prepared.compute, prepared.packed.num_tokens, None))
    return rows


def input_rows(batch: pa.Table, packing: PackingConfig, max_pixels: int) -> list[Row]:
    """`prepare_rows` over a batch of inputs (`image`, `uri` columns)."""
    images = batch.column("image").to_pylist()
    return prepare_rows(images, batch.column("uri").to_pylist(), packing, max_pixels)


def prepare_batch(
    batch: pa.Table, *, packing: PackingConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pa.Table:
    """Decode + pack as its own stage (CPU tasks): the rows as a table for the scoring actors."""
    return rows_table(input_rows(batch, packing, max_pixels))


def rows_table(rows: Sequence[Row]) -> pa.Table:
    """Rows as one Arrow table: small columns as values, each packed array as one buffer."""
    return pa.table(
        {
            "image": pa.array([r.image for r in rows], pa.string()),
            "tokens": pa.array([r.tokens for r in rows], pa.int64()),
            "error": pa.array([r.error for r in rows], pa.string()),
            "shape": pa.array(
                [list(r.packed.patches.shape) if r.packed is not None else None for r in rows],
                pa.list_(pa.int64()),
            ),
            **{
                name: binary_column([getattr(r.packed, name) if r.packed is not None else None for r in rows])
                for name in _PACKED
            },
        }
    )


def table_rows(batch: pa.Table, packing: PackingConfig) -> list[Row]:
    """`rows_table`'s rows again, their packed arrays as views of the table's buffers (no copy)."""
    small = batch.select(["image", "tokens", "error", "shape"]).to_pylist()
    views = {name: column_views(batch.column(name)) for name in _PACKED}

    def array(name: str, i: int, dtype: type[np.generic]) -> np.ndarray:
        view = views[name][i]
        if view is None:
            raise ValueError(f"row {i} has no {name} but no error either")
        return np.frombuffer(view, dtype)

    rows: list[Row] = []
    for i, r in enumerate(small):
        packed = None
        if r["error"] is None:
            packed = PackedImage(
                patches=array("patches", i, np.float32).reshape(r["shape"]),
                spatial=array("spatial", i, np.int32),
                scale=array("scale", i, np.int32),
                mask=array("mask", i, np.bool_),
                layout=(),
                config=packing,
            )
        rows.append(Row(r["image"], packed, r["tokens"], r["error"]))
    return rows


def binary_column(arrays: Sequence[np.ndarray | None]) -> pa.Array:
    """The arrays' bytes as one Arrow binary column (null for None), copied once.

    Why not `pa.array([a.tobytes() ...])`: an image's float32 patches are ~4.6 MB, and that path
    copies them twice more with Python objects between; on 2 cores it cost 8 ms of an image's
    ~60 ms (bulk's rate fell 15 % behind `musiq score`'s on the same ONNX Runtime).
    """
    sizes = np.array([0 if a is None else a.nbytes for a in arrays], np.int64)
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for a, start, size in zip(arrays, offsets, sizes, strict=False):
        if a is not None:
            data[start : start + size] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    valid = pa.array([a is not None for a in arrays], pa.bool_()).buffers()[1]  # the bits, as a validity map
    return pa.Array.from_buffers(
        pa.large_binary(), len(arrays), [valid, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def column_views(column: pa.ChunkedArray | pa.Array) -> list[memoryview | None]:
    """Each row of a `binary_column` as a view of the Arrow buffer (no copy; None for null)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[memoryview | None] = []
    for chunk in chunks:
        chunk = chunk.cast(pa.large_binary())
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        nulls = chunk.is_null().to_numpy(zero_copy_only=False)
        views += [
            None if null else data[int(a) : int(b)]
            for null, a, b in zip(nulls, offsets, offsets[1:], strict=False)
        ]
    return views


# ------------------------------------------------------------------------------- stage 2: score


def part_name(images: Sequence[str]) -> str:
    """A part's name from its images: a retried batch rewrites the same part, never a second one."""
    return hashlib.sha256("\n".join(images).encode()).hexdigest()[:32]


class Scorer:
    """Stage 2 (an actor): the model, loaded once; scores a batch of rows and writes them.

    A batch is either stage 1's rows (decode tasks ran) or inputs (`image`, `uri`): then this
    actor decodes and packs them itself, with the same function the tasks call."""

    def __init__(
        self,
        model: str,
        output: str,
        packing: PackingConfig,
        options: RuntimeOptions,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.runtime = ModelRuntime(model, options)
        self.output = output
        self.packing = packing
        self.max_pixels = max_pixels
        # the server's batching defaults for this device
        self.config = batcher_config(self.runtime, batch_size, max_batch_tokens)
        self.meta = self.runtime.metadata

    def score_rows(self, rows: Sequence[Row]) -> pa.Table:
        """The output rows."""
        ok = [i for i, r in enumerate(rows) if r.packed is not None]
        packed = [item for r in rows if (item := r.packed) is not None]
        predictions = score_packed(self.runtime, packed, self.config)
        score: list[float | None] = [None] * len(rows)
        dist: list[list[float] | None] = [None] * len(rows)
        errors: list[str | None] = [r.error for r in rows]
        for i, p in zip(ok, predictions, strict=True):
            if isinstance(p, str):
                errors[i] = p
            else:
                score[i] = p.score
                dist[i] = list(p.distribution) if p.distribution is not None else None
        n = len(rows)
        return pa.table(
            {
                "image": [r.image for r in rows],
                "score": pa.array(score, pa.float64()),
                "distribution": pa.array(dist, pa.list_(pa.float64())),
                "model": [self.meta.name] * n,
                "model_version": [self.meta.version] * n,
                "tokens": pa.array(
                    [r.tokens if e is None else None for r, e in zip(rows, errors, strict=True)],
                    pa.int64(),
                ),
                "error": pa.array(errors, pa.string()),
            }
        )

    def score_table(self, batch: pa.Table) -> pa.Table:
        """The output rows for a batch of stage 1's rows, or of inputs to decode here first."""
        if "uri" not in batch.column_names:
            return self.score_rows(table_rows(batch, self.packing))
        # Inputs: decoded a few inference batches at a time, not a whole part at once, whose
        # packed rows (up to ~9 MB an image under the default cap) would all be held together.
        step = 4 * self.config.max_batch_size
        return pa.concat_tables(
            self.score_rows(input_rows(batch.slice(start, step), self.packing, self.max_pixels))
            for start in range(0, max(batch.num_rows, 1), step)
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = self.score_table(batch)
        images = table.column("image").to_pylist()
        write_part(self.output, table, part_name(images))
        return table.select(["image", "error"])  # the driver needs only this


def scorer_class(
    model: str,
    output: str,
    packing: PackingConfig,
    options: RuntimeOptions,
    batch_size: int | None,
    max_batch_tokens: int | None,
    max_pixels: int,
) -> type[Scorer]:
    """`Scorer` with its arguments bound: Ray Data builds actors from a class, and arguments
    passed separately live in the object store, where a restarted actor might not find them."""

    class BoundScorer(Scorer):
        def __init__(self) -> None:
            super().__init__(model, output, packing, options, batch_size, max_batch_tokens, max_pixels)

    return BoundScorer


# ------------------------------------------------------------------------------------ the driver


def decode_stage(choice: str, gpus: int) -> str:
    """Where decode + pack run: `tasks` (their own CPU tasks) or `actors` (the scoring actors).

    `auto` picks tasks when the cluster has GPUs (CPU nodes decode while GPUs infer) and the
    actors otherwise: on CPUs alone both stages share the cores, and handing a packed image (~5 MB)
    to another process only adds work."""
    if choice not in DECODE_STAGES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_STAGES)}, not {choice!r}")
    if choice == "auto":
        return "tasks" if gpus else "actors"
    return choice


def init_ray(address: str | None, **kwargs: Any) -> None:
    """Joins the cluster at `address`, or starts a local one sized to this machine. No usage
    statistics and no dashboard: nothing is sent anywhere, no port is opened for a web UI."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    args: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **args, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, **args, **kwargs)


def run(
    inputs: Sequence[Input],
    options: BulkOptions,
    *,
    skipped: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Scores `inputs` into `options.output` on the Ray cluster `init_ray` connected to."""
    start = time.perf_counter()
    if not inputs:
        return Summary(0, 0, skipped, 0.0, {})
    import ray

    # The driver reads the model's metadata (and proves the file loads) on the CPU.
    probe = ModelRuntime(
        options.model,
        RuntimeOptions(intra_op_threads=1, providers=("CPUExecutionProvider",), split_encoder=False),
    )
    packing = packing_for(probe.packing, options.max_native_tokens)
    del probe

    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    in_actors = decode_stage(options.decode, gpus) == "actors"
    batch_size = options.batch_size
    if gpus:
        actors = options.actors or gpus
        actor_resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
        runtime = RuntimeOptions(providers=("CUDAExecutionProvider",))
        prepare_cpus = 1.0
    else:
        actors = options.actors or max(1, int(cpus // options.cpus_per_actor))
        runtime = RuntimeOptions(intra_op_threads=max(1, round(options.cpus_per_actor)))
        # One image at a time: on a CPU a batch costs the sum of its images and its padding
        # (batches of 4 ran 4-7 % slower an image here); offline nobody waits for a batch to fill.
        batch_size = batch_size or 1
        if in_actors:
            actor_resources = {"num_cpus": options.cpus_per_actor}
        else:
            # Decode tasks beside the actors: each actor reserves all but PREPARE_CPUS of its
            # share, which leaves one decode task (PREPARE_CPUS each) beside every actor.
            actor_resources = {"num_cpus": max(2 * PREPARE_CPUS, options.cpus_per_actor - PREPARE_CPUS)}
        prepare_cpus = PREPARE_CPUS

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver draws its own (images, not blocks)
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    block_rows = max(1, min(options.part_rows, 16))  # inputs per decode task
    errors: dict[str, int] = {}
    done = 0
    operators: tuple[str, ...] = ()
    if inputs:
        # Typed Any: Ray's batch types are a union the pyarrow batches here cannot narrow.
        ds: Any = ray.data.from_items(
            [{"image": i.image, "uri": i.uri} for i in inputs],
            override_num_blocks=-(-len(inputs) // block_rows),
        )
        if not in_actors:
            ds = ds.map_batches(
                prepare_batch,
                batch_format="pyarrow",
                batch_size=None,
                zero_copy_batch=True,  # reads its input, never writes it
                fn_kwargs={"packing": packing, "max_pixels": options.max_pixels},
                num_cpus=prepare_cpus,
                max_retries=DECODE_RETRIES,
            )
        ds = ds.map_batches(
            scorer_class(
                str(options.model),
                options.output,
                packing,
                runtime,
                batch_size,
                options.max_batch_tokens,
                options.max_pixels,
            ),
            batch_format="pyarrow",
            batch_size=options.part_rows,
            zero_copy_batch=True,
            # Ray Data restarts a dead actor (max_restarts=-1: the model loads again) and retries
            # its unfinished batches (max_task_retries=-1). Decoding in the actors, an image that
            # crashes the decoder would kill every restart: bounded like the decode tasks.
            compute=ray.data.ActorPoolStrategy(size=actors),
            **actor_resources,
            **({"max_task_retries": DECODE_RETRIES} if in_actors else {}),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for code in batch.column("error").to_pylist():
                if code is not None:
                    errors[code] = errors.get(code, 0) + 1
            done += batch.num_rows
            if on_progress is not None:
                on_progress(batch.num_rows)
        operators = tuple(
            line.split(":", 1)[0].split(" ", 2)[2]
            for line in ds.stats().splitlines()
            if line.startswith("Operator ") and line.count(" ") >= 2
        )
    return Summary(done, sum(errors.values()), skipped, time.perf_counter() - start, errors, operators)


def progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring", unit="img", disable=not enabled, file=sys.stderr)
