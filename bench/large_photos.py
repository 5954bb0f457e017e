"""Benchmark 6: accuracy of photo models on large photos, antialiased vs point-sampled shrinking.

A resize-mode model sees each photo shrunk to its input size (192 px for ``unet-pets``); an instance
detector's graph shrinks it to its own size (256 px for ``maskrcnn-pets``). A camera photo is often 10-20
times larger. Point sampling (two taps per output pixel: :func:`pipelines.semantic.resize_bilinear`, or the
detector graph's own resize) keeps the photo's fine detail and sensor noise as aliasing. The service shrinks
with an antialiased filter (:func:`pipelines.semantic.resize_photo`; instance specs' ``detector_size``). Both
are compared side by side on the labelled validation photos of ``oxford_pets``:

- ``native``: the photos as they are (longer side at most 256 px);
- ``enlarged``: each photo enlarged ``--factor`` times (Lanczos) with Gaussian noise of ``--noise`` (of 255)
  per pixel, standing in for a large camera photo.

The spec as served is compared with a baseline: the same spec with ``--baseline-spec`` overrides (default
``resize_filter`` ``bilinear`` for semantic models, no ``detector_size`` for instance models). Semantic
models: pixel accuracy and mean IoU at the trimap's grid (predictions of enlarged photos are block-averaged
back), with the paired 95 % interval of the difference over images. Instance models: COCO mask AP50 / AP on
the photo's own grid, through the service's ``detect_item`` on photo-adapter items.

    nice -n 10 .venv/bin/python bench/large_photos.py [--model unet-pets] [--factor 4] [--noise 8]
    nice -n 10 .venv/bin/python bench/large_photos.py --model maskrcnn-pets --factor 2
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
    ap.add_argument("--baseline-spec", default=None,
                    help="JSON overrides of the model's spec for the baseline [default: "
                         '{"resize_filter": "bilinear"} for semantic, {"detector_size": null} for instance models]')
    ap.add_argument("--no-log", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = ap.parse_args()

    from pipelines.registry import get_spec

    served = get_spec(args.model)
    if args.baseline_spec is None:
        args.baseline_spec = json.dumps({"resize_filter": "bilinear"} if served.kind == "semantic"
                                        else {"detector_size": None})
    baseline = served.model_validate({**served.model_dump(), **json.loads(args.baseline_spec)})
    if served.kind == "instance":
        _instances(args, served, baseline)
    else:
        _semantic(args, served, baseline)


def _semantic(args: argparse.Namespace, served, baseline) -> None:  # noqa: ANN001 - ModelSpec, imported late
    from pipelines.evaluate import make_predictor, read_labeled
    from pipelines.metrics import bootstrap_difference, confusion_matrix, scores
    from pipelines.registry import load
    from pipelines.train import is_validation, list_names

    names = [n for n in list_names(args.data) if is_validation(n)]
    predictors = {"baseline": make_predictor(load(baseline)), "served": make_predictor(load(served))}
    k = len(served.classes)
    rng = np.random.default_rng(args.seed)
    f = args.factor
    cms: dict[str, dict[str, list[np.ndarray]]] = {c: {s: [] for s in predictors} for c in ("native", "enlarged")}
    for name in names:
        rgb, truth = read_labeled(args.data / "images" / f"{name}.jpg", args.data / "trimaps" / f"{name}.png")
        h, w = truth.shape
        big = _enlarged(rgb, f, args.noise, rng)
        for label, predict in predictors.items():
            cms["native"][label].append(confusion_matrix(truth, predict(rgb).argmax(-1), k))
            probs = predict(big).reshape(h, f, w, f, k).mean(axis=(1, 3))
            cms["enlarged"][label].append(confusion_matrix(truth, probs.argmax(-1), k))

    lines = [f"model: {args.model}; {len(names)} validation photos of {args.data.name}; enlarged: x{f} (Lanczos) "
             f"+ Gaussian noise sigma {args.noise:g}, predictions block-averaged to the trimap grid; baseline = "
             f"the spec with {args.baseline_spec}"]
    report = {}
    for cond, by in cms.items():
        sc = {s: scores(np.sum(v, axis=0)) for s, v in by.items()}
        diff = bootstrap_difference(by["baseline"], by["served"])
        report[cond] = {"baseline": [sc["baseline"]["pixel_accuracy"], sc["baseline"]["mean_iou"]],
                        "served": [sc["served"]["pixel_accuracy"], sc["served"]["mean_iou"]],
                        "served_minus_baseline": {m: diff[m] for m in ("pixel_accuracy", "mean_iou")}}
        pa, mi = diff["pixel_accuracy"], diff["mean_iou"]
        lines.append(
            f"{cond}: baseline {sc['baseline']['pixel_accuracy']:.4f} / {sc['baseline']['mean_iou']:.4f}, "
            f"served {sc['served']['pixel_accuracy']:.4f} / {sc['served']['mean_iou']:.4f} "
            f"(pixel accuracy / mean IoU); served - baseline, paired 95 % interval over images: "
            f"{pa['difference']:+.4f} ({pa['interval'][0]:+.4f} to {pa['interval'][1]:+.4f}) / "
            f"{mi['difference']:+.4f} ({mi['interval'][0]:+.4f} to {mi['interval'][1]:+.4f})")
    print(json.dumps(report, indent=2))
    if not args.no_log:
        append_result(f"Large photos: {args.model} as served vs {args.baseline_spec}, x{f}, noise {args.noise:g}",
                      lines)


def _enlarged(rgb: np.ndarray, factor: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(H * factor, W * factor, 3) uint8``: Lanczos, then per-pixel Gaussian noise."""
    from PIL import Image

    h, w = rgb.shape[:2]
    big = np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.LANCZOS), np.float32)
    return np.clip(big + rng.normal(0.0, noise, big.shape), 0, 255).astype(np.uint8)


def _instances(args: argparse.Namespace, served, baseline) -> None:  # noqa: ANN001 - ModelSpec, imported late
    import tempfile

    from PIL import Image

    from adapters.photo import PhotoFormat
    from pipelines.evaluate import read_labeled
    from pipelines.instance_eval import PET_CATEGORIES, CocoEvaluator, category_map_by_name, list_pet_samples, pet_mask
    from pipelines.instances import class_name_map, detect_item, load_instance_model
    from pipelines.train import is_validation

    samples = [s for s in list_pet_samples(args.data) if is_validation(s.name)]
    rng = np.random.default_rng(args.seed)
    f = args.factor
    tmp = Path(tempfile.mkdtemp(prefix="tileseg-bench-large-"))
    photos: dict[str, list[tuple[Path, np.ndarray, int]]] = {"native": [], "enlarged": []}
    for s in samples:
        rgb, trimap = read_labeled(s.image, s.trimap, label_offset=0)
        Image.fromarray(rgb).save(tmp / f"{s.name}.png")
        Image.fromarray(_enlarged(rgb, f, args.noise, rng)).save(tmp / f"{s.name}_x{f}.png")
        photos["native"].append((tmp / f"{s.name}.png", pet_mask(trimap), s.category_id))
        photos["enlarged"].append((tmp / f"{s.name}_x{f}.png", np.kron(pet_mask(trimap), np.ones((f, f), bool)),
                                   s.category_id))
    report: dict = {}
    for label, spec in (("baseline", baseline), ("served", served)):
        model = load_instance_model(spec)
        cmap = category_map_by_name(class_name_map(spec), PET_CATEGORIES)
        for cond, items in photos.items():
            ev = CocoEvaluator(PET_CATEGORIES)
            for path, mask, cat in items:
                with PhotoFormat().open(str(path)) as src:
                    found = detect_item(next(iter(src.items())), model, score_threshold=0.05)
                ev.add(mask.shape[0], mask.shape[1], [(cat, mask)], found, category_map=cmap, file_name=path.name)
            r = ev.result()
            report.setdefault(cond, {})[label] = {"mask_ap50": r.mask_ap50, "mask_ap": r.mask_ap,
                                                   "box_ap50": r.box_ap50}
    lines = [f"model: {args.model}; {len(samples)} validation photos of {args.data.name}; enlarged: x{f} (Lanczos) "
             f"+ Gaussian noise sigma {args.noise:g}; baseline = the spec with {args.baseline_spec}"]
    for cond, by in report.items():
        b, v = by["baseline"], by["served"]
        lines.append(f"{cond}: mask AP50 / AP baseline {b['mask_ap50']:.3f} / {b['mask_ap']:.3f}, served "
                     f"{v['mask_ap50']:.3f} / {v['mask_ap']:.3f} (box AP50 {b['box_ap50']:.3f} -> {v['box_ap50']:.3f})")
    print(json.dumps(report, indent=2))
    if not args.no_log:
        append_result(f"Large photos: {args.model} as served vs {args.baseline_spec}, x{f}, noise {args.noise:g}",
                      lines)


if __name__ == "__main__":
    main()
