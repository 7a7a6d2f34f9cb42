"""The one batch-forming rule (`service.batcher.take_batch`) that the server's batcher and
`musiq bulk`'s actors share, and the actors' use of it (`bulk.pipeline.plan_batches`). No Ray."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.batcher import BatcherConfig, take_batch

pytest.importorskip("pyarrow", reason="the bulk extra is not installed")

from bulk.pipeline import plan_batches


def test_take_batch_stops_at_the_size_or_the_token_budget() -> None:
    config = BatcherConfig(max_batch_tokens=1000, max_batch_size=3)
    assert take_batch([100, 100], config) == (2, False)  # room left: not full
    assert take_batch([100, 100, 100, 100], config) == (3, True)  # the size limit
    # 2 x 400 fits; a third item pads all three to 400 -> 1200 > 1000
    assert take_batch([300, 400, 100], config) == (2, True)
    assert take_batch([], config) == (0, False)
    assert take_batch([500, 500], config) == (2, False)  # exactly the budget still fits
    assert take_batch([1001], config) == (0, True)  # too long alone: the caller refuses it


@given(
    st.lists(st.integers(1, 2000), max_size=60),
    st.integers(1, 8),
    st.integers(2000, 8000),
)
def test_plan_batches_covers_each_item_once_within_the_limits(
    tokens: list[int], size: int, budget: int
) -> None:
    config = BatcherConfig(max_batch_tokens=budget, max_batch_size=size)
    batches = plan_batches(tokens, config)
    assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
    for batch in batches:
        assert 1 <= len(batch) <= size
        assert len(batch) * max(tokens[i] for i in batch) <= budget
        assert len({config.bucket(tokens[i]) for i in batch}) == 1, "one length bucket a batch"
        assert batch == sorted(batch), "arrival order within a bucket"
    # Each batch is as large as the rule allows: the next item of its bucket did not fit.
    for batch in batches:
        later = [
            i
            for i in range(batch[-1] + 1, len(tokens))
            if config.bucket(tokens[i]) == config.bucket(tokens[batch[0]])
        ]
        if later:
            count, full = take_batch([tokens[i] for i in [*batch, later[0]]], config)
            assert count == len(batch) and full


def test_plan_batches_refuses_an_item_over_the_budget() -> None:
    with pytest.raises(ValueError, match="exceeds the batch budget"):
        plan_batches([100, 5000], BatcherConfig(max_batch_tokens=4096, max_batch_size=4))


def test_packed_arrays_cross_stages_intact_nulls_and_slices_included() -> None:
    """Stage 1 writes each image's arrays into one Arrow binary column; stage 2 reads views of
    it. Every byte must come back, for rows after a null and in a slice (a batch that Ray Data
    cut out of a larger block has an offset)."""
    import pyarrow as pa

    from bulk.pipeline import binary_column, column_views

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((n, 3)).astype(np.float32) if n else None for n in (4, 0, 7, 1, 0, 5)]
    column = binary_column(arrays)
    assert column.type == pa.large_binary() and column.null_count == 2
    for start, length in ((0, 6), (2, 3), (5, 1)):
        views = column_views(pa.chunked_array([column.slice(start, length)]))
        for view, a in zip(views, arrays[start : start + length], strict=True):
            if a is None:
                assert view is None
            else:
                np.testing.assert_array_equal(np.frombuffer(view, np.float32).reshape(-1, 3), a)
    assert column_views(binary_column([])) == []


def test_packed_rows_cross_stages_intact() -> None:
    """`rows_table` (what decode tasks return) read back by `table_rows` (what the actors score):
    the same packed arrays, tokens and error codes, row for row."""
    from bulk.pipeline import Row, rows_table, table_rows
    from model.config import PackingConfig
    from model.packing import pack

    rng = np.random.default_rng(1)
    packing = PackingConfig(longer_sides=(64,), max_native_tokens=16, pad_native=False)
    packed = [pack(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), packing) for h, w in ((40, 70), (96, 33))]
    rows = [
        Row("a.jpg", packed[0], packed[0].num_tokens, None),
        Row("bad.jpg", None, None, "image_corrupt"),
        Row("b.png", packed[1], packed[1].num_tokens, None),
    ]
    back = table_rows(rows_table(rows), packing)
    assert [(r.image, r.tokens, r.error) for r in back] == [(r.image, r.tokens, r.error) for r in rows]
    assert back[1].packed is None
    for got, want in ((back[0].packed, packed[0]), (back[2].packed, packed[1])):
        assert got is not None
        for name in ("patches", "spatial", "scale", "mask"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_decoding_runs_in_the_actors_on_cpus_and_in_tasks_beside_gpus() -> None:
    from bulk.pipeline import decode_stage

    assert decode_stage("auto", gpus=0) == "actors"
    assert decode_stage("auto", gpus=2) == "tasks"
    assert decode_stage("tasks", gpus=0) == "tasks" and decode_stage("actors", gpus=1) == "actors"
    with pytest.raises(ValueError, match="decode must be one of"):
        decode_stage("threads", gpus=0)
