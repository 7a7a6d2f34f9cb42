"""Dynamic batching by token length: the small core between the request handlers and a model.

MUSIQ inputs vary in length (49 + 144 resized tokens plus however many native patches an image
has), and a batch computes every item at the longest item's length. So the queue is split into
length buckets; a batch takes items of one bucket only, while `batch size x padded length` stays
within a token budget. Scheduling rules, in order:

- **No starvation.** Every batch is built around the oldest live item in the whole queue, so an
  item waits for at most the items that arrived before it, whatever their lengths.
- **Bounded wait.** A batch that is not full leaves when its oldest item has waited
  `max_queue_delay_s`; a full one leaves at once, and so does one that no item can join in time
  (the optional `upstream` count, items being decoded and packed, is zero: a request not yet
  in that stage needs longer than the delay to reach the queue).
- **Backpressure.** At most `max_queue_items` wait; beyond that `submit` raises `QueueFull` with a
  retry-after estimate from the measured service rate (HTTP 429 / gRPC RESOURCE_EXHAUSTED). An
  item that, at the measured rate, would wait past its own deadline is refused the same way
  (`WouldMissDeadline`) at once, instead of being accepted only to time out: under overload the
  accepted items finish in time and the rest learn immediately when to come back.
- **Deadlines and cancellation.** An item whose deadline passed, or whose caller went away, is
  dropped before it costs compute; its caller gets `DeadlineExceeded` (or nothing, if gone).
- **Graceful stop.** `stop()` refuses new items and finishes every accepted one.
- **Hung models.** A batch that runs past `run_timeout_s` fails its callers (`InferenceTimeout`)
  instead of holding them; its thread cannot be killed, so until it returns every later batch
  fails at once (`ModelStuck`) rather than piling more threads onto a model that hangs.

One worker task per batcher runs batches one at a time through `run_batch` in a thread (ONNX
Runtime releases the GIL), forming the next batch while the current one computes. Framework-free:
the REST and gRPC layers, and the tests' fake models, all drive it the same way.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

# An item is refused at once when the work ahead of it would use more than this share of its
# deadline: the estimate is an average, and the rest absorbs batches slower than average.
ADMISSION_SHARE = 0.5

T = TypeVar("T")
R = TypeVar("R")


class BatcherError(RuntimeError):
    """Base of the batcher's refusals."""


class QueueFull(BatcherError):
    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({depth} items waiting); retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class WouldMissDeadline(QueueFull):
    def __init__(self, depth: int, wait_s: float, timeout_s: float, retry_after_s: float) -> None:
        BatcherError.__init__(
            self,
            f"about {wait_s:.1f} s of work is queued ahead, more than the {timeout_s:g} s deadline; "
            f"retry in {retry_after_s:.0f} s",
        )
        self.retry_after_s = retry_after_s


class ShuttingDown(BatcherError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new work")


class DeadlineExceeded(BatcherError):
    def __init__(self, waited_s: float) -> None:
        super().__init__(f"deadline passed after {waited_s:.3f} s in the queue")


class InferenceTimeout(BatcherError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"inference did not finish within {timeout_s:g} s")


class ModelStuck(BatcherError):
    def __init__(self) -> None:
        super().__init__("the model is still stuck in an earlier inference that timed out")


class ItemTooLarge(BatcherError):
    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"an item of {tokens} tokens exceeds the batch budget of {budget} tokens")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_tokens: int = 16384  # batch size x padded length
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.004
    max_queue_items: int = 512
    run_timeout_s: float | None = None  # a batch running longer is a model fault
    # Upper edges of the length buckets; longer items share the last bucket.
    buckets: tuple[int, ...] = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.max_queue_items < 1:
            raise ValueError("batch budget, batch size and queue size must be positive")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be strictly increasing")

    def bucket(self, tokens: int) -> int:
        """The length bucket of an item of `tokens` padded rows (0 .. len(buckets))."""
        return bisect.bisect_left(self.buckets, tokens)


def take_batch(tokens: Iterable[int], config: BatcherConfig) -> tuple[int, bool]:
    """How many of the items whose padded lengths are `tokens` (in queue order, one bucket) one
    batch takes, and whether that batch is full: items join while the batch holds at most
    `max_batch_size` and `size x longest length` stays within `max_batch_tokens`.

    The one copy of the rule: the server's batcher (`Batcher._fill`) and `musiq bulk`'s inference
    actors (bulk/pipeline.py) both call it, so both form the same batches from the same items."""
    count = longest = 0
    for item in tokens:
        length = max(longest, item)
        if count + 1 > config.max_batch_size or (count + 1) * length > config.max_batch_tokens:
            return count, True
        count += 1
        longest = length
    return count, count >= config.max_batch_size


@dataclass(frozen=True)
class BatchInfo:
    """What one dispatched batch looked like (for metrics)."""

    size: int
    padded_length: int
    real_tokens: int
    queue_waits_s: tuple[float, ...]
    run_s: float
    error: str | None = None

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / (self.size * self.padded_length) if self.size else 1.0


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    tokens: int
    bucket: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future[R] = field(repr=False)
    timings: dict[str, float] | None = None


class Batcher(Generic[T, R]):
    """`await batcher.submit(item, tokens)` -> that item's result from `run_batch`.

    `run_batch(items) -> results` (same order) runs in a thread; if it raises, every item of the
    batch gets the exception. `on_batch` receives a `BatchInfo` after each batch (metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        config: BatcherConfig = BatcherConfig(),
        *,
        on_batch: Callable[[BatchInfo], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        upstream: Callable[[], int] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.upstream = upstream
        self.config = config
        self.on_batch = on_batch
        self.clock = clock
        self._buckets: list[deque[_Entry[T, R]]] = [deque() for _ in range(len(config.buckets) + 1)]
        self._pending = 0
        self._in_flight = 0
        self._in_flight_tokens = 0
        self._closing = False
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._tokens_per_s = 0.0  # EWMA of measured throughput, for retry-after estimates
        self._stuck: asyncio.Future[Sequence[R]] | None = None  # a timed-out batch still running

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.create_task(self._work(), name="musiq-batcher")

    async def stop(self) -> None:
        """Refuses new items, finishes every accepted one, then ends the worker."""
        self._closing = True
        if self._wakeup:
            self._wakeup.set()
        if self._worker:
            await self._worker
            self._worker = None

    @property
    def depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return self._pending

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stuck(self) -> bool:
        """Whether a batch that timed out is still running in its thread."""
        return self._stuck is not None and not self._stuck.done()

    # ------------------------------------------------------------------ submitting

    def seed_rate(self, tokens_per_s: float) -> None:
        """A first throughput estimate (from the warm-up) until real batches are measured."""
        if self._tokens_per_s == 0 and tokens_per_s > 0:
            self._tokens_per_s = tokens_per_s

    def expected_wait_s(self, tokens: int) -> float:
        """Seconds until an item of `tokens` would be answered, from every token waiting or
        running ahead of it at the measured rate (0 before any measurement or with nothing ahead)."""
        ahead = self._tokens_ahead()
        if self._tokens_per_s <= 0 or ahead == 0:
            return 0.0  # nothing ahead: waiting would not help, so the item is always tried
        return (ahead + tokens) / self._tokens_per_s

    def _tokens_ahead(self) -> int:
        return sum(e.tokens for b in self._buckets for e in b if not e.future.done()) + self._in_flight_tokens

    def check_deadline(self, tokens: int, timeout_s: float | None) -> None:
        """Raises WouldMissDeadline if an item of `tokens` queued now would likely miss `timeout_s`.

        Callers may ask before doing expensive work for an item (tokens=0: the queue alone), so
        that refusing under overload costs next to nothing."""
        if timeout_s is not None and (wait := self.expected_wait_s(tokens)) > ADMISSION_SHARE * timeout_s:
            raise WouldMissDeadline(self._pending, wait, timeout_s, self.retry_after_s())

    def retry_after_s(self) -> float:
        """Seconds until the queue has room, from the measured service rate (1 s .. 60 s)."""
        waiting = sum(e.tokens for b in self._buckets for e in b)
        if self._tokens_per_s <= 0:
            return 1.0
        return float(min(60, max(1, math.ceil(waiting / self._tokens_per_s))))

    async def submit(
        self, item: T, tokens: int, *, timeout_s: float | None = None, timings: dict[str, float] | None = None
    ) -> R:
        """Queues `item` (costing `tokens` padded rows) and waits for its result.

        Raises QueueFull, ShuttingDown, ItemTooLarge at once; DeadlineExceeded when `timeout_s`
        passes first. If the awaiting task is cancelled (client gone) the item is dropped. A
        `timings` dict receives the item's `queue_s` and its batch's `infer_s`.
        """
        if self._worker is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if self._closing:
            raise ShuttingDown()
        if tokens > self.config.max_batch_tokens:
            raise ItemTooLarge(tokens, self.config.max_batch_tokens)
        if self._pending >= self.config.max_queue_items:
            raise QueueFull(self._pending, self.retry_after_s())
        self.check_deadline(tokens, timeout_s)
        now = self.clock()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        bucket = self.config.bucket(tokens)
        deadline = now + timeout_s if timeout_s is not None else None
        entry = _Entry(item, tokens, bucket, now, deadline, future, timings)
        self._buckets[bucket].append(entry)
        self._pending += 1
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if timeout_s is None:
                return await asyncio.shield(future)
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            if not future.done():
                future.cancel()
            raise DeadlineExceeded(self.clock() - now) from None
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()  # the worker skips it; nobody is waiting for the result
            raise

    # ------------------------------------------------------------------ the worker

    def _oldest(self) -> _Entry[T, R] | None:
        """Drops dead heads (cancelled or expired) and returns the oldest live entry."""
        now = self.clock()
        best: _Entry[T, R] | None = None
        for queue in self._buckets:
            while queue:
                head = queue[0]
                if head.future.done():
                    queue.popleft()
                    self._pending -= 1
                elif head.deadline is not None and head.deadline <= now:
                    queue.popleft()
                    self._pending -= 1
                    head.future.set_exception(DeadlineExceeded(now - head.enqueued))
                else:
                    break
            if queue and (best is None or queue[0].enqueued < best.enqueued):
                best = queue[0]
        return best

    def _fill(self, bucket: int) -> tuple[list[_Entry[T, R]], bool]:
        """The entries a batch would take from `bucket` now (oldest first), and whether it is full."""
        now = self.clock()
        live: list[_Entry[T, R]] = []

        def tokens() -> Iterator[int]:  # lazily: take_batch stops reading once the batch is full
            for entry in self._buckets[bucket]:
                if not (entry.future.done() or (entry.deadline is not None and entry.deadline <= now)):
                    live.append(entry)
                    yield entry.tokens

        count, full = take_batch(tokens(), self.config)
        return live[:count], full

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            oldest = self._oldest()
            if oldest is None:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for company until the oldest item's delay is used up or the batch is full;
            # while closing, go at once.
            while not self._closing:
                _, full = self._fill(oldest.bucket)
                remaining = oldest.enqueued + self.config.max_queue_delay_s - self.clock()
                if full or remaining <= 0 or oldest.future.done():
                    break
                if self.upstream is not None and self.upstream() == 0:
                    break  # nobody can join within the delay: waiting would only add latency
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if oldest.future.done():
                continue  # cancelled while we waited; start over from the new oldest
            batch, _ = self._fill(oldest.bucket)
            if not batch:
                continue
            taken = {id(e) for e in batch}
            queue = self._buckets[oldest.bucket]
            keep = deque(e for e in queue if id(e) not in taken and not e.future.done())
            self._pending -= len(queue) - len(keep)  # taken, plus callers that left meanwhile
            self._buckets[oldest.bucket] = keep
            await self._dispatch(batch)

    async def _run(self, items: list[T]) -> Sequence[R]:
        if self.stuck:
            raise ModelStuck()
        running = asyncio.get_running_loop().run_in_executor(None, self.run_batch, items)
        timeout = self.config.run_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(running), timeout)
        except TimeoutError:
            self._stuck = running
            running.add_done_callback(_consume)  # its late result or error is nobody's
            raise InferenceTimeout(timeout or 0.0) from None

    async def _dispatch(self, batch: list[_Entry[T, R]]) -> None:
        start = self.clock()
        waits = tuple(start - e.enqueued for e in batch)
        padded = max(e.tokens for e in batch)
        real = sum(e.tokens for e in batch)
        self._in_flight += len(batch)
        self._in_flight_tokens += real
        error: str | None = None
        try:
            results = await self._run([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the model failed: every caller of this batch learns why
            error = type(exc).__name__
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
        else:
            for e, r in zip(batch, results, strict=True):
                if not e.future.done():
                    e.future.set_result(r)
        finally:
            self._in_flight -= len(batch)
            self._in_flight_tokens -= real
        run_s = self.clock() - start
        for e, wait in zip(batch, waits, strict=True):
            if e.timings is not None:
                e.timings["queue_s"] = wait
                e.timings["infer_s"] = run_s
        if error is None and run_s > 0:
            rate = len(batch) * padded / run_s
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
        if self.on_batch:
            try:
                self.on_batch(BatchInfo(len(batch), padded, real, waits, run_s, error))
            except Exception:  # a metrics hook must never stop the worker
                logger.exception("on_batch hook failed")


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log "exception never retrieved"
