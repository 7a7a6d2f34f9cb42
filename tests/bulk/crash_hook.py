"""A Ray `worker_process_setup_hook` for the bulk failure tests (never used outside them): in every
worker process it wraps `bulk.pipeline.prepare_file` so that decoding an input whose path holds
`CRASH_ONCE` kills the process the first time (a marker file beside it records that), and one
holding `CRASH_ALWAYS` kills it every time: a decoder crash, as a hostile image could cause."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CRASH_ONCE = "crash-once"
CRASH_ALWAYS = "crash-always"


def crashed_marker(path: str) -> Path:
    return Path(path + ".crashed")


def install() -> None:
    import bulk.pipeline as pipeline

    real = pipeline.prepare_file

    def prepare_file(source: str, *args: Any, **kwargs: Any) -> Any:
        if CRASH_ALWAYS in source:
            os._exit(70)
        if CRASH_ONCE in source and not crashed_marker(source).exists():
            crashed_marker(source).touch()
            os._exit(70)
        return real(source, *args, **kwargs)

    pipeline.prepare_file = prepare_file
