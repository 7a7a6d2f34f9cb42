"""The three image mixes of the benchmark, as the JPEG files a client would upload.

- `512x384`: one BSDS500 photo resized to 512x384 (385 tokens);
- `mixed`: BSDS500 481x321 and 321x481 as released, plus that photo resized to 1024x768,
  2000x1500 and 300x4000 (an extreme panorama strip): token counts from 369 to 3154;
- `clive`: CLIVE photos as released (500x500, 449 tokens).

Photos come from ../shared/data; resized ones are saved at JPEG quality 90. Every image is also
written to a folder, so that the pyiqa process (another virtualenv) reads the very same files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import MusiqConfig
from model.flops import forward_flops
from model.packing import pack

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIXES = ("512x384", "mixed", "clive")
MIXED_RESIZED = ((1024, 768), (2000, 1500), (300, 4000))


@dataclass(frozen=True)
class BenchImage:
    name: str  # unique within a mix, used as a file name
    data: bytes  # the encoded file
    width: int
    height: int
    tokens: int  # packed tokens at full native resolution (the official layout)
    valid_tokens: int = 0  # of which real patches: what the service computes (model.packing.compact)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bsds(width: int, height: int, data: Path) -> Path:
    for path in sorted((data / "bsds500" / "images").glob("*/*.jpg")):
        with Image.open(path) as img:
            if img.size == (width, height):
                return path
    raise FileNotFoundError(f"no {width}x{height} BSDS500 photo under {data / 'bsds500'}")


def _image(name: str, data: bytes, config: MusiqConfig) -> BenchImage:
    from model.decode import decode_image  # simplejpeg: not needed by the GPU script's synthetic mixes

    pixels = decode_image(data)
    packed = pack(pixels, config.packing())
    return BenchImage(name, data, pixels.shape[1], pixels.shape[0], packed.num_tokens, packed.num_valid)


def load_mix(mix: str, config: MusiqConfig, clive_count: int = 8, data: Path = DATA) -> list[BenchImage]:
    """The images of one mix, in the order a round-robin client sends them (`data`: the folder
    holding bsds500/ and clive/ as in ../shared/data)."""
    if mix == "512x384":
        landscape = _bsds(481, 321, data)
        img = Image.open(landscape).convert("RGB").resize((512, 384), Image.Resampling.BICUBIC)
        return [_image("512x384", _jpeg(img), config)]
    if mix == "mixed":
        landscape = _bsds(481, 321, data)
        out = [
            _image("bsds-481x321", landscape.read_bytes(), config),
            _image("bsds-321x481", _bsds(321, 481, data).read_bytes(), config),
        ]
        base = Image.open(landscape).convert("RGB")
        for w, h in MIXED_RESIZED:
            out.append(_image(f"{w}x{h}", _jpeg(base.resize((w, h), Image.Resampling.BICUBIC)), config))
        return out
    if mix == "clive":
        folder = data / "clive" / "images"
        chosen = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg"):
                with Image.open(path) as img:
                    if img.size == (500, 500):
                        chosen.append(path)
            if len(chosen) == clive_count:
                break
        if not chosen:
            raise FileNotFoundError(f"no 500x500 CLIVE JPEG under {folder}")
        return [_image(f"clive-{p.stem}", p.read_bytes(), config) for p in chosen]
    raise ValueError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")


def mix_flops(images: list[BenchImage], config: MusiqConfig) -> float:
    """Mean FLOPs per image of a mix sent round-robin, counting real patch tokens only: the work
    any implementation must do (padding rows, in the layout or in a batch, are a cost, not work)."""
    return float(np.mean([forward_flops(config, im.valid_tokens) for im in images]))


def write_files(images: list[BenchImage], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for im in images:
        path = folder / f"{im.name}.jpg"
        path.write_bytes(im.data)
        paths.append(path)
    return paths
