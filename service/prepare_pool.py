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

Lent slabs: `score_input` copies nothing. Besides its copy slab, each worker has `lease_slabs` more;
a scoring result is written into a free one and returned as read-only arrays over it, and the slab
returns to the free list only when the last array (or view of one) over it is garbage: the arrays'
memory is owned by one ctypes object exported from the mmap, and a `weakref.finalize` on that object
frees the slot (numpy keeps the buffer's owner alive through every derived view; a memoryview would
not, numpy re-wraps it). The batcher's collate copies the rows into the batch anyway, so the 11 MB
copy out of the slab (~0.7 ms of server CPU per 1024x768 image) was pure overhead. When every lent
slab of a worker is still held (a deep queue), the image goes through the copy slab as before.

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
import ctypes
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
import weakref
from collections.abc import Callable
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
    slot: int = 0  # the slab to write into: 0 the copy slab, 1.. a lent one


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


def _placed(buffer: Any, reply: _Reply) -> list[np.ndarray]:
    """The reply's arrays as views over `buffer` (a slab, or an object exported from one)."""
    out = []
    for dtype, shape, offset in reply.arrays:
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(buffer, np.dtype(dtype), count, offset).reshape(shape))
    return out


def _worker_main() -> None:
    """A worker's loop (`python -c`, argv: socket fd, slab fds (comma-separated), slab bytes,
    max_pixels, drop, heap_keep_mb): a task in, a reply (or the decode error) out, until None or the
    server's end closes."""
    from service.heap import keep_freed_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    sock_fd = int(sys.argv[1])
    slab_fds = [int(fd) for fd in sys.argv[2].split(",")]
    slab_bytes, max_pixels, drop, heap_keep_mb = (int(a) for a in sys.argv[3:7])
    keep_freed_memory(heap_keep_mb)  # packing's arrays reuse pages, as in the server (service/heap.py)
    conn = Connection(sock_fd)
    views = [memoryview(mmap.mmap(fd, slab_bytes)) for fd in slab_fds]
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
            answer: object = _reply(prepared, task.full, views[task.slot])
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
    """One worker process, its socket and its slabs: slot 0 copied out, slots 1.. lent (the slabs
    outlive the process: a replacement reuses them)."""

    def __init__(
        self, index: int, slab_bytes: int, max_pixels: int, drop: bool, heap_keep_mb: int, lease_slabs: int
    ) -> None:
        self.index, self.slab_bytes = index, slab_bytes
        self.args = (max_pixels, int(drop), heap_keep_mb)
        self.slab_fds: list[int] = []
        self.slabs: list[mmap.mmap] = []
        for _ in range(1 + lease_slabs):
            self.slab_fds.append(_memory_file(slab_bytes))
            self.slabs.append(mmap.mmap(self.slab_fds[-1], slab_bytes))
        # One ctypes type per worker (ctypes caches array types by length: one per image size would grow).
        self.lease_type = ctypes.c_char * slab_bytes
        # Free lent slots. A SimpleQueue: its put is safe from a finalizer, which runs wherever the
        # last view happens to be dropped (any thread, any lock held).
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(1, 1 + lease_slabs):
            self.free.put(slot)
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
                    ",".join(map(str, self.slab_fds)),
                    str(self.slab_bytes),
                    *map(str, self.args),
                ],
                pass_fds=(theirs.fileno(), *self.slab_fds),
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
        for slab, fd in zip(self.slabs, self.slab_fds, strict=True):
            # A lent slab still viewed by some array cannot be unmapped: it stays mapped until that
            # array goes (closing its descriptor does not unmap it).
            with contextlib.suppress(BufferError):
                slab.close()
            os.close(fd)

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
        lease_slabs: int = 4,
        on_replace: Callable[[], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"a prepare pool needs at least one process, got {processes}")
        self.processes = processes
        self.max_pixels, self.drop = max_pixels, drop_padding_rows
        self.slab_bytes, self.task_timeout_s = slab_bytes, task_timeout_s
        self.heap_keep_mb, self.lease_slabs = heap_keep_mb, lease_slabs
        self.replaced = 0  # workers restarted after dying or overrunning (the tests read it)
        self._on_replace = on_replace  # the server's metric (this module imports no server code)
        self._workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Creates the slabs and starts every worker; does not wait for them to import (their first
        task waits), so that they start while the models load."""
        for i in range(self.processes):
            worker = _Worker(
                i, self.slab_bytes, self.max_pixels, self.drop, self.heap_keep_mb, self.lease_slabs
            )
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
        """The compute rows as read-only arrays over a lent slab (no copy) when one is free."""
        reply, worker, slot = self._run(_Task(data, packing, full=False), lend=True)
        try:
            if slot and reply.inline is None:
                arrays = self._lend(reply, worker, slot)
                slot = 0  # the lease frees it now
            else:
                arrays = self._copy_out(reply, worker)
        finally:
            if slot:
                worker.free.put(slot)
            self._idle.put(worker)
        return ScoreInput(
            self._packed(arrays[:4], reply.compute_layout, packing), reply.tokens, reply.timings
        )

    def prepare(self, data: bytes, packing: PackingConfig) -> Prepared:
        reply, worker, _ = self._run(_Task(data, packing, full=True), lend=False)
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

    def _run(self, task: _Task, lend: bool) -> tuple[_Reply, _Worker, int]:
        """Runs a task on the next free worker, into a free lent slab if `lend` and one is free (else
        the copy slab, slot 0); on success the worker is returned still taken (its copy slab holds the
        result until copied out) with the slot, which the caller lends or frees."""
        if self._closed:
            raise RuntimeError("the prepare pool is closed")
        worker = self._idle.get()
        if not worker.alive():  # died while idle: replaced before this image is given to it
            with self._lock:
                worker.stop(timeout_s=1.0)
                worker.start()
                self._replaced()
        slot = 0
        if lend:
            with contextlib.suppress(queue.Empty):
                slot = worker.free.get_nowait()
        try:
            return (
                worker.call(_Task(task.data, task.packing, task.full, slot), self.task_timeout_s),
                worker,
                slot,
            )
        except WorkerDied:
            if slot:
                worker.free.put(slot)  # nothing views it: the replacement writes it only when told to
            self._replace(worker)
            raise
        except BaseException:
            if slot:
                worker.free.put(slot)
            self._idle.put(worker)
            raise

    def _replaced(self) -> None:
        """Counts a replacement (called under `_lock`)."""
        self.replaced += 1
        if self._on_replace is not None:
            self._on_replace()

    @staticmethod
    def _lend(reply: _Reply, worker: _Worker, slot: int) -> list[np.ndarray]:
        """Read-only arrays over lent slab `slot`; the slot is freed once none of them (nor any view
        of them) is left. Their memory's owner is one ctypes object exported from the mmap: every
        numpy view keeps it alive, and its finalizer frees the slot."""
        owner = worker.lease_type.from_buffer(worker.slabs[slot])
        weakref.finalize(owner, worker.free.put, slot)
        out = _placed(owner, reply)
        for array in out:
            array.flags.writeable = False  # the slab is shared memory: nothing here writes it
        return out

    def _replace(self, worker: _Worker) -> None:
        """Starts a fresh process in a dead worker's place (its slab is reused) and frees the slot."""
        with self._lock:
            worker.stop(timeout_s=1.0)
            if not self._closed:
                worker.start()
                self._replaced()
        self._idle.put(worker)

    def _copy_out(self, reply: _Reply, worker: _Worker) -> list[np.ndarray]:
        if reply.inline is not None:
            return list(reply.inline)
        return [array.copy() for array in _placed(worker.slabs[0], reply)]

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
