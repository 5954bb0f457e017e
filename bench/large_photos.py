"""Benchmark 6: accuracy of a photo model on large photos, antialiased vs point-sampled input resizing.

A resize-mode model sees each photo shrunk to its input size (192 px for ``unet-pets``). A camera photo is
often 10-20 times larger. Point sampling (bilinear with two taps per output pixel,
:func:`pipelines.semantic.resize_bilinear`) keeps the photo's fine detail and sensor noise as aliasing. The
antialiased filter the service uses (:func:`pipelines.semantic.resize_photo`) averages what each output pixel
covers. The two are compared side by side, paired image by image, on the labelled validation photos of
``oxford_pets``:

- ``native``: the photos as they are (longer side at most 256 px);
- ``enlarged``: each photo enlarged ``--factor`` times (Lanczos) with Gaussian noise of ``--noise`` (of 255)
  per pixel, standing in for a large camera photo. The predictions are block-averaged back to the
  trimap's grid and scored there.

    nice -n 10 .venv/bin/python bench/large_photos.py [--model unet-pets] [--factor 4] [--noise 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _common import ROOT, append_result

DATA = ROOT.parent / "shared" / "data" / "oxford_pets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet-pets")
    ap.add_argument("--data", type=Path, default=DATA, help="a folder laid out like oxford_pets")
    ap.add_argument("--factor", type=int, default=4, help="enlargement of each photo (integer)")
    ap.add_argument("--noise", type=float, default=8.0, help="per-pixel Gaussian noise (of 255) after enlarging")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-log", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()

    from PIL import Image

    from pipelines import semantic
    from pipelines.evaluate import make_predictor, read_labeled
    from pipelines.metrics import bootstrap_difference, confusion_matrix, scores
    from pipelines.registry import load
    from pipelines.train import is_validation, list_names

    names = [n for n in list_names(args.data) if is_validation(n)]
    model = load(args.model)
    k = len(model.spec.classes)
    rng = np.random.default_rng(args.seed)
    antialiased = semantic.resize_photo
    samplers = {"point": semantic.resize_bilinear, "antialias": antialiased}
    f = args.factor
    cms: dict[str, dict[str, list[np.ndarray]]] = {c: {s: [] for s in samplers} for c in ("native", "enlarged")}
    try:
        for name in names:
            rgb, truth = read_labeled(args.data / "images" / f"{name}.jpg", args.data / "trimaps" / f"{name}.png")
            h, w = truth.shape
            big = np.asarray(Image.fromarray(rgb).resize((w * f, h * f), Image.LANCZOS), np.float32)
            big = np.clip(big + rng.normal(0.0, args.noise, big.shape), 0, 255).astype(np.uint8)
            for sampler, fn in samplers.items():
                # make_predictor looks the resize up in pipelines.semantic at each call.
                semantic.resize_photo = fn
                predict = make_predictor(model)
                cms["native"][sampler].append(confusion_matrix(truth, predict(rgb).argmax(-1), k))
                probs = predict(big).reshape(h, f, w, f, k).mean(axis=(1, 3))
                cms["enlarged"][sampler].append(confusion_matrix(truth, probs.argmax(-1), k))
    finally:
        semantic.resize_photo = antialiased

    lines = [f"model: {args.model}; {len(names)} validation photos of {args.data.name}; enlarged: x{f} (Lanczos) "
             f"+ Gaussian noise sigma {args.noise:g}, predictions block-averaged to the trimap grid"]
    report = {}
    for cond, by in cms.items():
        sc = {s: scores(np.sum(v, axis=0)) for s, v in by.items()}
        diff = bootstrap_difference(by["point"], by["antialias"])
        report[cond] = {"point": [sc["point"]["pixel_accuracy"], sc["point"]["mean_iou"]],
                        "antialias": [sc["antialias"]["pixel_accuracy"], sc["antialias"]["mean_iou"]],
                        "antialias_minus_point": {m: diff[m] for m in ("pixel_accuracy", "mean_iou")}}
        pa, mi = diff["pixel_accuracy"], diff["mean_iou"]
        lines.append(
            f"{cond}: point-sampled {sc['point']['pixel_accuracy']:.4f} / {sc['point']['mean_iou']:.4f}, "
            f"antialiased {sc['antialias']['pixel_accuracy']:.4f} / {sc['antialias']['mean_iou']:.4f} "
            f"(pixel accuracy / mean IoU); antialiased - point, paired 95 % interval over images: "
            f"{pa['difference']:+.4f} ({pa['interval'][0]:+.4f} to {pa['interval'][1]:+.4f}) / "
            f"{mi['difference']:+.4f} ({mi['interval'][0]:+.4f} to {mi['interval'][1]:+.4f})")
    print(json.dumps(report, indent=2))
    if not args.no_log:
        append_result(f"Large photos: antialiased vs point-sampled resize, {args.model}, x{f}, noise {args.noise:g}",
                      lines)


if __name__ == "__main__":
    main()
