"""Shared pieces of the benchmarks: machine description, synthetic GeoTIFFs, a small U-Net, result log.

The benchmarks read and write GeoTIFFs with rasterio directly (not through ``adapters.geotiff``) so that
they measure the tiling engine, not a particular sink's extra outputs (overviews, polygons).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# GDAL's block cache defaults to 5% of RAM and would otherwise dominate (and grow) the RSS we measure
# while the class raster is written; the engine's own memory is what these benchmarks are about.
os.environ.setdefault("GDAL_CACHEMAX", "64")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> str:
    """One line: CPU model, core count, GPU presence, Python/TF versions."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = f"{len(gpus)} GPU(s)"
        tfv = tf.__version__
    except Exception:  # noqa: BLE001 - description only
        tfv = "?"
    return f"{os.cpu_count()}-core CPU ({model}), {gpu}, Python {platform.python_version()}, TensorFlow {tfv}"


def command_line() -> str:
    return "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)


def append_result(title: str, lines: list[str]) -> None:
    """Append a dated section with the exact command and machine to docs/benchmarks.md (and print it)."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([f"### {title} ({now})", "", f"- command: `{command_line()}`", f"- machine: {machine()}",
                      *[f"- {line}" for line in lines], "", ""])
    print(text)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n\nAppended by the scripts in `bench/`; newest last.\n\n")
    with DOC.open("a") as f:
        f.write(text)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_geotiff(path: Path, size: int, bands: int = 3, block: int = 512) -> None:
    """A ``size x size`` uint8 RGB GeoTIFF, tiled ``block``, deflate; smooth shapes so it compresses well.

    Written strip by strip (``block`` rows at a time) so generating it needs little memory.
    """
    import rasterio
    from rasterio.transform import from_origin

    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint8", tiled=True,
                   blockxsize=block, blockysize=block, compress="deflate", zlevel=1, BIGTIFF="IF_SAFER",
                   crs="EPSG:32633", transform=from_origin(500000, 6000000, 0.5, 0.5), num_threads="ALL_CPUS")
    xs = np.arange(size, dtype=np.int32)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, size, block):
            ys = np.arange(r0, min(size, r0 + block), dtype=np.int32)[:, None]
            base = (((xs[None, :] // 97) + (ys // 61)) % 3) * 70 + (ys % 50)
            data = np.stack([(base + 40 * b).astype(np.uint8) for b in range(bands)])
            dst.write(data, window=((r0, r0 + len(ys)), (0, size)))


def small_unet(filters: int = 16, levels: int = 3, classes: int = 3, channels: int = 3, seed: int = 0):
    """A ``levels``-level U-Net (two 3x3 convs per level, max-pool down, transposed conv up), softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, channels))
    x = inp
    skips = []
    for level in range(levels):
        f = filters * 2**level
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        if level < levels - 1:
            skips.append(x)
            x = keras.layers.MaxPooling2D()(x)
    for level in reversed(range(levels - 1)):
        f = filters * 2**level
        x = keras.layers.Conv2DTranspose(f, 2, strides=2, padding="same")(x)
        x = keras.layers.Concatenate()([x, skips[level]])
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
    out = keras.layers.Conv2D(classes, 1, activation="softmax")(x)
    return keras.Model(inp, out)


def compiled_predict(model, tile: int, channels: int = 3) -> Callable[[np.ndarray], np.ndarray]:
    """``(N, tile, tile, C) float32 -> (N, tile, tile, K) float32`` through one traced tf.function."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, tile, tile, channels], tf.float32)])
    def fn(x):
        return model(x, training=False)

    def predict(x: np.ndarray) -> np.ndarray:
        return fn(tf.convert_to_tensor(x, tf.float32)).numpy()

    predict(np.zeros((1, tile, tile, channels), np.float32))  # trace outside the timings
    return predict


def run_tiled_geotiff(src_path: Path, dst_path: Path, predict, num_classes: int, cfg) -> int:
    """End to end: rasterio windowed reads -> scale /255 -> predict_tiled -> uint8 class raster.

    Returns the number of tiles predicted.
    """
    import rasterio

    from pipelines.normalize import normalize
    from pipelines.spec import Normalization
    from pipelines.tiling import predict_tiled, window_grid

    norm = Normalization(kind="scale", scale=255.0)
    with rasterio.open(src_path) as src:
        h, w = src.height, src.width
        profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint8", tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate", crs=src.crs, transform=src.transform, nodata=255,
                       BIGTIFF="IF_SAFER")
        with rasterio.open(dst_path, "w", **profile) as dst:

            def read(win):
                return normalize(src.read(window=win), norm)

            def emit(win, probs):
                dst.write(probs.argmax(-1).astype(np.uint8)[None], window=win)

            predict_tiled(read, h, w, predict, num_classes, cfg, emit)
    return len(window_grid(h, w, cfg.tile, cfg.overlap))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """``(wall seconds, fn())``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float, object]:
    """``(wall seconds, CPU seconds of this process, all threads, fn())``.

    CPU time is far less sensitive than wall time to other load on a shared machine.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out
