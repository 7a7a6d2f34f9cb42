"""The batching core on its own, driven by a fake model: ordering, budgets, buckets, wait bounds,
starvation, cancellation, deadlines, backpressure, failures and graceful stop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from service.batcher import (
    Batcher,
    BatcherConfig,
    BatchInfo,
    DeadlineExceeded,
    ItemTooLarge,
    QueueFull,
    ShuttingDown,
    WouldMissDeadline,
)


class FakeModel:
    """Records every batch; returns item * 10; can be slowed down or made to fail."""

    def __init__(self, delay_s: float = 0.0, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on or set()
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on & set(items):
            raise RuntimeError("model exploded")
        return [i * 10 for i in items]

    @property
    def seen(self) -> list[int]:
        return [i for b in self.batches for i in b]


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 30))


async def started(model: FakeModel, **cfg: Any) -> tuple[Batcher[int, int], list[BatchInfo]]:
    infos: list[BatchInfo] = []
    batcher: Batcher[int, int] = Batcher(model, BatcherConfig(**cfg), on_batch=infos.append)
    await batcher.start()
    return batcher, infos


def test_every_caller_gets_its_own_result_in_fifo_batches() -> None:
    async def main() -> None:
        model = FakeModel()
        b, _ = await started(model, max_queue_delay_s=0.05, max_batch_size=4)
        results = await asyncio.gather(*(b.submit(i, 100) for i in range(10)))
        assert results == [i * 10 for i in range(10)]
        assert model.seen == list(range(10))  # one bucket: strict arrival order
        assert max(len(x) for x in model.batches) == 4
        await b.stop()

    run(main)


def test_token_budget_and_batch_size_are_respected() -> None:
    async def main() -> None:
        model = FakeModel()
        b, infos = await started(model, max_batch_tokens=1000, max_batch_size=8, max_queue_delay_s=0.05)
        lengths = [300, 250, 280, 120, 200, 300, 260, 90] * 3
        await asyncio.gather(*(b.submit(i, t) for i, t in enumerate(lengths)))
        for info in infos:
            assert info.size * info.padded_length <= 1000 and info.size <= 8
        assert sum(i.size for i in infos) == len(lengths)
        await b.stop()

    run(main)


def test_length_buckets_keep_padding_low() -> None:
    async def main() -> None:
        model = FakeModel()
        b, infos = await started(model, max_batch_tokens=20000, max_queue_delay_s=0.05)
        short, long = [200 + i for i in range(12)], [2000 + i for i in range(6)]
        items = [(i, t) for i, t in enumerate(short + long)]
        await asyncio.gather(*(b.submit(i, t) for i, t in items))
        for batch in model.batches:  # never a 200-token image padded to 2000
            assert len({items[i][1] >= 2000 for i in batch}) == 1
        real = sum(i.real_tokens for i in infos)
        computed = sum(i.size * i.padded_length for i in infos)
        assert real / computed > 0.95
        await b.stop()

    run(main)


def test_lone_item_waits_at_most_the_queue_delay() -> None:
    async def main() -> None:
        b, infos = await started(FakeModel(), max_queue_delay_s=0.05)
        t0 = time.monotonic()
        assert await b.submit(7, 100) == 70
        elapsed = time.monotonic() - t0
        assert 0.04 <= elapsed < 1.0
        assert infos[0].queue_waits_s[0] >= 0.04
        await b.stop()

    run(main)


def test_lone_item_leaves_at_once_when_nothing_is_upstream() -> None:
    """At concurrency 1 the queue delay is pure latency: with nobody being decoded or packed,
    nobody can join in time, so the batch goes at once; with somebody upstream, it waits."""

    async def main() -> None:
        upstream = [0]
        model = FakeModel()
        b: Batcher[int, int] = Batcher(
            model, BatcherConfig(max_queue_delay_s=5.0), upstream=lambda: upstream[0]
        )
        await b.start()
        t0 = time.monotonic()
        assert await b.submit(7, 100) == 70
        assert time.monotonic() - t0 < 1.0  # far below the 5 s delay
        upstream[0] = 1
        late = asyncio.create_task(b.submit(8, 100))
        await asyncio.sleep(0.3)
        assert not late.done()  # waiting for the item being packed
        upstream[0] = 0
        joined = asyncio.create_task(b.submit(9, 100))
        assert await asyncio.gather(late, joined) == [80, 90]
        assert model.batches == [[7], [8, 9]]
        await b.stop()

    run(main)


def test_a_full_batch_leaves_without_waiting() -> None:
    async def main() -> None:
        b, _ = await started(FakeModel(), max_queue_delay_s=5.0, max_batch_size=4)
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(i, 10) for i in range(4)))
        assert time.monotonic() - t0 < 1.0  # far below the 5 s delay
        await b.stop()

    run(main)


def test_long_image_is_not_starved_by_a_stream_of_short_ones() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.005)
        b, infos = await started(model, max_batch_size=4, max_queue_delay_s=0.001)
        stop = asyncio.Event()

        shorts: list[asyncio.Task[int]] = []

        async def stream() -> None:
            i = 1000
            while not stop.is_set():
                shorts.append(asyncio.create_task(b.submit(i, 100)))
                i += 1
                await asyncio.sleep(0.0005)

        producer = asyncio.create_task(stream())
        await asyncio.sleep(0.05)
        long_result = await asyncio.wait_for(b.submit(1, 3000), 2.0)
        stop.set()
        await producer
        await asyncio.gather(*shorts, return_exceptions=True)
        assert long_result == 10
        # Short items arrive faster than they are served, so some always wait; a policy that
        # favoured the fullest bucket would never run the long one (the 2 s wait_for would fire).
        # Oldest-first runs it once the items queued before it are done.
        long_info = next(i for i in infos if i.padded_length == 3000)
        assert long_info.size == 1 and long_info.queue_waits_s[0] < 1.0
        assert any(i.padded_length == 100 for i in infos[infos.index(long_info) + 1 :])  # stream went on
        await b.stop()

    run(main)


def test_cancelled_callers_cost_no_compute() -> None:
    async def main() -> None:
        model = FakeModel()
        b, _ = await started(model, max_queue_delay_s=0.1, max_batch_size=8)
        keep = asyncio.create_task(b.submit(1, 50))
        gone = asyncio.create_task(b.submit(2, 50))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await keep == 10
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert 2 not in model.seen
        assert b.depth == 0
        await b.stop()

    run(main)


def test_deadline_in_the_queue_raises_and_skips_compute() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=1.0)
        b, _ = await started(model, max_queue_delay_s=0.0, max_batch_size=1)
        first = asyncio.create_task(b.submit(1, 10))  # occupies the model for 1 s
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await b.submit(2, 10, timeout_s=0.05)
        # The caller learns at its deadline, not when the model is free again (1 s).
        assert time.monotonic() - t0 < 0.5
        assert await first == 10
        await asyncio.sleep(0.05)
        assert 2 not in model.seen
        await b.stop()

    run(main)


def test_queue_full_rejects_with_retry_after_then_recovers() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.05)
        b, _ = await started(model, max_queue_items=3, max_batch_size=1, max_queue_delay_s=0.0)
        tasks = [asyncio.create_task(b.submit(0, 10))]
        await asyncio.sleep(0.01)  # item 0 is running (0.05 s)
        tasks += [asyncio.create_task(b.submit(i, 10)) for i in range(1, 4)]
        await asyncio.sleep(0)  # items 1..3 fill the queue
        assert b.depth == 3 and b.in_flight == 1
        with pytest.raises(QueueFull) as err:
            await b.submit(99, 10)
        assert err.value.retry_after_s >= 1
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30]
        assert await b.submit(5, 10) == 50  # room again
        await b.stop()

    run(main)


def test_model_failure_reaches_only_that_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        b, infos = await started(model, max_batch_size=2, max_queue_delay_s=0.02)
        results = await asyncio.gather(*(b.submit(i, 10) for i in range(4)), return_exceptions=True)
        bad = [r for r in results if isinstance(r, Exception)]
        assert not bad
        model.fail_on = {7}
        results = await asyncio.gather(b.submit(7, 10), b.submit(8, 10), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert infos[-1].error == "RuntimeError"
        assert await b.submit(9, 10) == 90  # the worker survived
        await b.stop()

    run(main)


def test_graceful_stop_finishes_accepted_work_and_refuses_new() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.02)
        b, _ = await started(model, max_batch_size=2, max_queue_delay_s=0.5)
        tasks = [asyncio.create_task(b.submit(i, 10)) for i in range(5)]
        await asyncio.sleep(0.005)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await b.submit(100, 10)
        await stopping
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]

    run(main)


def test_oversized_items_and_bad_configs_are_refused() -> None:
    async def main() -> None:
        b, _ = await started(FakeModel(), max_batch_tokens=1000)
        with pytest.raises(ItemTooLarge, match="1001 tokens"):
            await b.submit(1, 1001)
        await b.stop()

    run(main)
    with pytest.raises(ValueError):
        BatcherConfig(buckets=(512, 256))
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0)


def test_a_failing_metrics_hook_does_not_stop_the_worker() -> None:
    async def main() -> None:
        def boom(info: BatchInfo) -> None:
            raise ValueError("hook")

        b: Batcher[int, int] = Batcher(FakeModel(), BatcherConfig(max_queue_delay_s=0.0), on_batch=boom)
        await b.start()
        assert await b.submit(1, 10) == 10
        assert await b.submit(2, 10) == 20
        await b.stop()

    run(main)


def test_per_item_timings_are_reported() -> None:
    async def main() -> None:
        b, _ = await started(FakeModel(delay_s=0.02), max_queue_delay_s=0.01)
        timings: dict[str, float] = {}
        assert await b.submit(3, 10, timings=timings) == 30
        assert timings["queue_s"] >= 0.009 and timings["infer_s"] >= 0.019
        await b.stop()

    run(main)


class Gate:
    """A fake model whose batches wait until the test opens the gate."""

    def __init__(self) -> None:
        self.model = FakeModel()
        self.open = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        if not self.open.wait(10):
            raise RuntimeError("the gate was never opened")
        return self.model(items)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def test_an_item_that_would_miss_its_deadline_is_refused_at_once() -> None:
    """At the measured rate, the work ahead (running plus waiting) plus the item's own must fit in
    half its deadline; otherwise `submit` refuses at once (`WouldMissDeadline`, a `QueueFull`
    with a retry-after) instead of accepting it only for it to time out."""

    async def main() -> None:
        gate = Gate()
        b: Batcher[int, int] = Batcher(gate, BatcherConfig(max_queue_delay_s=0.0, max_batch_size=1))
        b.seed_rate(100.0)  # tokens per second
        await b.start()
        running = asyncio.create_task(b.submit(1, 100))  # 1 s of work at that rate
        await until(lambda: b.in_flight == 1)
        assert b.expected_wait_s(100) == pytest.approx(2.0)
        with pytest.raises(WouldMissDeadline) as err:
            await asyncio.wait_for(b.submit(2, 100, timeout_s=3.0), 1.0)  # 2 s > half of 3 s
        assert isinstance(err.value, QueueFull) and err.value.retry_after_s >= 1
        with pytest.raises(WouldMissDeadline):
            b.check_deadline(0, 1.5)  # callers may ask before decoding: 1 s ahead > 0.75 s
        b.check_deadline(0, 2.5)  # 1 s ahead, within half of 2.5 s
        accepted = asyncio.create_task(b.submit(3, 100, timeout_s=5.0))  # 2 s <= half of 5 s
        await until(lambda: b.depth == 1)
        gate.open.set()
        assert await asyncio.gather(running, accepted) == [10, 30]
        assert 2 not in gate.model.seen
        await b.stop()

    run(main)


@pytest.mark.timeout(30)  # a worker that kept expired items could spin on them without yielding
def test_the_worker_drops_items_whose_deadline_passed_while_they_waited() -> None:
    """Worker-side expiry, on the batcher's own clock: items whose deadline passed while a batch ran
    are failed with DeadlineExceeded when the next batch is formed, and never computed, whether
    they are at the head of their bucket or behind a live item. The injected clock jumps 30 s, so
    the callers' own timers (real seconds) never fire during the test."""

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    async def main() -> None:
        clock, gate = Clock(), Gate()
        b: Batcher[int, int] = Batcher(
            gate, BatcherConfig(max_queue_delay_s=0.0, max_batch_size=8), clock=clock
        )
        await b.start()
        running = asyncio.create_task(b.submit(1, 10))
        await until(lambda: b.in_flight == 1)
        head = asyncio.create_task(b.submit(2, 10, timeout_s=20))  # expires, at the head
        live = asyncio.create_task(b.submit(3, 10))  # no deadline
        behind = asyncio.create_task(b.submit(4, 10, timeout_s=20))  # expires, behind a live item
        await until(lambda: b.depth == 3)
        clock.now += 30
        gate.open.set()
        assert await running == 10
        assert await asyncio.wait_for(live, 5) == 30
        for expired in (head, behind):
            with pytest.raises(DeadlineExceeded, match=r"30\.000 s"):
                await asyncio.wait_for(expired, 5)
        assert gate.model.seen == [1, 3]
        assert b.depth == 0
        await b.stop()

    run(main)
