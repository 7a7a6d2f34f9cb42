"""Small helpers shared by the test modules."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def musiq(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs the `musiq` console entry point in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def jpeg(h: int = 200, w: int = 300, seed: int = 0, quality: int = 90) -> bytes:
    """A random-noise JPEG of h x w pixels (seeded), as a client would upload it."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


ALLOW_MISSING_TOOLS = "MUSIQ_TESTS_ALLOW_MISSING_TOOLS"


def require_tool(name: str, hint: str, fallback: str | None = None) -> str:
    """The path of system tool `name` (on PATH, else `fallback` if that file exists).

    Missing, the calling test fails: `make test` installs the tools (tools/system_deps.sh), so under CI
    a missing one is a broken set-up, not a reason to pass. With MUSIQ_TESTS_ALLOW_MISSING_TOOLS=1
    (a developer without them) the test is skipped instead."""
    import pytest

    found = shutil.which(name) or (fallback if fallback and Path(fallback).is_file() else None)
    if found:
        return found
    message = f"{name} is not installed ({hint}); set {ALLOW_MISSING_TOOLS}=1 to skip such tests instead"
    if os.environ.get(ALLOW_MISSING_TOOLS) == "1":
        pytest.skip(message)
    pytest.fail(message)


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1.

    Racy for a server: another process may take the port before the server binds it (and a readiness
    probe then talks to that process). Servers get a socket they already hold (`start_server`) or
    choose their own port (`tests/reliability/serve.py`); use this only for a port that stays unused.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(settings: Any, **app_options: Any) -> tuple[Any, threading.Thread, str]:
    """A real uvicorn server on 127.0.0.1 in a thread, returned once /readyz says ready.

    uvicorn serves on a socket bound here and held from then on, so no other process can take its
    port in between. `app_options` go to `create_app` (e.g. a `runtime_factory` that injects faults)."""
    import httpx
    import uvicorn

    from service.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(settings, **app_options), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return srv, thread, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sock.close()
    raise RuntimeError("server did not become ready" + ("" if thread.is_alive() else " (its thread ended)"))
