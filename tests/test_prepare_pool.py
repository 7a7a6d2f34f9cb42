"""Decode + pack in worker processes (`service/prepare_pool.py`): the same arrays as in-process
`prepare_image`, every error path kept, a killed or stuck worker a clean error and a replaced
worker, and nothing left behind (processes, /dev/shm, file descriptors) after shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.config import PackingConfig
from model.decode import ImageDecodeError, ImageTooLargeError
from service.prepare import Prepared, prepare_image
from service.prepare_pool import PreparePool, WorkerDied
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server

PACKING = PackingConfig(max_native_tokens=-1)
MAX_PIXELS = 4_000_000


def _same_packed(a: Any, b: Any) -> None:
    for field in ("patches", "spatial", "scale", "mask"):
        got, want = getattr(a, field), getattr(b, field)
        assert got.dtype == want.dtype and np.array_equal(got, want), field
    assert a.layout == b.layout and a.config == b.config


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def pool() -> Iterator[PreparePool]:
    p = PreparePool(2, max_pixels=MAX_PIXELS, drop_padding_rows=True)
    p.start()
    p.wait_ready()
    yield p
    p.close()


@pytest.mark.parametrize("drop", [True, False])
def test_workers_give_exactly_what_prepare_image_gives(drop: bool) -> None:
    data = jpeg(300, 500, seed=1)
    want = prepare_image(data, PACKING, max_pixels=MAX_PIXELS, drop_padding_rows=drop)
    # slab_bytes 1: nothing fits, every array travels pickled through the socket instead
    for slab_bytes in (64 * 2**20, 1):
        p = PreparePool(1, max_pixels=MAX_PIXELS, drop_padding_rows=drop, slab_bytes=slab_bytes)
        p.start()
        try:
            got = p.prepare(data, PACKING)
            scored = p.score_input(data, PACKING)
        finally:
            p.close()
        assert isinstance(got, Prepared) and np.array_equal(got.pixels, want.pixels)
        _same_packed(got.packed, want.packed)
        _same_packed(got.compute, want.compute)
        assert (got.packed is got.compute) == (want.packed is want.compute)
        _same_packed(scored.compute, want.compute)
        assert scored.tokens == want.packed.num_tokens
        assert set(scored.timings) == {"decode_s", "pack_s"}


def test_a_lent_slab_is_never_rewritten_while_a_view_of_it_lives() -> None:
    """`score_input` hands out arrays over a lent slab, not copies: the slab may take a new image only
    once nothing views it, derived views (a slice of the rows) included. With every lent slab held,
    images go through the copy slab and are still right."""
    import gc

    p = PreparePool(1, max_pixels=MAX_PIXELS, drop_padding_rows=True, lease_slabs=2)
    p.start()
    worker = p._workers[0]
    try:
        first = p.score_input(jpeg(200, 260, seed=1), PACKING)
        assert not first.compute.patches.flags.writeable  # shared memory: read-only here
        view = first.compute.patches[1:5]  # a derived view outlives the result it came from
        kept = view.copy()
        del first
        gc.collect()
        assert worker.free.qsize() == 1  # the view still holds its slab
        held = []
        for seed in range(2, 8):  # more images than free slabs: one lent, the rest copied
            data = jpeg(200, 260, seed=seed)
            got = p.score_input(data, PACKING)
            want = prepare_image(data, PACKING, max_pixels=MAX_PIXELS, drop_padding_rows=True)
            _same_packed(got.compute, want.compute)
            assert np.array_equal(view, kept), seed  # never rewritten under the live view
            held.append(got)
        assert worker.free.qsize() == 0
        del held, got
        gc.collect()
        assert worker.free.qsize() == 1
        del view
        gc.collect()
        assert worker.free.qsize() == 2  # every slot back once nothing views it
    finally:
        p.close()


def test_decode_errors_cross_with_their_reason(pool: PreparePool) -> None:
    with pytest.raises(ImageDecodeError) as err:
        pool.score_input(b"not an image at all", PACKING)
    assert err.value.reason == "unrecognised"
    with pytest.raises(ImageDecodeError) as err:
        pool.score_input(jpeg()[:200], PACKING)
    assert err.value.reason in {"corrupt", "unreadable"}
    with pytest.raises(ImageTooLargeError) as too_large:
        pool.prepare(jpeg(2100, 2000), PACKING)
    assert (too_large.value.width, too_large.value.height, too_large.value.max_pixels) == (
        2000,
        2100,
        MAX_PIXELS,
    )
    assert pool.replaced == 0  # a bad image is the client's error, not a worker's death


def test_a_worker_killed_mid_image_fails_that_call_and_is_replaced() -> None:
    p = PreparePool(1, max_pixels=MAX_PIXELS, drop_padding_rows=True)
    p.start()
    try:
        p.wait_ready()
        (pid,) = p.pids()
        os.kill(pid, signal.SIGSTOP)  # holds the image inside the worker until the kill
        result: list[BaseException | object] = []
        call = threading.Thread(target=lambda: result.append(_capture(p.score_input, jpeg(), PACKING)))
        call.start()
        assert _wait_for(p._idle.empty)  # the call has taken the worker
        time.sleep(0.2)  # and sent it the image
        os.kill(pid, signal.SIGKILL)
        call.join(10)
        assert isinstance(result[0], WorkerDied), result
        assert "exit code -9" in str(result[0])
        assert p.replaced == 1 and p.pids() != [pid] and _gone(pid)
        assert p.score_input(jpeg(), PACKING).tokens > 0  # the replacement works
        # a worker killed while idle is replaced before it is given an image: that call succeeds
        (pid,) = p.pids()
        os.kill(pid, signal.SIGKILL)
        assert _wait_for(lambda: _gone(pid) or not p._workers[0].alive())
        assert p.score_input(jpeg(), PACKING).tokens > 0
        assert p.replaced == 2
    finally:
        p.close()


def test_a_stuck_worker_overruns_its_time_and_is_replaced() -> None:
    p = PreparePool(1, max_pixels=MAX_PIXELS, drop_padding_rows=True, task_timeout_s=0.5)
    p.start()
    try:
        p.wait_ready()
        (pid,) = p.pids()
        os.kill(pid, signal.SIGSTOP)  # as a decoder in an endless loop would look
        with pytest.raises(WorkerDied, match="overran"):
            p.score_input(jpeg(), PACKING)
        assert _wait_for(lambda: _gone(pid)) and p.replaced == 1
        p.task_timeout_s = 60.0  # the replacement imports on its first call
        assert p.score_input(jpeg(), PACKING).tokens > 0
    finally:
        p.close()


def _capture(fn: Callable[..., object], *args: object) -> BaseException | object:
    try:
        return fn(*args)
    except BaseException as exc:
        return exc


def _post(url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=30)


def _fds() -> Counter[str]:
    """What this process's file descriptors point at (sockets by inode, slabs as memfd:...)."""
    targets: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            targets[os.readlink(f"/proc/self/fd/{fd}")] += 1
    return targets


def test_the_server_maps_a_dead_worker_to_503_and_leaks_nothing_on_shutdown() -> None:
    """Through REST, with a real kill: the request in flight gets a retryable 503 `decode_failed`,
    the next is scored; bad images keep their 4xx codes; after shutdown no worker process, no new
    /dev/shm entry and no new file descriptor remain."""
    shm_before, fds_before = set(os.listdir("/dev/shm")), _fds()
    settings = ServiceSettings(
        decode_processes=1, grpc_enabled=False, host="127.0.0.1", max_pixels=MAX_PIXELS
    )
    srv, thread, url = start_server(settings)
    core = srv.config.app.state.core
    pool = core.prepare_pool
    assert pool is not None and core.dispatch is not None
    try:
        ok = _post(url, jpeg())
        assert ok.status_code == 200, ok.text
        bad = _post(url, b"GIF89a nonsense")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "image_corrupt", bad.text
        big = _post(url, jpeg(2100, 2000))
        assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_large", big.text

        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        replies: list[httpx.Response] = []
        call = threading.Thread(target=lambda: replies.append(_post(url, jpeg(seed=3))))
        call.start()
        assert _wait_for(pool._idle.empty)
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        call.join(30)
        (dead,) = replies
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "decode_failed", dead.text
        assert dead.headers.get("retry-after") == "1"
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert "musiq_decode_worker_restarts_total 1.0" in metrics.splitlines()
        again = _post(url, jpeg(seed=3))
        assert again.status_code == 200, again.text
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        pids = pool.pids()
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert all(_gone(p) for p in [pid, *pids])
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not _fds() - fds_before, _fds() - fds_before


def test_threads_remain_the_fallback_with_no_processes() -> None:
    settings = ServiceSettings(decode_processes=0, grpc_enabled=False, host="127.0.0.1")
    srv, thread, url = start_server(settings)
    try:
        assert srv.config.app.state.core.prepare_pool is None
        r = _post(url, jpeg())
        assert r.status_code == 200, r.text
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_workers_import_neither_torch_nor_the_server() -> None:
    """A worker's imports are those of this module's top: numpy, Pillow, simplejpeg, model.packing.
    (Start-up speed, and the serving image holds no torch.)"""
    code = (
        "import sys, service.prepare_pool; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'grpc', 'fastapi', 'pydantic', 'uvicorn') "
        "if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_failed_start_leaves_no_worker_behind(tmp_path: Path) -> None:
    """`stop` never runs after a failed `start` (the lifespan never began): the start cleans up."""
    import asyncio

    from service.core import ScoringCore

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    before = set(_worker_children())  # e.g. the module's shared pool
    core = ScoringCore(ServiceSettings(models=[bad], decode_processes=1))
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises; the point is the cleanup
        asyncio.run(core.start())
    assert core.prepare_pool is not None
    assert set(_worker_children()) <= before


def _worker_children() -> list[int]:
    """This process's live children that are decode workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if (
                int(stat[1]) == os.getpid()
                and stat[0] != "Z"
                and b"_worker_main" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
    return found
