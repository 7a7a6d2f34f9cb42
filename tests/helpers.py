"""Small helpers shared by the test modules."""

from __future__ import annotations

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


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(settings: Any, **app_options: Any) -> tuple[Any, threading.Thread, str]:
    """A real uvicorn server on 127.0.0.1 in a thread, returned once /readyz says ready.

    `app_options` go to `create_app` (e.g. a `runtime_factory` that injects faults)."""
    import httpx
    import uvicorn

    from service.rest import create_app

    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(settings, **app_options), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return srv, thread, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")
