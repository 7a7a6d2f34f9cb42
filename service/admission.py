"""Admission: whether a request may start costing anything, decided before any decoding.

Why apart from the core: under overload the cheapest answer is a refusal at the door. Every check
here runs before the image is decoded or queued, so an overloaded server grows neither memory nor
the decode pool's backlog, and a client gets a retryable refusal with Retry-After at once instead of
a timeout later. The rules (serving or not, the in-progress limit, deadline-aware admission, the
explanation queue's own bounds) change together and are tested together (`tests/test_deadlines.py`,
`tests/test_contract.py`), apart from how a request is then scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from service.batcher import WouldMissDeadline
from service.errors import ScoringError
from service.health import Health
from service.settings import ServiceSettings


class ModelQueue(Protocol):
    """What admission reads from a model's batcher: the work ahead of a new request."""

    def check_deadline(self, tokens: int, timeout_s: float | None) -> None: ...

    def retry_after_s(self) -> float: ...


class Admission:
    """The door every score and explain request passes: refuses while the server is not serving,
    past `max_in_progress` requests, or when the work queued ahead would miss the request's deadline.

    `in_progress` counts requests between admission and answer (decode, queue, inference)."""

    def __init__(self, settings: ServiceSettings, health: Health) -> None:
        self.settings = settings
        self.health = health
        self.in_progress = 0

    def check_ready(self) -> None:
        """Draining (SIGTERM) or not (yet) ready: a retryable refusal before any work."""
        if self.health.draining:
            raise ScoringError("shutting_down", "the server is shutting down", retry_after_s=1)
        if not self.health.ready:
            raise ScoringError("not_ready", "the service is not ready", retry_after_s=1)

    @contextlib.contextmanager
    def admitted(self, queue: ModelQueue, timeout_s: float) -> Iterator[None]:
        """Admission comes first: past `max_in_progress` requests, or when the work ahead would
        miss this request's deadline, a new one is refused (429) before it costs any decoding, so
        overload grows neither memory nor the decode pool's backlog."""
        if self.in_progress >= self.settings.max_in_progress:
            raise ScoringError(
                "overloaded",
                f"{self.in_progress} requests in progress, the limit is {self.settings.max_in_progress}",
                retry_after_s=queue.retry_after_s(),
            )
        try:
            queue.check_deadline(0, timeout_s)
        except WouldMissDeadline as exc:
            raise ScoringError("overloaded", str(exc), retry_after_s=exc.retry_after_s) from exc
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1


class ExplainQueue:
    """Explanations are bounded apart from scoring: `explain_concurrency` rollouts run at once (each
    in `pool`), and at most `explain_max_waiting` requests wait for one (beyond: 429 `queue_full`).

    A request holds `waiting()` from admission until it has a slot (`acquire`), and the slot until
    its rollout is done (`release`)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.waiting_count = 0
        self.pool: ThreadPoolExecutor | None = None
        self.slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        concurrency = max(1, self.settings.explain_concurrency)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="musiq-explain")
        self.slots = asyncio.Semaphore(concurrency)

    def stop(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Counts this request among the waiting ones, or refuses it when too many wait."""
        if self.waiting_count >= self.settings.explain_max_waiting:
            raise ScoringError("queue_full", "too many explanations are waiting", retry_after_s=1)
        self.waiting_count += 1
        try:
            yield
        finally:
            self.waiting_count -= 1

    async def acquire(self, deadline: float) -> None:
        """Waits for a rollout slot until `deadline` (time.monotonic); past it: `deadline_exceeded`."""
        assert self.slots is not None
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise ScoringError("deadline_exceeded", "no explanation slot before the deadline") from exc

    def release(self) -> None:
        assert self.slots is not None
        self.slots.release()
