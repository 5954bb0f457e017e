"""Building instances for the own Mask R-CNN: labeled scenes, training crops and tiled scene evaluation.

- **Scenes** (:func:`load_building_scenes`): the labeled satellite tiles of ``../shared/data`` as detector
  input exactly as the instance runtime builds it (uint8 RGB passed through; other dtypes percentile-
  stretched by :func:`pipelines.instances.to_uint8_rgb`; one band replicated) with an instance-id map.
  SpaceNet 1 Rio masks have no instance ids: instances are their 4-connected components (buildings that
  share an edge merge, as the data README warns; diagonal contacts stay apart). SpaceNet 4 Atlanta has
  real per-polygon ids. The split is :data:`pipelines.domains.RIO_SPLIT` (whole tiles), the same as the
  semantic ``buildings-rgb`` model's.
- **Crops** (:class:`BuildingCropGenerator`): endless random square crops with the 8 flips/rotations
  (buildings have no up), in the Model Garden decoder's layout.
- **Evaluation** (:func:`evaluate_building_scenes`): each held-out tile goes through the real GeoTIFF
  adapter and :func:`pipelines.instances.detect_item` (tiled, with seam merging when the tile is larger
  than the model input) and is scored with COCO mask/box AP against the components.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import AdapterError

__all__ = [
    "BUILDING_INSTANCE_CLASSES",
    "BuildingCropGenerator",
    "BuildingScene",
    "components",
    "evaluate_building_scenes",
    "load_building_scenes",
    "scenes_from_folder",
]

#: Detector output id -> name (0 is the Model Garden's background).
BUILDING_INSTANCE_CLASSES: dict[int, str] = {1: "building"}


@dataclass
class BuildingScene:
    """One labeled tile: ``image`` ``(H, W, 3) uint8`` detector input, ``instances`` ``(H, W) int32``
    (0 = none, 1..N = building id), ``valid`` ``(H, W) bool`` image footprint, ``path`` the source GeoTIFF."""

    name: str
    image: np.ndarray
    instances: np.ndarray
    valid: np.ndarray
    path: Path

    @property
    def count(self) -> int:
        return len(np.unique(self.instances[self.instances > 0]))


def components(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Connected components of ``mask`` ``(H, W) bool`` -> ``(H, W) int32`` ids 1..N (0 = background).

    Uses rasterio's polygon tracing (the library the service already polygonizes with) and burns each
    component back with its own id, so no image-processing dependency is needed.
    """
    from rasterio.features import rasterize, shapes
    from rasterio.transform import Affine

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    geoms = [g for g, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=connectivity,
                                  transform=Affine.identity())]
    return rasterize([(g, i + 1) for i, g in enumerate(geoms)], out_shape=mask.shape,
                     transform=Affine.identity(), dtype="int32", fill=0)


def _read(path: Path) -> tuple[np.ndarray, Any]:
    import rasterio

    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    try:
        with rasterio.open(path) as ds:
            return ds.read(masked=False), ds.transform
    except rasterio.errors.RasterioError as e:
        raise AdapterError(f"{path.name}: cannot read raster: {e}") from e


def _rgb(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The runtime's detector input for a whole tile (item-wide percentile stretch for non-uint8)."""
    from pipelines.instances import to_uint8_rgb

    bounds = None
    if pixels.dtype != np.uint8:
        px = np.repeat(pixels[:1], 3, axis=0) if pixels.shape[0] < 3 else pixels[:3]
        data = px[:, valid].astype(np.float64)
        bounds = (np.percentile(data, 2.0, axis=1), np.percentile(data, 98.0, axis=1))
    rgb = to_uint8_rgb(pixels, bounds)
    rgb[~valid] = 0
    return rgb


def scenes_from_folder(folder: str | Path, names: Sequence[str]) -> list[BuildingScene]:
    """Scenes from a folder laid out like ``spacenet1_rio_buildings``: ``images/NAME.tif`` (RGB) and
    ``masks/NAME.tif`` (building > 0, same grid). Pixels black in all bands are outside the footprint."""
    from pipelines.domains import read_rio_tile

    folder = Path(folder)
    out = []
    for name in names:
        img, mask, valid = read_rio_tile(folder, name)
        out.append(BuildingScene(name, _rgb(img, valid), components(mask & valid), valid,
                                 folder / "images" / f"{name}.tif"))
    return out


def load_building_scenes(split: str, data_root: str | Path | None = None) -> list[BuildingScene]:
    """Scenes of one split: ``train`` = the Rio training tiles + SpaceNet 4 Atlanta (panchromatic, as grey
    RGB); ``val`` / ``test`` = Rio tiles only (:data:`pipelines.domains.RIO_SPLIT`)."""
    from pipelines.domains import RIO_SPLIT, _data_root

    if split not in RIO_SPLIT:
        raise ValueError(f"split must be one of {sorted(RIO_SPLIT)}, got {split!r}")
    root = _data_root(data_root)
    out = scenes_from_folder(root / "spacenet1_rio_buildings", RIO_SPLIT[split])
    if split == "train":
        atl = root / "satellite_labeled" / "spacenet4_atlanta_buildings"
        pan, _ = _read(atl / "image_pan.tif")
        ids, _ = _read(atl / "instances.tif")
        valid = pan[0] > 0
        inst = np.where(valid, ids[0], 0).astype(np.int32)
        out.append(BuildingScene("atlanta_pan", _rgb(pan, valid), inst, valid, atl / "image_pan.tif"))
    return out


def _dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 rotations/flips of an ``(H, W, ...)`` array (axes 0 and 1)."""
    a = np.rot90(a, k, axes=(0, 1))
    return a[:, ::-1] if flip else a


class BuildingCropGenerator:
    """Endless random ``size`` square crops of the scenes (one of the 8 rotations/flips each), in the
    Model Garden decoder's layout (``image``, normalised ``groundtruth_boxes``, classes, masks, is_crowd).

    Instances cut by the crop keep their visible part when it has at least ``min_pixels`` pixels and
    ``min_visible`` of the building. Crops with no building are kept with probability ``empty_prob`` and
    then carry one zero-size ignored dummy box, which the parser drops (so the detector also learns
    negatives: streets, vegetation, bare soil). Scenes smaller than ``size`` are padded with black (the
    runtime blanks no-data pixels the same way).
    """

    def __init__(self, scenes: Sequence[BuildingScene], size: int, *, max_instances: int = 100,
                 min_pixels: int = 12, min_visible: float = 0.25, empty_prob: float = 0.3, seed: int = 0):
        if not scenes:
            raise ValueError("no training scenes")
        self.scenes, self.size, self.max_instances = list(scenes), size, max_instances
        self.min_pixels, self.min_visible, self.empty_prob = min_pixels, min_visible, empty_prob
        self.rng = np.random.default_rng(seed)
        # Sample scenes by building count (+1 so empty scenes still appear): dense tiles teach the most.
        w = np.array([s.count + 1.0 for s in self.scenes])
        self.p = w / w.sum()
        self.areas = [np.bincount(s.instances.ravel()) for s in self.scenes]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``image (size, size, 3) uint8``, ``masks (N, size, size) bool`` (N may be 0)."""
        rng, s = self.rng, self.size
        k = int(rng.choice(len(self.scenes), p=self.p))
        scene, areas = self.scenes[k], self.areas[k]
        h, w = scene.instances.shape
        y = int(rng.integers(0, max(h - s, 0) + 1))
        x = int(rng.integers(0, max(w - s, 0) + 1))
        image = np.zeros((s, s, 3), np.uint8)
        ids = np.zeros((s, s), np.int32)
        ch, cw = min(s, h), min(s, w)
        image[:ch, :cw] = scene.image[y:y + ch, x:x + cw]
        ids[:ch, :cw] = scene.instances[y:y + ch, x:x + cw]
        r, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
        image, ids = _dihedral(image, r, flip), _dihedral(ids, r, flip)
        present, counts = np.unique(ids[ids > 0], return_counts=True)
        keep = [i for i, c in zip(present.tolist(), counts.tolist(), strict=True)
                if c >= self.min_pixels and c >= self.min_visible * areas[i]]
        keep = keep[: self.max_instances]
        masks = np.stack([ids == i for i in keep]) if keep else np.zeros((0, s, s), bool)
        return np.ascontiguousarray(image), masks

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        from pipelines.maskrcnn import boxes_from_masks

        s = self.size
        while True:
            image, masks = self.sample()
            if not len(masks) and self.rng.random() >= self.empty_prob:
                continue
            n = len(masks)
            boxes = boxes_from_masks(masks) / np.float32(s)
            classes = np.ones(n, np.int64)
            if n == 0:
                # The parser needs at least one row; a zero-area box is filtered out by it (no positives).
                boxes, classes = np.zeros((1, 4), np.float32), np.zeros(1, np.int64)
                masks = np.zeros((1, s, s), bool)
            yield {
                "image": image,
                "groundtruth_boxes": boxes.astype(np.float32),
                "groundtruth_classes": classes,
                "groundtruth_instance_masks": masks.astype(np.float32),
                "groundtruth_is_crowd": np.zeros(len(classes), bool),
            }


def evaluate_building_scenes(model: Any, scenes: Sequence[BuildingScene], *, score_threshold: float = 0.05
                             ) -> dict[str, Any]:
    """COCO mask/box AP of an instance model on whole scenes, read through the GeoTIFF adapter and
    detected with :func:`pipelines.instances.detect_item` (tiled + seam merging for scenes larger than the
    model input). Ground truth: the scenes' instance maps. COCO counts at most 100 detections per image.
    """
    from adapters.geotiff import GeoTiffFormat
    from pipelines.instance_eval import CocoEvaluator
    from pipelines.instances import detect_item

    ev = CocoEvaluator(BUILDING_INSTANCE_CLASSES)
    per_scene = {}
    t0 = time.monotonic()
    fmt = GeoTiffFormat()
    for sc in scenes:
        with fmt.open(str(sc.path)) as src:
            item = next(iter(src.items()))
            found = detect_item(item, model, score_threshold=score_threshold)
        h, w = sc.instances.shape
        gt = [(1, sc.instances == i) for i in np.unique(sc.instances[sc.instances > 0]).tolist()]
        ev.add(h, w, gt, found, file_name=sc.name)
        per_scene[sc.name] = {"buildings": len(gt), "detections": len(found),
                              "detections_at_0.5": sum(1 for f in found if f.score >= 0.5)}
    return {**ev.result().to_json(), "scenes": per_scene, "seconds": round(time.monotonic() - t0, 1)}
