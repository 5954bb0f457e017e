"""Benchmark 2: peak RSS of the streaming engine for growing rasters (target: flat).

Each size runs end to end (windowed read -> normalise -> predict -> blend -> class raster) in a fresh
subprocess, which reports its peak RSS (``ru_maxrss``) and its RSS right before inference (TensorFlow and
the model loaded), so the engine's own share is visible. Inputs are generated compressed in a temp dir.

    nice -n 10 .venv/bin/python bench/memory.py [--sizes 4096 8192 16384 32768] [--tile 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import append_result, make_geotiff, peak_rss_mib, timed


def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Conv2D(3, 1, activation="softmax")(x)
    return keras.Model(inp, out)


def child(src: str, tile: int, overlap: int, batch: int) -> None:
    from _common import compiled_predict, run_tiled_geotiff

    from pipelines.tiling import TilingConfig

    predict = compiled_predict(tiny_model(), tile)
    before = peak_rss_mib()
    cfg = TilingConfig(tile=tile, overlap=overlap, batch_size=batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        n = run_tiled_geotiff(Path(src), Path(tmp) / "classes.tif", predict, 3, cfg)
    print(json.dumps({"tiles": n, "seconds": time.perf_counter() - t0, "rss_before_mib": before,
                      "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tile, args.overlap, args.batch)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            src = Path(tmp) / f"scene{size}.tif"
            gen_s, _ = timed(lambda src=src, size=size: make_geotiff(src, size))
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(src), "--tile", str(args.tile), "--overlap",
                 str(args.overlap), "--batch", str(args.batch)],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            res.update(size=size, gen_seconds=gen_s, file_mib=src.stat().st_size / 2**20)
            print(res, flush=True)
            rows.append(res)
            src.unlink()
    smallest = rows[0]["peak_rss_mib"]
    lines = [f"model: tiny conv net (3x3 conv 8 filters + 1x1 conv, 3 classes); tile {args.tile}, overlap "
             f"{args.overlap}, batch {args.batch}, gaussian blend; GDAL_CACHEMAX=64 MB",
             "| raster | tiles | input file | time | RSS before inference | peak RSS | peak / smallest |",
             "|---|---|---|---|---|---|---|"]
    lines = lines[:1]
    table = ["| raster | tiles | input file | time | RSS before inference | peak RSS | peak / smallest |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['size']}x{r['size']} | {r['tiles']} | {r['file_mib']:.0f} MiB | {r['seconds']:.0f} s "
                     f"| {r['rss_before_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB "
                     f"| {r['peak_rss_mib'] / smallest:.2f} |")
    ratio = rows[-1]["peak_rss_mib"] / smallest
    lines.append(f"**largest / smallest peak RSS = {ratio:.2f}** (target <= 1.2)")
    if args.no_record:
        print("\n".join(lines + table))
        return
    append_result("Peak RSS vs raster size (fresh process per size)", lines)
    with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as f:
        f.write("\n".join(table) + "\n\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
