"""Decode + multi-scale packing in worker processes, the packed rows handed back through shared memory.

Why processes: in threads of one Python process, decode and pack contend for the GIL (Pillow and
simplejpeg release it while decoding, but packing is many numpy calls on small arrays, each holding
it): on 2 cores, concurrency 8 gave only 1.47x the images/s of concurrency 1. A worker process has
its own interpreter, so N workers use N cores (`bench/results/DATA_PLANE.md`).

Why shared memory: the packed rows of a 1024x768 image are 11 MB of float32. Pickled through a pipe
they cost ~5 ms (pickle, write, read, unpickle) against ~7 ms of decode + pack; copied out of a
shared-memory slab they cost ~0.3 ms. Each worker owns one slab: an anonymous memory file
(`memfd_create`; elsewhere an unlinked temporary file) that this process creates and hands to the
worker as a file descriptor. It has no name, so nothing can leak in /dev/shm, even if the server is
killed, and the 64 MB /dev/shm of a default container does not bound it. The worker writes its
result there and sends a small header (dtypes, shapes, offsets, the layout, the timings) through its
socket; the caller copies the arrays out, and the slab is free for the worker's next image. A
result larger than the slab (a huge image with no native-token cap) travels pickled through the
socket instead: slower, never refused.

Failure: a worker that dies while preparing an image (killed, out of memory, a decoder crash) or
takes longer than `task_timeout_s` makes that one call raise `WorkerDied`, and a replacement worker
is started at once (one found dead while idle is replaced before it is given an image). Decode
errors (`ImageDecodeError` and its reasons, `ImageTooLargeError`) cross the socket as themselves.

Workers are fresh interpreters (`python -c`, not multiprocessing: nothing of the server's main
module, sockets or ONNX Runtime threads is inherited or re-imported) that import only numpy,
Pillow, simplejpeg and `model.packing` (this module imports nothing else at its top), so they start
in a fraction of a second, while the models load, and never import torch. They ignore SIGINT (the
server stops them) and exit when the server's end of their socket closes.

Callers block (`prepare`, `score_input`): the server calls them from threads of its own, one per
worker, which wait on the socket with the GIL released.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from model.config import PackingConfig
from model.packing import PackedImage, ScaleLayout
from service.prepare import Prepared, ScoreInput, prepare_image

_ALIGN = 64  # each array starts on a cache line in the slab
_ROOT = str(Path(__file__).resolve().parents[1])  # holds service/ and model/: the workers import these
# Appended, not prepended, to the worker's path: where the server's own packages are installed,
# nothing there may shadow the standard library.
_WORKER_CODE = (
    "import sys; root = sys.argv.pop(1); root in sys.path or sys.path.append(root); "
    "from service.prepare_pool import _worker_main; _worker_main()"
)


class WorkerDied(RuntimeError):
    """The worker process preparing this image ended (or overran its time) before answering.

    That request fails (the server answers 503 `decode_failed`, retryable); the worker is replaced."""


@dataclass(frozen=True)
class _Task:
    data: bytes
    packing: PackingConfig
    full: bool  # the decoded pixels and the official layout too (explanations), not only the compute rows


@dataclass(frozen=True)
class _Reply:
    """A worker's answer. `arrays` are (dtype, shape, offset) in the slab, in `_arrays` order, or
    `inline` holds the arrays themselves when they did not fit."""

    arrays: tuple[tuple[str, tuple[int, ...], int], ...]
    inline: tuple[np.ndarray, ...] | None
    compute_layout: tuple[ScaleLayout, ...]
    packed_layout: tuple[ScaleLayout, ...] | None  # None: the official layout is the compute one
    tokens: int
    timings: dict[str, float]


def _arrays(prepared: Prepared, full: bool) -> tuple[list[np.ndarray], bool]:
    """The arrays a reply carries: the compute rows; with `full`, the pixels and (when padding rows
    were dropped) the official rows too. Also whether the official layout is a separate one."""
    c = prepared.compute
    out = [c.patches, c.spatial, c.scale, c.mask]
    separate = full and prepared.packed is not prepared.compute
    if full:
        out.append(prepared.pixels)
    if separate:
        p = prepared.packed
        out += [p.patches, p.spatial, p.scale, p.mask]
    return out, separate


def _reply(prepared: Prepared, full: bool, slab: memoryview) -> _Reply:
    arrays, separate = _arrays(prepared, full)
    placed: list[tuple[str, tuple[int, ...], int]] = []
    offset = 0
    for a in arrays:
        placed.append((a.dtype.str, tuple(a.shape), offset))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    fits = offset <= len(slab)
    if fits:
        for a, (_, _, at) in zip(arrays, placed, strict=True):
            np.frombuffer(slab, np.uint8, a.nbytes, at)[...] = (
                np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            )
    return _Reply(
        tuple(placed),
        None if fits else tuple(arrays),
        prepared.compute.layout,
        prepared.packed.layout if separate else None,
        prepared.packed.num_tokens,
        prepared.timings,
    )


def _worker_main() -> None:
    """A worker's loop (`python -c`, argv: socket fd, slab fd, slab bytes, max_pixels, drop,
    heap_keep_mb): a task in, a reply (or the decode error) out, until None or the server's end closes."""
    from service.heap import keep_freed_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    sock_fd, slab_fd, slab_bytes, max_pixels, drop, heap_keep_mb = (int(a) for a in sys.argv[1:7])
    keep_freed_memory(heap_keep_mb)  # packing's arrays reuse pages, as in the server (service/heap.py)
    conn = Connection(sock_fd)
    slab = mmap.mmap(slab_fd, slab_bytes)
    view = memoryview(slab)
    conn.send(os.getpid())
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if task is None:
            return
        try:
            prepared = prepare_image(
                task.data, task.packing, max_pixels=max_pixels, drop_padding_rows=bool(drop)
            )
            answer: object = _reply(prepared, task.full, view)
        except Exception as exc:  # ImageDecodeError (with its reason), or a bug: the caller re-raises it
            answer = exc
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return
        except Exception as exc:  # an exception that does not pickle: its text does
            conn.send(RuntimeError(f"{type(answer).__name__}: {answer} (unpicklable: {exc})"))


def _memory_file(size: int) -> int:
    """A file descriptor of `size` bytes of shared memory with no name (nothing to leak)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("musiq-prepare", os.MFD_CLOEXEC)
    else:  # not Linux: an unlinked temporary file, in memory where /dev/shm exists
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="musiq-prepare-", dir=shm)
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


class _Worker:
    """One worker process, its socket and its slab (the slab outlives the process: a replacement
    reuses it)."""

    def __init__(self, index: int, slab_bytes: int, max_pixels: int, drop: bool, heap_keep_mb: int) -> None:
        self.index, self.slab_bytes = index, slab_bytes
        self.args = (max_pixels, int(drop), heap_keep_mb)
        self.slab_fd = _memory_file(slab_bytes)
        self.slab = mmap.mmap(self.slab_fd, slab_bytes)
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.ready = False  # its hello (the pid) has been read

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_CODE,
                    _ROOT,
                    str(theirs.fileno()),
                    str(self.slab_fd),
                    str(self.slab_bytes),
                    *map(str, self.args),
                ],
                pass_fds=(theirs.fileno(), self.slab_fd),
                stdin=subprocess.DEVNULL,
            )
            # only the worker keeps its end: its death is EOF here
            self.conn, self.ready = Connection(ours.detach()), False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float) -> None:
        """Asks the worker to exit, kills it if it does not, and reaps it."""
        if self.process is None:
            return
        if self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None

    def close(self) -> None:
        self.slab.close()
        os.close(self.slab_fd)

    def call(self, task: _Task, timeout_s: float) -> _Reply:
        """Sends one task, returns the reply; `WorkerDied` if the process ends or overruns."""
        assert self.conn is not None and self.process is not None
        deadline = time.monotonic() + timeout_s
        try:
            self.conn.send(task)
            if not self.ready:
                self._recv(deadline)  # the hello: the worker has imported what it needs
                self.ready = True
            answer = self._recv(deadline)
        except (EOFError, OSError) as exc:
            try:
                code: int | None = self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                code = None
            raise WorkerDied(
                f"the decode worker ended while preparing this image (exit code {code})"
            ) from exc
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, _Reply)
        return answer

    def _recv(self, deadline: float) -> Any:
        assert self.conn is not None and self.process is not None
        if not self.conn.poll(max(0.0, deadline - time.monotonic())):
            self.process.kill()  # a stuck decoder: the replacement starts clean
            raise WorkerDied("the decode worker overran its time limit on this image and was replaced")
        return self.conn.recv()


class PreparePool:
    """`processes` worker processes that decode and pack (`service.prepare.prepare_image`).

    `score_input` returns only what scoring needs (no pixels, no padding rows cross the process
    boundary); `prepare` returns the whole `Prepared` (explanations need the pixels and the
    official layout). Both block until a worker is free and has answered."""

    def __init__(
        self,
        processes: int,
        *,
        max_pixels: int,
        drop_padding_rows: bool,
        slab_bytes: int = 64 * 2**20,
        task_timeout_s: float = 60.0,
        heap_keep_mb: int = 256,
    ) -> None:
        if processes < 1:
            raise ValueError(f"a prepare pool needs at least one process, got {processes}")
        self.processes = processes
        self.max_pixels, self.drop = max_pixels, drop_padding_rows
        self.slab_bytes, self.task_timeout_s = slab_bytes, task_timeout_s
        self.heap_keep_mb = heap_keep_mb
        self.replaced = 0  # workers restarted after dying or overrunning (a metric and the tests read it)
        self._workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Creates the slabs and starts every worker; does not wait for them to import (their first
        task waits), so that they start while the models load."""
        for i in range(self.processes):
            worker = _Worker(i, self.slab_bytes, self.max_pixels, self.drop, self.heap_keep_mb)
            self._workers.append(worker)
            try:
                worker.start()
            except BaseException:
                self.close()
                raise
            self._idle.put(worker)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until every worker has imported what it needs (its hello), so that the first
        request does not pay for it; a worker that cannot start fails the server's start-up."""
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            if worker.ready:
                continue
            try:
                worker._recv(deadline)
            except (EOFError, OSError, WorkerDied) as exc:
                code = worker.process.poll() if worker.process is not None else None
                raise RuntimeError(f"decode worker {worker.index} did not start (exit code {code})") from exc
            worker.ready = True

    def pids(self) -> list[int]:
        """The workers' process ids (tests kill them)."""
        return [w.process.pid for w in self._workers if w.process is not None]

    def score_input(self, data: bytes, packing: PackingConfig) -> ScoreInput:
        reply, worker = self._run(_Task(data, packing, full=False))
        try:
            arrays = self._copy_out(reply, worker)
        finally:
            self._idle.put(worker)
        return ScoreInput(
            self._packed(arrays[:4], reply.compute_layout, packing), reply.tokens, reply.timings
        )

    def prepare(self, data: bytes, packing: PackingConfig) -> Prepared:
        reply, worker = self._run(_Task(data, packing, full=True))
        try:
            arrays = self._copy_out(reply, worker)
        finally:
            self._idle.put(worker)
        compute = self._packed(arrays[:4], reply.compute_layout, packing)
        packed = (
            compute
            if reply.packed_layout is None
            else self._packed(arrays[5:9], reply.packed_layout, packing)
        )
        return Prepared(arrays[4], packed, compute, reply.timings)

    def _run(self, task: _Task) -> tuple[_Reply, _Worker]:
        """Runs a task on the next free worker; on success the worker is returned still taken (its
        slab holds the result until copied out)."""
        if self._closed:
            raise RuntimeError("the prepare pool is closed")
        worker = self._idle.get()
        if not worker.alive():  # died while idle: replaced before this image is given to it
            with self._lock:
                worker.stop(timeout_s=1.0)
                worker.start()
                self.replaced += 1
        try:
            return worker.call(task, self.task_timeout_s), worker
        except WorkerDied:
            self._replace(worker)
            raise
        except BaseException:
            self._idle.put(worker)
            raise

    def _replace(self, worker: _Worker) -> None:
        """Starts a fresh process in a dead worker's place (its slab is reused) and frees the slot."""
        with self._lock:
            worker.stop(timeout_s=1.0)
            if not self._closed:
                worker.start()
                self.replaced += 1
        self._idle.put(worker)

    def _copy_out(self, reply: _Reply, worker: _Worker) -> list[np.ndarray]:
        if reply.inline is not None:
            return list(reply.inline)
        buf = worker.slab
        out = []
        for dtype, shape, offset in reply.arrays:
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            out.append(np.frombuffer(buf, dt, count, offset).reshape(shape).copy())
        return out

    @staticmethod
    def _packed(
        arrays: list[np.ndarray], layout: tuple[ScaleLayout, ...], packing: PackingConfig
    ) -> PackedImage:
        patches, spatial, scale, mask = arrays
        return PackedImage(patches, spatial, scale, mask, layout, packing)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops every worker (a polite None, then kill) and unlinks the slabs; idempotent.

        Call it once no call is running (the server shuts its calling threads down first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for worker in self._workers:
            worker.stop(timeout_s)
        for worker in self._workers:
            worker.close()
        self._workers.clear()
