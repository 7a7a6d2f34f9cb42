"""What `musiq bulk` lists and how it writes: sources expanded in order and once each, parts
written whole or not at all, resume reading only whole parts. No Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyarrow", reason="the bulk extra is not installed")

from bulk.sources import (
    OUTPUT_SCHEMA,
    TMP_PREFIX,
    done_images,
    expand_sources,
    part_files,
    read_output,
    remove_temporary,
    write_part,
)
from cli.main import main


def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_folders_files_and_lists_expand_in_order_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    b = touch(tmp_path / "photos/sub/b.JPG")
    a = touch(tmp_path / "photos/a.png")
    touch(tmp_path / "photos/notes.md")  # not an image: a folder yields image files only
    single = touch(tmp_path / "single.webp")
    (tmp_path / "list.txt").write_text(f"# comment\n\n{single}\nrel/c.jpg\n{a}\n")
    pq.write_table(
        pa.table({"n": [1, 2], "path": ["s3://bucket/x.jpg", "rel/d.jpg"]}), tmp_path / "list.parquet"
    )
    inputs = expand_sources(["photos", str(tmp_path / "list.txt"), str(tmp_path / "list.parquet"), "photos"])
    images = [i.image for i in inputs]
    # Each listed spelling once: the absolute path of a.png is another name for it (a row of its own).
    assert images == [
        "photos/a.png",
        "photos/sub/b.JPG",
        single,
        "rel/c.jpg",
        a,
        "s3://bucket/x.jpg",
        "rel/d.jpg",
    ]
    by_image = {i.image: i.uri for i in inputs}
    assert by_image["photos/a.png"] == a and by_image["photos/sub/b.JPG"] == b  # absolute for the workers
    assert by_image["rel/c.jpg"] == str(tmp_path / "rel/c.jpg")
    assert by_image["s3://bucket/x.jpg"] == "s3://bucket/x.jpg"


def test_a_parquet_list_without_a_path_column_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="`image` or `path` column"):
        expand_sources([str(tmp_path / "l.parquet")])


def rows(*images: str) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            "image": list(images),
            "score": [50.0] * n,
            "distribution": [None] * n,
            "model": ["m"] * n,
            "model_version": ["1"] * n,
            "tokens": [200] * n,
            "error": [None] * n,
        }
    )


def test_parts_are_whole_and_resume_reads_only_them(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert done_images(out) == set() and read_output(out).schema == OUTPUT_SCHEMA
    write_part(out, rows("a", "b"), "one")
    write_part(out, rows("c"), "two")
    write_part(out, rows("c"), "two")  # a retried batch replaces its part
    # What a killed writer leaves: a temporary file, possibly half written.
    (tmp_path / "out" / f"{TMP_PREFIX}three-123.parquet").write_bytes(b"PAR1 half a file")
    assert len(part_files(out)) == 2
    assert done_images(out) == {"a", "b", "c"}
    assert read_output(out).schema == OUTPUT_SCHEMA and read_output(out).num_rows == 3
    assert remove_temporary(out) == 1 and remove_temporary(out) == 0


def test_cli_refuses_bad_options_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = touch(tmp_path / "a.jpg")
    assert main(["bulk", img, "--output", str(tmp_path / "o"), "--batch-size", "0"]) == 1
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert (
        main(
            [
                "bulk",
                str(tmp_path / "empty-folder-missing"),
                "-o",
                str(tmp_path / "o"),
                "--model",
                "nope.onnx",
            ]
        )
        == 1
    )
    assert "no such model file" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    assert main(["bulk", str(tmp_path / "none"), "-o", str(tmp_path / "o")]) == 1
    assert "no image files found" in capsys.readouterr().err


def test_every_decode_failure_maps_to_a_code_of_the_servers_table() -> None:
    from bulk.pipeline import error_code
    from model.decode import ImageDecodeError, ImageTooLargeError
    from service.errors import ERRORS

    reasons = ["corrupt", "unrecognised", "empty", "not_found", "unreadable", "unsupported_mode", "too_large"]
    for reason in reasons:
        assert error_code(ImageDecodeError("x", reason=reason)) in ERRORS, reason
    assert error_code(ImageTooLargeError(10, 10, 5)) == "image_too_large"
    assert error_code(FileNotFoundError("x")) == "image_not_found"
    assert error_code(IsADirectoryError("x")) == "image_unreadable"
