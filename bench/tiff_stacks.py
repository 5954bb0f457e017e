"""Multi-page TIFF stacks: what planning and each worker pay to open one page of an N-page stack.

Every worker task opens its item's source again (``_Opened``), so the cost of opening one page is paid once
per page. Before 2026-11-27 opening a stack built every page's item (the same as listing them all); now a
worker builds only the page it processes. Both are measured here side by side on the same files:
``list(source.items())`` (planning, and what each worker paid before) and ``source.item("page-LAST")``.

    python bench/tiff_stacks.py --pages 2000 [--size 64]

An 8-bit stack goes through the photo adapter (Pillow), a 16-bit one through the raster adapter (GDAL).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
from _common import append_result, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="page side in pixels")
    ap.add_argument("--no-log", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from PIL import Image

    from adapters import open_input

    rng = np.random.default_rng(0)
    page = rng.integers(0, 255, (args.size, args.size), np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, arr in (("8-bit (photo adapter)", page), ("16-bit (raster adapter)", page.astype(np.uint16) * 257)):
            path = Path(tmp) / f"stack{arr.dtype.itemsize * 8}.tif"
            ims = [Image.fromarray(arr)] * args.pages
            ims[0].save(path, save_all=True, append_images=ims[1:])
            last = f"page-{args.pages - 1:04d}"

            def every_page(path: Path = path) -> int:
                _, src = open_input(str(path))
                with src:
                    return len(list(src.items()))

            def one_page(path: Path = path, last: str = last) -> int:
                _, src = open_input(str(path))
                with src:
                    return int(src.item(last).read().shape[0])

            t_all, n = timed(every_page)
            t_one, _ = timed(one_page)
            assert n == args.pages
            rows.append(f"{label}: opening the stack with every page built (planning; each worker before) "
                        f"{t_all:.2f} s, with the last page only (each worker now) {t_one:.3f} s: {t_all / t_one:.0f}x")
            print(rows[-1], flush=True)
    if not args.no_log:
        append_result(f"TIFF stacks: opening one page of {args.pages} ({args.size}x{args.size} px)", rows)


if __name__ == "__main__":
    main()
