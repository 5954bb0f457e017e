"""Ground truth for scoring an item: read as stored label values (or a DICOM SEG's segments), turned into the
model's class ids by the job's or the model's truth map, put on the image's grid when both are georeferenced,
and what the item's metadata should say about it."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import numpy as np

from adapters.base import AdapterError, ItemInfo, Window, split_key
from adapters.geotiff import reproject_labels, same_grid
from core.settings import get_settings
from core.store import fetch_input

__all__ = ["read_truth", "truth_or_note", "with_truth_notes"]


def read_truth(path: str, options: dict[str, Any], key: str, spec: Any, target: ItemInfo | None = None,
               rows: tuple[int, int] | None = None) -> tuple[Any, dict[str, Any]]:
    """Ground-truth class ids ``(H, W) uint8`` (255 = not scored) for the item ``key`` of its input, and what
    the item's metadata should say about them.

    A truth file with one image serves every item; one with several (a label stack beside an image stack)
    gives each item the image with the same key (``page-0003`` for page 3). Stored values become class ids
    through the job's ``truth_map``, else the model spec's (how its own data writes truth, e.g. Oxford
    trimaps 1/2/3), else they are class ids already. Values that match no class are not scored, and the
    metadata says how many pixels that was, so a mask in another convention does not score silently on
    what is left of it. A georeferenced truth on another grid than ``target`` (the image: another extent,
    resolution or CRS, as labels rasterised elsewhere are) is resampled onto it, nearest neighbour.
    ``rows`` ``(start, stop)``: only those rows of ``target`` (one part of a split raster), read as a window
    when the truth is on the image's grid, so no part holds the whole raster's truth.
    """
    from adapters import open_input

    name = os.path.basename(path)
    with fetch_input(path, get_settings().storage_options) as local:
        if target is not None and target.extra.get("sop_instance_uid"):
            from adapters.dicom import segmentation_labels

            seg = segmentation_labels(local, target)
            if seg is not None:
                return _seg_truth(seg, name, options, spec)
        _, source = open_input(local)
        with source:
            item = _truth_item(source, split_key(key)[0], name)
            truth_info, window = item.info, None
            if rows is not None and target is not None and same_grid(truth_info, target):
                window = Window(0, rows[0], target.width, rows[1] - rows[0])
            values = item.read_labels(window)
    classes, told = _to_classes(values, options, spec)
    if window is None and target is not None:
        classes = _fit_to_image(classes, truth_info, target, rows, name, told)
    return classes, told


def truth_or_note(path: str, options: dict[str, Any], key: str, spec: Any, target: ItemInfo | None = None,
                  rows: tuple[int, int] | None = None) -> tuple[Any, dict[str, Any]]:
    """:func:`read_truth`, except that a truth that cannot be used (unreadable, a colour mask, a page the
    label stack lacks, a shape that cannot be placed on the image) costs only the scoring: the class ids are
    ``None``, and the metadata says why in ``truth_unscored`` and in a warning. The item is still segmented
    and its outputs kept; what the user asked for that could not be done is on the item, not lost."""
    try:
        return read_truth(path, options, key, spec, target, rows)
    except AdapterError as e:
        reason = str(e)
        return None, {"truth_unscored": reason,
                      "warnings": [f"ground truth {os.path.basename(path)} not scored: {reason}"]}


def _truth_item(source: Any, base: str, name: str) -> Any:
    """The truth image for the item ``base`` of its input: the one with the same key in a stack, else the
    file's only image."""
    try:
        return source.item(base)  # a stack opens only that page
    except AdapterError:
        items = list(source.items())
        if len(items) != 1:
            keys = f" (keys {items[0].key} ... {items[-1].key})" if items else ""
            raise AdapterError(f"truth {name} holds {len(items)} images and none for "
                               f"{base or 'a single-image input'}{keys}") from None
        return items[0]


def _to_classes(values: np.ndarray, options: dict[str, Any], spec: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored truth values ``(H, W)`` -> class ids by the job's map, else the model's, else as they are; and
    the metadata that says which map was used and what fell out."""
    from pipelines.metrics import truth_classes

    mapping, others, told, hint, from_spec = None, None, {}, "", False
    if options.get("truth_map"):
        mapping, told = _job_map(options)
    elif spec.truth_map is not None:
        mapping, others = spec.truth_map.as_ints(), spec.truth_map.others
        told = {"truth_map": {"from": f"model {spec.name}", "reads": spec.truth_map.reads,
                              "values": spec.truth_map.values, "others": others}}
        hint, from_spec = f"; {spec.name} reads {spec.truth_map.reads}", True
    num_classes = max(c.id for c in spec.classes) + 1
    classes, unscored, found = truth_classes(values, num_classes, mapping, others)
    warnings_ = []
    if from_spec and set(found) <= set(range(num_classes)) and any(mapping.get(v, others) != v for v in found):
        # Every value is also a class id: a mask of class ids is misread by the model's map without a word.
        warnings_.append(
            f"ground truth: its values ({', '.join(map(str, found))}) are all class ids of {spec.name} too; "
            f"they were read as {spec.truth_map.reads}. If they are class ids, give the truth map "
            + json.dumps({str(c.id): c.id for c in spec.classes}, separators=(",", ":")))
    if unscored:
        share = sum(unscored.values()) / values.size
        listed = ", ".join(f"{v} ({n / values.size:.1%})"
                           for v, n in sorted(unscored.items(), key=lambda kv: -kv[1])[:5])
        rule = ("not in the truth map" if mapping is not None
                else f"that are not class ids of {spec.name} (0-{num_classes - 1}; 255 = not scored)")
        warnings_.append(f"ground truth: {share:.1%} of its pixels hold values {rule} and are not scored: "
                         f"{listed}{hint}; a truth map (--truth-map, options.truth_map) reads other values")
    if warnings_:
        told["warnings"] = warnings_
    return classes, told


def _fit_to_image(classes: np.ndarray, truth_info: ItemInfo, target: ItemInfo, rows: tuple[int, int] | None,
                  name: str, told: dict[str, Any]) -> np.ndarray:
    """Class ids on the truth's grid, put on the image's (its ``rows`` only, for a part of a split raster):
    resampled by georeference when both are georeferenced and differ; scaled when a plain label image has the
    image's aspect at another resolution; else as they are (a shape that still differs fails the item).
    What was done is added to ``told``'s warnings."""
    note = None
    if _georeferenced(truth_info) and _georeferenced(target):
        if not same_grid(truth_info, target):
            classes = reproject_labels(classes, truth_info, _rows_of(target, rows) if rows else target)
            gap = float((classes == 255).mean())
            note = (f"ground truth {name} is on another grid ({truth_info.width}x{truth_info.height} px) than the "
                    f"image ({target.width}x{target.height} px); it was resampled onto the image's grid (nearest "
                    f"neighbour), and {gap:.1%} of the image has no truth there (outside it or not scored)")
    elif classes.shape != (target.height, target.width):
        h, w = classes.shape
        if abs(h / w - target.height / target.width) <= 0.01 * (target.height / target.width):
            # A label saved at another resolution than its photo (a mask exported at half size): the same
            # picture, so scale it by nearest neighbour rather than fail the item and lose its segmentation.
            rows_ = np.minimum(((np.arange(target.height) + 0.5) * h / target.height).astype(int), h - 1)
            cols_ = np.minimum(((np.arange(target.width) + 0.5) * w / target.width).astype(int), w - 1)
            classes = classes[np.ix_(rows_, cols_)]
            if rows is not None:
                classes = classes[rows[0] : rows[1]]
            note = (f"ground truth {name} is {w}x{h} px, the image {target.width}x{target.height}: scaled to the "
                    "image (nearest neighbour) before scoring")
    expected = (rows[1] - rows[0] if rows else target.height, target.width)
    if classes.shape != expected:
        h, w = classes.shape
        raise AdapterError(f"it is {w}x{h} px and the image {target.width}x{target.height} px, with another aspect "
                           "ratio and no georeference that would place one on the other")
    if note:
        told.setdefault("warnings", []).append(note)
    return classes


def _seg_truth(seg: Any, name: str, options: dict[str, Any], spec: Any) -> tuple[Any, dict[str, Any]]:
    """Class ids from a DICOM SEG's segments on one image (see :func:`read_truth`): by the job's
    ``truth_map`` (segment number -> class id) if given, else each segment whose label names a class of the
    model (case, spaces and underscores ignored) becomes that class, and pixels in no segment become the
    model's background class. A segment naming no class is not scored; classes the SEG has no segment for
    cannot be told from background, and the item says so."""
    from pipelines.metrics import truth_classes

    def norm(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    num_classes = max(c.id for c in spec.classes) + 1
    warnings_: list[str] = []
    if options.get("truth_map"):
        mapping, told = _job_map(options)
    else:
        by_name = {norm(c.name): c.id for c in spec.classes}
        mapping = {n: by_name[norm(label)] for n, label in seg.labels.items() if norm(label) in by_name}
        if spec.background_class is not None:
            mapping[0] = spec.background_class
        told = {"truth_map": {"from": f"DICOM SEG {name}: segment labels matched to class names",
                              "values": {str(k): v for k, v in sorted(mapping.items())}}}
        unmatched = [f"{n} {label!r}" for n, label in seg.labels.items() if n not in mapping]
        if unmatched:
            warnings_.append(f"ground truth {name}: segments {', '.join(unmatched)} name no class of {spec.name} "
                             f"({', '.join(spec.class_names)}) and are not scored; a truth map (segment "
                             "number -> class id) assigns them")
        covered = set(mapping.values())
        missing = [c.name for c in spec.classes if c.id not in covered]
        exact = [c.name for c in spec.classes if c.id in covered and c.id != spec.background_class]
        if missing and spec.background_class is not None:
            warnings_.append(
                f"ground truth {name} has no segment for {', '.join(missing)}: there it cannot be told from "
                "background, so the figures of those classes and of background, and pixel accuracy, count such "
                f"predictions as errors; those of {', '.join(exact) or 'no class'} are exact")
    classes = truth_classes(seg.numbers, num_classes, mapping).classes
    if warnings_:
        told["warnings"] = warnings_
    return classes, told


def _rows_of(info: ItemInfo, rows: tuple[int, int]) -> ItemInfo:
    """The grid of rows ``[start, stop)`` of a georeferenced ``info``."""
    a, b, c, d, e, f = info.transform
    return replace(info, height=rows[1] - rows[0], transform=(a, b, c + b * rows[0], d, e, f + e * rows[0]))


def _job_map(options: dict[str, Any]) -> tuple[dict[int, int], dict[str, Any]]:
    """The job's ``truth_map`` (checked at submission) as ints, and the metadata that names it."""
    return ({int(k): int(v) for k, v in options["truth_map"].items()},
            {"truth_map": {"from": "job", "values": options["truth_map"]}})


def _georeferenced(info: ItemInfo) -> bool:
    return info.transform is not None and bool(info.crs_wkt)


def with_truth_notes(meta: dict[str, Any], told: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with what reading the ground truth had to say (:func:`read_truth`)."""
    if not told:
        return meta
    out = {**meta, **{k: v for k, v in told.items() if k != "warnings"}}
    if told.get("warnings"):
        out["warnings"] = [*meta.get("warnings", []), *told["warnings"]]
    return out
