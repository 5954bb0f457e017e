"""Benchmark 3: a batch of JPEG photos end to end (decode via the photo adapter, normalise, batched predict,
resize back, write palette mask + overlay PNGs) vs the model's raw batched predict on the same images already
decoded and resized in memory, measured in the same run.

    nice -n 10 .venv/bin/python bench/photos.py [--count 1000] [--batch 16] [--megapixels 12]

The photos are the repository's sample pets, re-encoded with small random crops so each file differs;
``--megapixels M`` enlarges each crop (Lanczos) to about M megapixels first, the size of a camera's photo,
where decoding, the antialiased shrink, scaling the probabilities back and the PNG outputs weigh more.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, append_result
from PIL import Image

SAMPLES = ROOT / "samples" / "photos"


def make_photos(folder: Path, count: int, seed: int = 0, megapixels: float | None = None) -> list[Path]:
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    paths = []
    for n in range(count):
        im = sources[n % len(sources)]
        w, h = im.size
        dx, dy = int(rng.integers(0, w // 8)), int(rng.integers(0, h // 8))
        crop = im.crop((dx, dy, w - int(rng.integers(0, w // 8)), h - int(rng.integers(0, h // 8))))
        if megapixels:
            f = (megapixels * 1e6 / (crop.width * crop.height)) ** 0.5
            crop = crop.resize((round(crop.width * f), round(crop.height * f)), Image.LANCZOS)
        p = folder / f"photo_{n:05d}.jpg"
        crop.save(p, quality=90)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="unet-pets")
    ap.add_argument("--megapixels", type=float, default=None, help="enlarge each photo to about this size")
    args = ap.parse_args()

    from adapters.photo import PhotoFormat
    from pipelines.registry import load
    from pipelines.semantic import predict_multiscale, resize_photo, segment_items, tta_edges

    model = load(args.model)
    spec = model.spec
    tmp = Path(tempfile.mkdtemp(prefix="tileseg-bench-photos-"))
    try:
        paths = make_photos(tmp, args.count, megapixels=args.megapixels)
        fmt = PhotoFormat()
        out = tmp / "out"
        out.mkdir()

        # Raw: decode + resize (to every TTA size) outside the timer, then only the batched predictions and
        # their multi-scale average on in-memory arrays.
        edges = tta_edges(spec.input_size, spec.tta_sizes)
        arrays: dict[int, list[np.ndarray]] = {e: [] for e in edges}
        for p in paths:
            with fmt.open(str(p)) as src:
                px = next(iter(src.items())).read().transpose(1, 2, 0).astype(np.float32) / 255.0
            for e in edges:
                arrays[e].append(resize_photo(px, e, e))

        def raw_batch(i: int) -> None:
            predict_multiscale(model.predict, {e: np.stack(v[i : i + args.batch]) for e, v in arrays.items()},
                               spec.input_size)

        raw_batch(0)  # warm-up (graph tracing)
        t0 = time.perf_counter()
        for i in range(0, len(paths), args.batch):
            raw_batch(i)
        raw = time.perf_counter() - t0
        arrays.clear()

        # End to end: the path a worker takes for photo batches.
        t0 = time.perf_counter()
        for i in range(0, len(paths), args.batch):
            chunk = paths[i : i + args.batch]
            sources = [fmt.open(str(p)) for p in chunk]
            items = [next(iter(s.items())) for s in sources]
            sinks = [fmt.semantic_sink(it, out, spec.names_by_id(), spec.colors_by_id()) for it in items]
            segment_items(items, model, sinks)
            for sk in sinks:
                sk.close()
            for s in sources:
                s.close()
        e2e = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.count
    size = f" of about {args.megapixels:g} Mpx" if args.megapixels else ""
    append_result(f"Photo batch: {n} JPEGs{size} through {args.model}", [
        f"model: {spec.name}, input {spec.input_size}x{spec.input_size}, mode {spec.mode}, tta {spec.tta}, "
        f"extra sizes {spec.tta_sizes or 'none'}, model files {1 + len(spec.members)}, batch {args.batch}",
        f"raw batched predict on decoded, resized arrays: {raw:.1f} s -> {n / raw:.1f} images/s",
        f"end to end (decode, EXIF, normalise, predict, resize back, palette mask + overlay PNGs): {e2e:.1f} s "
        f"-> {n / e2e:.1f} images/s",
        f"**ratio end-to-end / raw = {raw / e2e:.3f}**",
    ])


if __name__ == "__main__":
    main()
