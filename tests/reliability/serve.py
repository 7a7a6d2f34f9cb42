"""`musiq serve` as a real subprocess on 127.0.0.1, with its log and its memory in view.

The reliability tests talk to a separate process (not a server thread inside pytest) so that its
RSS is the server's alone, a crash shows as an exit code, and SIGTERM can be sent for real.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# What `musiq serve` logs once it listens (uvicorn's own line; the gRPC line comes from service/app.py).
HTTP_LISTENING = re.compile(r"Uvicorn running on (http://\S+:\d+)")
GRPC_LISTENING = re.compile(r"gRPC server running on \S+:(\d+)")


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class RssWatch:
    """Samples a process's RSS every `period_s` in a thread; `peak` is the largest seen."""

    pid: int
    period_s: float = 0.02
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            except (OSError, RuntimeError):
                return  # the process is gone
            self._stop.wait(self.period_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


@contextmanager
def serve_process(
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120,
    musiq: list[str] | None = None,
    cwd: Path | None = None,
    base_env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Starts `musiq serve` with MUSIQ_* `env` on ports it picks and yields it once /readyz is 200.

    By default the checkout's own CLI runs in the checkout with this process's environment;
    `musiq` (the command), `cwd` and `base_env` run another installation as a user would.
    """
    log = tempfile.NamedTemporaryFile(prefix="musiq-serve-", suffix=".log", delete=False)  # noqa: SIM115
    # Port 0: the server binds both ports itself and logs them, so no other process can take them
    # between a choice made here and its bind (and the readiness probe cannot reach another server).
    cmd = [*(musiq or [sys.executable, "-m", "cli"]), "serve", "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--grpc-port", "0"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or root,
        env={**(os.environ if base_env is None else base_env), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(proc, "", "", Path(log.name))
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"musiq serve exited with {proc.returncode}:\n{server.log()}")
            if not server.url and (listening := HTTP_LISTENING.search(server.log())):
                server.url = listening.group(1)
                grpc_port = GRPC_LISTENING.search(server.log())  # logged before the HTTP line
                server.grpc_target = f"127.0.0.1:{grpc_port.group(1)}" if grpc_port else ""
            try:
                if server.url and httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"musiq serve not ready after {ready_timeout_s} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)
