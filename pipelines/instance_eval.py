"""COCO evaluation of instance models: mask AP, AP50, AP75 and box AP with pycocotools.

:class:`CocoEvaluator` collects ground truth masks and predicted :class:`~pipelines.instances.Instance` s
image by image and runs ``COCOeval`` for ``segm`` and ``bbox``. :func:`evaluate_folder` does that for a
folder laid out like ``../shared/data/oxford_pets`` (``images/NAME.jpg``, ``trimaps/NAME.png``,
``annotations/*.txt``): one pet per photo, class cat or dog, instance mask from the trimap.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipelines.instances import Instance, class_name_map, detect_image, to_coco_results
from pipelines.registry import LoadedModel

__all__ = [
    "PET_CATEGORIES",
    "CocoEvaluator",
    "InstanceMetrics",
    "PetSample",
    "category_map_by_name",
    "evaluate_coco",
    "evaluate_folder",
    "gt_annotation",
    "list_pet_samples",
    "pet_mask",
]

#: Categories of the oxford_pets layout (the SPECIES column of its list files).
PET_CATEGORIES: dict[int, str] = {1: "cat", 2: "dog"}


@dataclass
class InstanceMetrics:
    """COCO AP over IoU 0.50:0.95 (``*_ap``), at 0.50 and at 0.75, for masks and boxes, all areas,
    100 detections per image. NaN when there is no ground truth."""

    mask_ap: float
    mask_ap50: float
    mask_ap75: float
    box_ap: float
    box_ap50: float
    box_ap75: float
    images: int
    gt_instances: int
    detections: int
    #: Photos not scored, each ``{"name", "error"}`` (unreadable photo or trimap, sizes that differ).
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def gt_annotation(
    mask: np.ndarray, category_id: int, *, image_id: int, ann_id: int, iscrowd: bool = False
) -> dict[str, Any]:
    """A COCO ground-truth annotation for an ``(H, W) bool`` mask (RLE, area and box from the mask)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(iscrowd),
    }


def _stats(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> tuple[float, float, float]:
    if not results:
        return (0.0, 0.0, 0.0) if gt.getAnnIds() else (math.nan,) * 3
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return tuple(math.nan if s < 0 else float(s) for s in ev.stats[:3])  # type: ignore[return-value]


def evaluate_coco(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> InstanceMetrics:
    """Mask and box AP of COCO ``results`` (each with ``segmentation`` RLE and ``bbox`` xywh) against a COCO
    ground-truth dataset dict (``images``, ``annotations``, ``categories``)."""
    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], **copy.deepcopy(dict(gt))}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    segm = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    mask_ap = _stats(coco, segm, "segm")
    box_ap = _stats(coco, boxes, "bbox")
    return InstanceMetrics(
        *mask_ap, *box_ap, images=len(gt["images"]), gt_instances=len(gt["annotations"]), detections=len(results)
    )


class CocoEvaluator:
    """Accumulates images (ground truth + predictions) and computes COCO mask/box AP.

    ``categories``: ``{category_id: name}`` of the ground truth. Predictions whose class is not a category
    (after ``category_map``) are ignored.
    """

    def __init__(self, categories: Mapping[int, str]):
        self.categories = dict(categories)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(
        self,
        height: int,
        width: int,
        ground_truth: Iterable[tuple[int, np.ndarray]],
        predictions: Sequence[Instance],
        *,
        category_map: Mapping[int, int] | None = None,
        file_name: str = "",
    ) -> int:
        """Add one image: ``ground_truth`` as ``(category_id, (H, W) bool mask)`` pairs, ``predictions``
        in the same pixel grid. Returns the image id."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": height, "width": width, "file_name": file_name})
        for cid, m in ground_truth:
            if m.shape != (height, width):
                raise ValueError(f"{file_name}: ground truth mask {m.shape} is not {(height, width)}")
            self.annotations.append(gt_annotation(m, cid, image_id=image_id, ann_id=len(self.annotations) + 1))
        for r in to_coco_results(predictions, image_id, category_map):
            if r["category_id"] in self.categories:
                self.results.append(r)
        return image_id

    def ground_truth(self) -> dict[str, Any]:
        """The COCO ground-truth dataset dict built so far."""
        return {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": k, "name": v} for k, v in sorted(self.categories.items())],
        }

    def result(self) -> InstanceMetrics:
        return evaluate_coco(self.ground_truth(), self.results)


# --------------------------------------------------------------------------------------------------------
# oxford_pets style folders


@dataclass(frozen=True)
class PetSample:
    name: str
    image: Path
    trimap: Path
    category_id: int


def list_pet_samples(data_dir: str | Path, names: Iterable[str] | None = None) -> list[PetSample]:
    """Samples of an oxford_pets style folder, in list-file order (or ``names`` order).

    Species come from ``annotations/*.txt`` (``NAME CLASS-ID SPECIES BREED-ID``); names absent from the
    lists fall back to the dataset's rule (capitalised names are cats). Photos without a trimap are skipped.
    """
    root = Path(data_dir)
    if not (root / "images").is_dir() or not (root / "trimaps").is_dir():
        raise FileNotFoundError(f"{root}: expected images/ and trimaps/ folders (oxford_pets layout)")
    species: dict[str, int] = {}
    for lst in sorted((root / "annotations").glob("*.txt")):
        for line in lst.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#") and parts[2] in ("1", "2"):
                species.setdefault(parts[0], int(parts[2]))
    wanted = list(names) if names is not None else (
        list(species) or sorted(p.stem for p in (root / "images").glob("*.jpg")))
    out = []
    for name in wanted:
        img, tri = root / "images" / f"{name}.jpg", root / "trimaps" / f"{name}.png"
        if not img.is_file() or not tri.is_file():
            continue
        out.append(PetSample(name, img, tri, species.get(name, 1 if name[:1].isupper() else 2)))
    return out


def pet_mask(trimap: np.ndarray, *, include_outline: bool = True) -> np.ndarray:
    """``(H, W) bool`` pet mask from an oxford_pets trimap (1 pet, 2 background, 3 outline).

    The outline band straddles the true contour; by default it counts as pet so masks are not eroded.
    """
    return (trimap == 1) | (trimap == 3) if include_outline else trimap == 1


def category_map_by_name(model_classes: Mapping[int, str], categories: Mapping[int, str]) -> dict[int, int]:
    """Model class id -> dataset category id for classes with the same name (case-insensitive), e.g.
    COCO cat 17 / dog 18 -> pets 1 / 2."""
    by_name = {v.lower(): k for k, v in categories.items()}
    return {cid: by_name[name.lower()] for cid, name in model_classes.items() if name.lower() in by_name}


def evaluate_folder(
    model: LoadedModel,
    data_dir: str | Path,
    *,
    names: Iterable[str] | None = None,
    limit: int | None = None,
    score_threshold: float = 0.05,
    max_detections: int = 100,
    include_outline: bool = True,
    tta: bool | None = None,
    refine: bool | None = None,
) -> InstanceMetrics:
    """COCO mask/box AP of an instance model on an oxford_pets style folder.

    Model classes are matched to the folder's categories (cat, dog) by name. A low ``score_threshold``
    keeps the ranking AP needs. ``names`` restricts to a split (e.g. a validation list). ``tta`` forces
    flip test-time augmentation on or off and ``refine`` the spec's mask refinement (default: the spec's).
    A photo whose files do not decode, or whose trimap has another size, is left out and named in
    ``errors``; raises ``ValueError`` when no photo could be scored.
    """
    from adapters.base import AdapterError
    from pipelines.evaluate import read_labeled

    cmap = category_map_by_name(class_name_map(model.spec), PET_CATEGORIES)
    if not cmap:
        raise ValueError(f"model {model.spec.name} has no class named cat or dog; cannot evaluate on pets")
    ev = CocoEvaluator(PET_CATEGORIES)
    samples = list_pet_samples(data_dir, names)[: limit if limit else None]
    errors: list[dict[str, str]] = []
    for s in samples:
        try:
            image, trimap = read_labeled(s.image, s.trimap, label_offset=0)
        except AdapterError as e:
            errors.append({"name": s.name, "error": str(e)})
            continue
        found = detect_image(model, image, score_threshold=score_threshold, max_detections=max_detections, tta=tta,
                             refine=refine)
        ev.add(image.shape[0], image.shape[1], [(s.category_id, pet_mask(trimap, include_outline=include_outline))],
               found, category_map=cmap, file_name=s.image.name)
    if samples and len(errors) == len(samples):
        raise ValueError(f"{data_dir}: none of the {len(samples)} photos could be scored; the first: "
                         f"{errors[0]['error']}")
    return replace(ev.result(), errors=errors)
