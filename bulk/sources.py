"""What `musiq bulk` reads and writes: the input listing and the output dataset's parts.

Paths are local paths or anything `pyarrow.fs.FileSystem.from_uri` opens (s3://, gs://, hdfs://,
file://). Each input keeps two names: `image`, the path as listed (the output's key, what users
join on), and `uri`, what a worker opens (a local path made absolute, since Ray workers do not run
in the driver's working directory).

The output is a folder of Parquet parts. A part is written under a hidden temporary name and
renamed into place only once complete, so every `part-*.parquet` is whole (readers such as
`pyarrow.dataset` and pandas skip names starting with "." or "_"). That is what makes `--resume`
exact: the images already done are the `image` column of the parts present, and a killed run
leaves at most temporary files, which resume deletes.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model.commands import IMAGE_SUFFIXES

LIST_SUFFIXES = (".txt", ".parquet")
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"

# One row per input; `error` is null or the REST API's error code for the same bytes.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("distribution", pa.list_(pa.float64())),
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("tokens", pa.int64()),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Input:
    image: str  # as listed
    uri: str  # what a worker opens (absolute local path, or the URI itself)


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `path`, and the path within it."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _uri(listed: str) -> str:
    return listed if is_uri(listed) else os.path.abspath(listed)


def _join(base: str, rel: str) -> str:
    return posixpath.join(base, rel) if is_uri(base) else os.path.join(base, rel)


def read_list(path: str) -> list[str]:
    """The paths a list file names: a .txt (one a line; blank lines and # comments skipped) or a
    .parquet (its `image` column, else its `path` column, else its only string column)."""
    fs, inner = filesystem(path)
    if path.lower().endswith(".txt"):
        with fs.open_input_stream(inner) as f:
            text = f.read().decode("utf-8")
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    table = pq.read_table(inner, filesystem=fs)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    column = next((c for c in ("image", "path") if c in strings), None)
    if column is None and len(strings) == 1:
        column = strings[0]
    if column is None:
        raise ValueError(
            f"{path}: a Parquet list needs an `image` or `path` column (string); has {table.schema.names}"
        )
    return [p for p in table.column(column).to_pylist() if p]


def expand_sources(sources: Sequence[str]) -> list[Input]:
    """Every input the sources name, in order, each once: folders become their image files
    (recursive, sorted), list files their entries, anything else is taken as an image (a missing
    one becomes a row with the error `image_not_found`, as it would on the server)."""
    listed: list[str] = []
    for source in sources:
        fs, inner = filesystem(source)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            base = inner.rstrip("/")
            rels = sorted(
                f.path[len(base) :].lstrip("/")
                for f in found
                if f.type == pafs.FileType.File and posixpath.splitext(f.path)[1].lower() in IMAGE_SUFFIXES
            )
            listed += [_join(source, rel) for rel in rels]
        elif info.type == pafs.FileType.File and source.lower().endswith(LIST_SUFFIXES):
            listed += read_list(source)
        else:
            listed.append(source)
    return [Input(p, _uri(p)) for p in dict.fromkeys(listed)]


# ---------------------------------------------------------------------------------- the output


def part_files(out: str) -> list[str]:
    """The complete parts in `out` (paths within its filesystem), sorted."""
    fs, inner = filesystem(out)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(
        f.path
        for f in infos
        if f.type == pafs.FileType.File
        and f.base_name.startswith(PART_PREFIX)
        and f.base_name.endswith(PART_SUFFIX)
    )


def done_images(out: str) -> set[str]:
    """The `image` of every row already written to `out` (what `--resume` skips)."""
    fs, _ = filesystem(out)
    done: set[str] = set()
    for part in part_files(out):
        done.update(pq.read_table(part, columns=["image"], filesystem=fs).column("image").to_pylist())
    return done


def remove_temporary(out: str) -> int:
    """Deletes the temporary files a killed run left in `out`; returns how many."""
    fs, inner = filesystem(out)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return 0
    stale = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
        if f.base_name.startswith(TMP_PREFIX)
    ]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def write_part(out: str, table: pa.Table, name: str) -> str:
    """Writes `table` as the part `name` of `out`, atomically (temporary name, then rename): a
    reader, or a later `--resume`, sees the whole part or none of it. Returns the part's path."""
    fs, inner = filesystem(out)
    fs.create_dir(inner, recursive=True)
    final = posixpath.join(inner, f"{PART_PREFIX}{name}{PART_SUFFIX}")
    tmp = posixpath.join(inner, f"{TMP_PREFIX}{name}-{os.getpid()}{PART_SUFFIX}")
    pq.write_table(table.cast(OUTPUT_SCHEMA), tmp, filesystem=fs)
    fs.move(tmp, final)
    return final


def read_output(out: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Every part of `out` as one table (empty, with the output schema, when there is none)."""
    fs, _ = filesystem(out)
    cols = list(columns) if columns is not None else None
    tables = [pq.read_table(p, columns=cols, filesystem=fs) for p in part_files(out)]
    if not tables:
        schema = OUTPUT_SCHEMA if cols is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in cols])
        return schema.empty_table()
    return pa.concat_tables(tables)
