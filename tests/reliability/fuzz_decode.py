"""Coverage-guided fuzzing (atheris / libFuzzer) of what every upload goes through: decode + pack.

The contract under test: for ANY bytes, `decode_image` either returns an RGB uint8 image within
the pixel limit or raises `ImageDecodeError` (which the service turns into a 4xx), and every image
it returns packs into finite tokens in [-1, 1] (up to float32 rounding). Any other exception, a crash, a hang past
-timeout or memory past -rss_limit_mb is a finding. Pillow's Python code (header parsers, plugins)
and ours are instrumented for coverage; the C decoders underneath are exercised, not instrumented.

    python -m tests.reliability.fuzz_decode -max_total_time=60              # seeds: the hostile corpus
    python -m tests.reliability.fuzz_decode -max_total_time=900 runs/fuzz-corpus

libFuzzer flags pass through (-runs, -jobs, -dict, ...). Without a corpus directory, one is made
in a temporary folder from the hostile generator's images (hostile.py), which start the fuzzer
inside every accepted format.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np  # imported before instrumenting: numpy's Python layer is not under test

with atheris.instrument_imports():
    from PIL import Image

    Image.init()  # imports (and so instruments) every format plugin
    from model.config import PackingConfig
    from model.decode import ImageDecodeError, decode_image
    from model.packing import pack

MAX_PIXELS = 1_000_000  # small, so each input costs milliseconds; the limit logic is the same
CONFIG = PackingConfig(32, 10, (224, 384), 512, pad_native=False)  # the server's packing


def test_one_input(data: bytes) -> None:
    try:
        pixels = decode_image(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError:
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    assert 0 < pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS, pixels.shape
    packed = pack(pixels, CONFIG)
    assert packed.num_valid > 0 and packed.patches.shape[0] == packed.num_tokens
    # The float32 Gaussian resize (TensorFlow's arithmetic, kept for parity) may overshoot 1 by
    # a few ulps: the first finding of this fuzzer, accepted as within float32 rounding.
    assert np.isfinite(packed.patches).all() and np.abs(packed.patches).max() <= 1.0 + 1e-5


def seed_corpus(folder: Path, max_bytes: int = 64 * 1024) -> int:
    from tests.reliability.hostile import image_cases

    written = 0
    for case in image_cases(seed=0):
        if 0 < len(case.body) <= max_bytes:
            (folder / case.name).write_bytes(case.body)
            written += 1
    return written


def main(argv: list[str]) -> None:
    if not any(not a.startswith("-") for a in argv[1:]):
        folder = Path(tempfile.mkdtemp(prefix="musiq-fuzz-"))
        print(f"seed corpus: {seed_corpus(folder)} files in {folder}", file=sys.stderr)
        argv = [*argv, str(folder)]
    if not any(a.startswith("-max_len=") for a in argv):
        argv = [*argv, "-max_len=65536"]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
