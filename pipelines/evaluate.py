"""Semantic evaluation of a model on a labeled folder laid out like ``oxford_pets``.

Predictions go through the same code the service runs (spec normalisation, :func:`pipelines.semantic.
resize_bilinear` for ``resize`` mode, :func:`pipelines.tiling.predict_array` for ``tile`` mode) and are scored
at each trimap's own resolution by :mod:`pipelines.metrics`, summed over all pixels of the split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adapters.base import AdapterError
from pipelines.metrics import bootstrap_difference, bootstrap_intervals, confusion_matrix, scores
from pipelines.normalize import normalize
from pipelines.registry import LoadedModel, flip_tta, get_spec, load
from pipelines.spec import ClassSpec, ModelSpec, Normalization, TruthMap
from pipelines.tiling import TilingConfig, predict_array
from pipelines.train import list_names, load_pairs, split_names

__all__ = [
    "PET_CLASSES",
    "compare_reports",
    "evaluate_folder",
    "export_model",
    "through_size",
    "flip_tta",
    "make_predictor",
    "read_labeled",
    "read_photo",
    "read_truth",
    "resize_square",
    "resolve_model",
]

log = logging.getLogger(__name__)

#: Output order of the pets model: class id = trimap value - 1.
PET_CLASSES = [
    ClassSpec(id=0, name="pet", color=(230, 25, 75)),
    ClassSpec(id=1, name="background", color=(0, 0, 0)),
    ClassSpec(id=2, name="outline", color=(255, 225, 25)),
]
#: Oxford-IIIT Pet trimaps, read by the service when a job gives no truth map.
PET_TRUTH = TruthMap(values={"1": 0, "2": 1, "3": 2},
                     reads="Oxford-IIIT Pet trimaps (1 pet, 2 background, 3 outline)")
_PALETTE = [(230, 25, 75), (0, 0, 0), (255, 225, 25), (60, 180, 75), (0, 130, 200), (245, 130, 48)]


def make_predictor(
    model: LoadedModel, mode: str | None = None, tta: bool | None = None, multiscale: bool | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """``(H, W, C)`` raw photo (uint8) -> ``(H, W, K) float32`` probabilities at the photo's own size.

    ``mode`` ``resize`` (whole photo to ``input_size``, probabilities scaled back bilinearly) or ``tile``
    (sliding windows at native resolution); default: the spec's. ``tta`` forces the flip on or off (None:
    as the spec says); ``multiscale`` likewise the spec's ``tta_sizes`` in resize mode (None: used unless
    ``tta`` is False).
    """
    from pipelines import semantic

    spec = model.spec
    mode = mode or spec.mode
    k = len(spec.classes)
    s = spec.input_size
    predict = model.forward(tta)
    if multiscale is None:
        multiscale = tta is not False
    edges = semantic.tta_edges(s, spec.tta_sizes if multiscale else ())
    shrink = semantic.input_resizer(spec)

    def run(rgb: np.ndarray) -> np.ndarray:
        x = normalize(np.moveaxis(rgb[..., : spec.channels], -1, 0), spec.normalization)
        h, w = x.shape[:2]
        if mode == "tile":
            cfg = TilingConfig(tile=s, overlap=spec.overlap, batch_size=spec.batch_size, blend=spec.blend,
                               prefetch=0)
            return predict_array(x, predict, k, cfg)
        p = semantic.predict_multiscale(predict, {e: shrink(x, e, e)[None] for e in edges}, s, k)[0]
        p = np.einsum("pw,hwc->hpc", semantic.bilinear_matrix(w, s), p, optimize=True)
        return np.tensordot(semantic.bilinear_matrix(h, s), p, axes=(1, 0)).astype(np.float32)

    return run


def resolve_model(name_or_path: str | Path) -> ModelSpec:
    """A spec for a registered name, a model folder / spec.json, or a bare ``.keras`` file.

    A bare ``.keras`` file gets an ad hoc spec: pets classes when it has 3 outputs, input size from the
    model, ``scale`` normalisation by 255, ``resize`` mode.
    """
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".keras":
        import keras

        m = keras.saving.load_model(p, compile=False)
        size = int(m.input_shape[1] or 128)
        k = int(m.output_shape[-1])
        classes = PET_CLASSES if k == 3 else [
            ClassSpec(id=i, name=f"class{i}", color=_PALETTE[i % len(_PALETTE)]) for i in range(k)
        ]
        return ModelSpec(name="adhoc-" + "".join(c for c in p.stem.lower() if c.isalnum() or c in "-_.")[:40],
                         kind="semantic", source=str(p.resolve()), classes=classes, input_size=size,
                         channels=int(m.input_shape[-1]), mode="resize", overlap=min(32, size // 4),
                         normalization=Normalization(kind="scale", scale=255.0),
                         spec_path=p.resolve().parent / "spec.json")
    return get_spec(str(name_or_path))


def read_truth(path: Path, label_offset: int = 1) -> np.ndarray:
    """``(H, W) int16`` class ids from a trimap PNG (value - offset; unknown values -> -1, never scored).

    Raises :class:`AdapterError` for a file that does not decode (truncated, not an image, too large for
    PIL's decompression-bomb guard) or that has more than one channel.
    """
    try:
        with Image.open(path) as im:
            t = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise AdapterError(f"{path}: unreadable trimap ({e})") from e
    if t.ndim != 2:
        raise AdapterError(f"{path}: trimap must be single-channel, got shape {t.shape}")
    return t.astype(np.int16) - label_offset


def read_photo(path: Path) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB of a photo file (grey, palette, RGBA and CMYK converted).

    Raises :class:`AdapterError` for a file that does not decode (truncated, not an image, too large).
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise AdapterError(f"{path}: unreadable image ({e})") from e


def read_labeled(img_path: Path, mask_path: Path, label_offset: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One labelled photo: ``(H, W, 3) uint8`` RGB and ``(H, W) int16`` class ids (:func:`read_truth`).

    Raises :class:`AdapterError` when either file is unreadable or their sizes differ.
    """
    truth = read_truth(mask_path, label_offset)
    rgb = read_photo(img_path)
    if rgb.shape[:2] != truth.shape:
        raise AdapterError(f"{img_path}: image {rgb.shape[:2]} and trimap {truth.shape} sizes differ")
    return rgb, truth


def evaluate_folder(
    model: str | Path | ModelSpec,
    data: str | Path,
    split: str = "all",
    val_fraction: float = 0.15,
    mode: str | None = None,
    tta: bool | None = None,
    label_offset: int = 1,
    square: int | None = None,
    through: int | None = None,
    tta_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on every listed name of ``data`` (``split="val"``: only the held-out names).

    Scores are computed at each trimap's own resolution, unless ``square`` is given: then each photo
    (bilinear) and its trimap (nearest) are first resized to ``square x square`` pixels, the protocol of
    notebooks that train and score at a fixed size (e.g. 128x128), and the model serves that photo as usual.
    ``through`` degrades the photo only (:func:`through_size`), scored against the untouched trimap.
    ``tta_sizes`` replaces the spec's multi-scale sizes (``[]``: none) to measure another setting without
    editing the spec.

    A listed name whose photo or trimap is missing is named in ``missing``; one whose files do not decode,
    or whose photo and trimap sizes differ, is named with the reason in ``errors``. Neither stops the others.

    Returns a JSON-ready dict: ``model``, ``mode``, ``split``, ``tta``, ``square``, ``images`` (scored),
    ``skipped`` (listed but not scored: ``missing`` plus ``errors``), ``missing``, ``errors``, ``pixels``,
    ``pixel_accuracy``, ``mean_iou``, ``mean_dice``,
    ``per_class`` ``{name: {"dice", "iou", "support"}}``, ``confusion`` (rows = truth, model order),
    ``intervals`` (95 % bootstrap intervals over images, :func:`pipelines.metrics.bootstrap_intervals`) and
    ``per_image`` (``name``, ``pixels``, ``pixel_accuracy``, ``mean_iou``, ``confusion``; worst pixel accuracy
    first; :func:`compare_reports` pairs two reports by these).
    """
    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    if spec.kind != "semantic":
        raise ValueError(f"model {spec.name} is a {spec.kind} model; eval scores semantic models")
    if tta_sizes is not None:
        # Validated like a spec file (and cached by the registry apart from the served spec).
        spec = ModelSpec.model_validate({**spec.model_dump(), "tta_sizes": list(tta_sizes)})
    mode = mode or spec.mode
    names = list_names(data)
    if split == "val":
        names = split_names(names, val_fraction)[1]
    pairs, _ = load_pairs(data, names)
    found = {name for name, _, _ in pairs}
    missing = [n for n in names if n not in found]
    if not pairs:
        raise AdapterError(f"{data}: no image with a trimap to evaluate (split={split})")
    predictor = make_predictor(load(spec), mode=mode, tta=tta)
    k = len(spec.classes)
    per_image: list[np.ndarray] = []
    scored: list[str] = []
    errors: list[dict[str, str]] = []
    for name, img_path, mask_path in pairs:
        try:
            rgb, truth = read_labeled(img_path, mask_path, label_offset)
        except AdapterError as e:
            # One bad file costs its own image only; the report names it so nothing is dropped silently.
            log.warning("%s: not scored (%s)", name, e)
            errors.append({"name": name, "error": str(e)})
            continue
        if square:
            rgb, truth = resize_square(rgb, truth, square)
        if through:
            rgb = through_size(rgb, through)
        pred = predictor(rgb).argmax(-1)
        per_image.append(confusion_matrix(truth, pred, k))
        scored.append(name)
    if not per_image:
        raise AdapterError(f"{data}: none of the {len(pairs)} images could be scored; the first: "
                           f"{errors[0]['error']}")
    cm = np.sum(per_image, axis=0)
    sc = scores(cm)
    images = []
    for name, m in zip(scored, per_image, strict=True):
        s_img = scores(m)
        images.append({"name": name, "pixels": int(m.sum()), "pixel_accuracy": s_img["pixel_accuracy"],
                       "mean_iou": s_img["mean_iou"], "confusion": m.tolist()})
    images.sort(key=lambda r: (r["pixel_accuracy"] is None, r["pixel_accuracy"] or 0.0, r["name"]))
    by_id = {c.id: c.name for c in spec.classes}
    return {
        "model": spec.name,
        "mode": mode,
        "split": split,
        "tta": spec.tta == "flip" if tta is None else tta,
        "tta_sizes": [] if tta is False or mode != "resize" else spec.tta_sizes,
        # Model files averaged in every view: 1, or 1 + the spec's ensemble members.
        "model_files": 1 + len(spec.members),
        "square": square,
        "through": through,
        "images": len(scored),
        "skipped": len(missing) + len(errors),
        "missing": missing,
        "errors": errors,
        "pixels": int(cm.sum()),
        "pixel_accuracy": sc["pixel_accuracy"],
        "mean_iou": sc["mean_iou"],
        "mean_dice": sc["mean_dice"],
        "per_class": {
            by_id.get(c["class_id"], str(c["class_id"])): {"dice": c["dice"], "iou": c["iou"],
                                                          "support": c["support"]}
            for c in sc["per_class"]
        },
        "confusion": cm.tolist(),
        "intervals": bootstrap_intervals(per_image),
        "per_image": images,
    }


def compare_reports(baseline: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Paired bootstrap of ``candidate - baseline`` (:func:`pipelines.metrics.bootstrap_difference`) for two
    :func:`evaluate_folder` reports of the same images, paired by name through their ``per_image`` lists.

    Returns ``{"baseline_model", "items", "level", "resamples", "pixel_accuracy": {"difference", "interval"},
    "mean_iou": {...}}``. Raises ``ValueError`` when a report has no per-image scores or the two do not hold
    the same images (different splits or folders, or the same image at other sizes).
    """
    def by_name(report: Any, which: str) -> dict[str, Any]:
        rows = report.get("per_image") if isinstance(report, dict) else None
        if not isinstance(rows, list) or not rows or any(
                not isinstance(r, dict) or not {"name", "pixels", "confusion"} <= r.keys() for r in rows):
            raise ValueError(f"the {which} report has no per-image confusion matrices (not a `tileseg eval "
                             "--json` report of a semantic model, or made by an older tileseg)")
        return {r["name"]: r for r in rows}

    base, cand = by_name(baseline, "baseline"), by_name(candidate, "candidate")
    if base.keys() != cand.keys():
        only_b, only_c = sorted(base.keys() - cand.keys()), sorted(cand.keys() - base.keys())
        raise ValueError(f"the reports hold different images: {len(only_b)} only in the baseline "
                         f"({', '.join(only_b[:3])}), {len(only_c)} only in the candidate ({', '.join(only_c[:3])})")
    names = sorted(cand)
    mismatched = [n for n in names if base[n]["pixels"] != cand[n]["pixels"]]
    if mismatched:
        raise ValueError(f"{len(mismatched)} images were scored on other pixel counts (e.g. {mismatched[0]}): "
                         "compare reports made with the same --square")
    diff = bootstrap_difference([base[n]["confusion"] for n in names], [cand[n]["confusion"] for n in names])
    return {"baseline_model": baseline.get("model"), **diff}


def through_size(rgb: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3) uint8`` photo resized (PIL bilinear, antialiased) to ``size x size`` and back to
    ``(H, W, 3) uint8``: the same pixels with the detail of a ``size``-px photo, as a small photo that was
    upscaled has."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((size, size), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def resize_square(rgb: np.ndarray, truth: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, 3) uint8`` photo and ``(H, W) int16`` class ids -> both at ``(size, size)``: the photo
    bilinear, the labels nearest-neighbour (a label is never blended; -1, unknown, stays -1)."""
    if size < 1:
        raise ValueError(f"square size must be positive, got {size}")
    photo = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    # Shifted by one so that -1 (unknown) fits an 8-bit image; ids above 254 do not occur in trimaps.
    lab = Image.fromarray((truth.astype(np.int32) + 1).clip(0, 255).astype(np.uint8))
    return photo, np.asarray(lab.resize((size, size), Image.NEAREST)).astype(np.int16) - 1


def export_model(
    checkpoint: str | Path,
    export_dir: str | Path,
    name: str = "unet-pets",
    input_size: int = 128,
    class_names: list[str] | None = None,
    mode: str = "resize",
    description: str = "",
    default_for: list[str] | None = None,
    weights_dtype: str = "float32",
) -> ModelSpec:
    """Write a registry model folder: ``model.keras`` (weights only, no optimizer) and ``spec.json``.

    The saved model loads with ``keras.saving.load_model(path, compile=False)`` and no custom objects.
    ``weights_dtype`` ``float16`` stores the weights in half the bytes; the registry runs them in float32
    (:mod:`pipelines.weights`).
    """
    import keras

    from pipelines.weights import cast_model

    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = keras.saving.load_model(checkpoint, compile=False)
    cast_model(model, weights_dtype).save(out / "model.keras")
    names = class_names or [c.name for c in PET_CLASSES]
    if names == [c.name for c in PET_CLASSES]:
        classes = PET_CLASSES
    else:
        classes = [ClassSpec(id=i, name=n, color=_PALETTE[i % len(_PALETTE)]) for i, n in enumerate(names)]
    spec = ModelSpec(
        name=name, kind="semantic", source="model.keras", source_format="keras",
        description=description or "U-Net (Keras 3) for pet / background / outline on photos",
        classes=classes, background_class=1 if names[:2] == ["pet", "background"] else 0,
        channels=3, normalization=Normalization(kind="scale", scale=255.0), input_size=input_size,
        mode=mode, overlap=input_size // 4, batch_size=16, blend="gaussian",
        default_for=default_for if default_for is not None else ["photo"],
        truth_map=PET_TRUTH if classes is PET_CLASSES else None,
    )
    spec.to_file(out / "spec.json")
    return ModelSpec.from_file(out / "spec.json")


def write_metrics(report: dict[str, Any], path: str | Path) -> None:
    """Write an evaluation report as indented JSON."""
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
