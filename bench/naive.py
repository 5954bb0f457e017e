"""Benchmark 3: the same GeoTIFF through a naive baseline and through the streaming engine.

Naive = what a first script does: read the whole image, normalise it whole, predict non-overlapping tiles
one at a time (batch 1, no blending, edge tiles zero-padded), argmax into a whole-image class array, write
it at the end. Engine = ``pipelines.tiling.predict_tiled`` (overlap, Gaussian blend, batches, threads,
windowed reads and writes). Same model, same input; each in a fresh subprocess for its peak RSS.

    nice -n 10 .venv/bin/python bench/naive.py [--size 4096] [--tile 256] [--overlap 32] [--filters 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import append_result, make_geotiff, peak_rss_mib, timed


def run_naive(src: Path, dst: Path, predict, tile: int) -> int:
    import rasterio

    with rasterio.open(src) as ds:
        image = ds.read()  # (C, H, W), whole
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8",
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate", crs=ds.crs,
                       transform=ds.transform, BIGTIFF="IF_SAFER")
    x = np.moveaxis(image.astype(np.float32) / 255.0, 0, -1)
    h, w = x.shape[:2]
    classes = np.zeros((h, w), np.uint8)
    n = 0
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            t = x[r : r + tile, c : c + tile]
            th, tw = t.shape[:2]
            padded = np.zeros((1, tile, tile, x.shape[2]), np.float32)
            padded[0, :th, :tw] = t
            classes[r : r + th, c : c + tw] = predict(padded)[0, :th, :tw].argmax(-1)
            n += 1
    with rasterio.open(dst, "w", **profile) as out:
        out.write(classes[None])
    return n


def child(mode: str, src: str, tile: int, overlap: int, batch: int, filters: int) -> None:
    from _common import compiled_predict, run_tiled_geotiff, small_unet

    from pipelines.tiling import TilingConfig

    predict = compiled_predict(small_unet(filters=filters, levels=3, classes=3), tile)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "classes.tif"
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "naive":
            n = run_naive(Path(src), dst, predict, tile)
        else:
            cfg = TilingConfig(tile=tile, overlap=overlap, batch_size=batch)
            n = run_tiled_geotiff(Path(src), dst, predict, 3, cfg)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"tiles": n, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mib": before,
                      "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.tile, args.overlap, args.batch, args.filters)
        return
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "scene.tif"
        timed(lambda: make_geotiff(src, args.size))
        for mode in ("naive", "engine"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(src), "--tile", str(args.tile), "--overlap",
                 str(args.overlap), "--batch", str(args.batch), "--filters", str(args.filters)],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            res[mode] = json.loads(out)
            print(mode, res[mode], flush=True)
    mpx = args.size * args.size / 1e6
    lines = [f"model: 3-level U-Net, {args.filters} base filters, 3 classes; tile {args.tile}; input "
             f"{args.size}x{args.size} RGB uint8 deflate GeoTIFF -> uint8 class raster",
             "| run | tiles predicted | wall | CPU (all threads) | Mpx/s (wall) | RSS before | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    labels = {"naive": "naive (whole image, batch 1, no overlap/blend)",
              "engine": f"engine (overlap {args.overlap}, batch {args.batch}, gaussian, streamed)"}
    for mode, r in res.items():
        lines.append(f"| {labels[mode]} | {r['tiles']} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s "
                     f"| {mpx / r['seconds']:.2f} "
                     f"| {r['rss_before_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
    lines.append(
        f"engine predicts {res['engine']['tiles'] / res['naive']['tiles']:.2f}x the tiles (overlap) in "
        f"{res['engine']['seconds'] / res['naive']['seconds']:.2f}x the wall time and "
        f"{res['engine']['cpu_seconds'] / res['naive']['cpu_seconds']:.2f}x the CPU time; peak RSS "
        f"{res['engine']['peak_rss_mib'] - res['naive']['peak_rss_mib']:+.0f} MiB vs naive"
    )
    if args.no_record:
        print("\n".join(lines))
        return
    head, table = lines[:1], lines[1:-1]
    load = f"load average at the end: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores"
    append_result(f"Naive baseline vs engine, {args.size}x{args.size}", [*head, lines[-1], load])
    with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as f:
        f.write("\n".join(table) + "\n\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
