"""Domain models trained in-project: building footprints on satellite RGB and organs on CT slices.

Three jobs, kept apart:

- **Readers** turn the labeled samples in ``../shared/data`` into :class:`Sample` s: model input exactly as
  the service will feed it (same normalisation code, :func:`pipelines.normalize.normalize`) and class-id
  labels with :data:`pipelines.train.IGNORE` where the truth is unknown. The splits are fixed name lists
  (whole tiles / a contiguous block of slices), so training can never see a held-out image.
- **Resampling** (:func:`ground_resolution_m`, :class:`ResampledItem`, :class:`GridRestoringSink`,
  :func:`segment_at_model_resolution`): a raster at another ground resolution is resampled to the model's
  before inference and the result is written on the input's own grid.
- **Training** (:func:`train_domain`) on in-memory samples with the U-Net builder, loss, metrics and
  callbacks of :mod:`pipelines.unet` / :mod:`pipelines.train`, then export as a registry model folder and
  evaluation on the held-out images through the real adapters and the service's runner.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapters.base import AdapterError, Artifact, Item, ItemInfo, MaskSink, Window
from pipelines.normalize import band_stats, normalize
from pipelines.registry import LoadedModel
from pipelines.semantic import (
    NODATA_CLASS,
    SemanticResult,
    bilinear_matrix,
    label_and_confidence,
    resize_bilinear,
    segment_item,
)
from pipelines.spec import ClassSpec, ModelSpec, Normalization, TruthMap
from pipelines.train import IGNORE

__all__ = [
    "BUILDING_CLASSES",
    "CT_CLASSES",
    "CT_SPLIT",
    "RIO_SPLIT",
    "ArraySink",
    "DomainTrainConfig",
    "GridRestoringSink",
    "ResampledItem",
    "Sample",
    "building_samples",
    "buildings_spec",
    "ct_samples",
    "ct_spec",
    "evaluate_buildings",
    "evaluate_ct",
    "export",
    "ground_resolution_m",
    "load_atlanta",
    "load_quebec",
    "load_rio",
    "map_ct_labels",
    "read_ct_slice",
    "read_rio_tile",
    "resample_matrix",
    "resample_pixels",
    "segment_at_model_resolution",
    "train_domain",
]

log = logging.getLogger(__name__)

_EARTH_RADIUS_M = 6_371_008.8

# --------------------------------------------------------------------------------------------- classes

BUILDING_CLASSES = [
    ClassSpec(id=0, name="background", color=(0, 0, 0)),
    ClassSpec(id=1, name="building", color=(255, 215, 0)),
]

#: (class spec, TotalSegmentator ``total`` ids merged into it). Only structures present in the 20 slices.
CT_CLASSES: list[tuple[ClassSpec, tuple[int, ...]]] = [
    (ClassSpec(id=0, name="background", color=(0, 0, 0)), ()),
    (ClassSpec(id=1, name="liver", color=(220, 90, 60)), (5,)),
    (ClassSpec(id=2, name="spleen", color=(150, 60, 200)), (1,)),
    (ClassSpec(id=3, name="stomach", color=(250, 200, 60)), (6,)),
    (ClassSpec(id=4, name="aorta", color=(230, 30, 30)), (52,)),
    # Every vertebra of the `total` task (26 S1 ... 50 C1); the training slices hold T11 and T12 only.
    (ClassSpec(id=5, name="vertebra", color=(240, 240, 200)), tuple(range(26, 51))),
]

#: Ground truth as TotalSegmentator writes it, read by the service when a job gives no truth map.
CT_TRUTH = TruthMap(values={str(i): c.id for c, ids in CT_CLASSES for i in ids}, others=0,
                    reads="TotalSegmentator 'total' label ids (5 liver, 1 spleen, 6 stomach, 52 aorta, 26-50 "
                          "vertebrae; other structures are background)")
#: Building masks as SpaceNet (0/255) and most GIS exports (0/1) write them.
BUILDING_TRUTH = TruthMap(values={"0": 0}, others=1,
                          reads="building masks (0 background, any other value building)")

#: Whole Rio tiles per split. img64 is the README demo sample (samples/geotiff/rio_img64.tif): never trained on.
RIO_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("img50", "img51", "img52", "img54", "img57", "img59", "img60", "img61"),
    "val": ("img56",),
    "test": ("img53", "img64"),
}
#: Contiguous slice blocks (slice_01 most superior). Test = the inferior end, val = the two slices above it.
CT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": tuple(f"slice_{i:02d}" for i in range(1, 15)),
    "val": ("slice_15", "slice_16"),
    "test": tuple(f"slice_{i:02d}" for i in range(17, 21)),
}

BUILDINGS_NORM = Normalization(kind="percentile", low=2.0, high=98.0)
CT_NORM = Normalization(kind="window", center=40.0, width=400.0)
BUILDINGS_RES_M = 0.5


@dataclass
class Sample:
    """One labeled image ready for training.

    ``image`` ``(H, W, C) float32`` model input in [0, 1]; ``label`` ``(H, W) uint8`` class ids,
    :data:`IGNORE` (255) where unknown (outside the image footprint).
    """

    name: str
    source: str
    image: np.ndarray
    label: np.ndarray
    resolution_m: float | None = None


# --------------------------------------------------------------------------------------------- resampling


def ground_resolution_m(info: ItemInfo) -> float | None:
    """Ground pixel size in metres (geometric mean of the x and y sizes) from ``info``'s transform and CRS.

    Projected CRSs use the CRS's linear unit; geographic ones (degrees) use a sphere at the raster's centre
    latitude. None without a transform or CRS.
    """
    if info.transform is None or not info.crs_wkt:
        return None
    from rasterio.crs import CRS

    a, b, _c, d, e, f = info.transform
    sx, sy = math.hypot(a, d), math.hypot(b, e)
    crs = CRS.from_wkt(info.crs_wkt)
    if crs.is_geographic:
        lat = math.radians(f + e * info.height / 2 + d * info.width / 2)
        k = math.pi / 180 * _EARTH_RADIUS_M
        return math.sqrt(sx * k * math.cos(lat) * sy * k)
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - GDAL raises its own error types for unknown units
        return None
    return math.sqrt(sx * sy) * factor


def resample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in) float32`` 1-D resampling weights: area averaging when shrinking (no aliasing of
    small roofs into noise), bilinear (:func:`pipelines.semantic.bilinear_matrix`) when enlarging."""
    if n_out >= n_in:
        return bilinear_matrix(n_out, n_in)
    s = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for j in range(n_out):
        lo, hi = j * s, (j + 1) * s
        i0, i1 = int(math.floor(lo)), min(n_in, int(math.ceil(hi)))
        for i in range(i0, i1):
            m[j, i] = min(hi, i + 1) - max(lo, i)
    m /= m.sum(axis=1, keepdims=True)
    return m.astype(np.float32)


def resample_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(C, H, W)`` any dtype -> ``(C, height, width) float32`` (see :func:`resample_matrix`)."""
    my = resample_matrix(height, pixels.shape[1])
    mx = resample_matrix(width, pixels.shape[2])
    x = np.nan_to_num(pixels.astype(np.float32, copy=False))
    return np.einsum("hy,cyx,wx->chw", my, x, mx, optimize=True).astype(np.float32)


#: Pixels a resampled raster (before or after) may have: :class:`ResampledItem` holds it whole in memory.
_RESAMPLE_MAX_PIXELS = 8192 * 8192


def _resampled_shape(info: ItemInfo, scale: float) -> tuple[int, int]:
    return max(1, round(info.height * scale)), max(1, round(info.width * scale))


class ResampledItem(Item):
    """A view of ``base`` resampled by ``scale`` (output pixels per input pixel), read whole once.

    ``pixel_area`` is scaled so class areas stay in true units. Nodata follows the base's valid mask
    (a model pixel is valid when at least half of what it covers is).
    """

    streamable = False

    def __init__(self, base: Item, scale: float, max_pixels: int = _RESAMPLE_MAX_PIXELS) -> None:
        h, w = _resampled_shape(base.info, scale)
        if max(base.info.height * base.info.width, h * w) > max_pixels:
            raise AdapterError(
                f"{getattr(base, 'path', 'item')}: {base.info.width}x{base.info.height} resampled to {w}x{h} "
                f"is too large to hold in memory (limit {max_pixels:,} pixels)"
            )
        self.base, self.scale = base, scale
        self.key, self.group = base.key, base.group
        self.path = getattr(base, "path", None)
        bi = base.info
        sy, sx = bi.height / h, bi.width / w
        transform = None
        if bi.transform is not None:
            a, b, c, d, e, f = bi.transform
            transform = (a * sx, b * sy, c, d * sx, e * sy, f)
        self.info = ItemInfo(
            height=h, width=w, bands=bi.bands, dtype="float32", modality=bi.modality, crs_wkt=bi.crs_wkt,
            transform=transform, pixel_area=None if bi.pixel_area is None else bi.pixel_area * sx * sy,
            area_unit=bi.area_unit, warnings=list(bi.warnings), extra=dict(bi.extra),
        )
        self._pixels = resample_pixels(base.read(None), h, w)
        valid = base.valid_mask(None)
        self._valid = None if valid is None else resample_pixels(valid[None].astype(np.float32), h, w)[0] >= 0.5

    def read(self, window: Window | None = None) -> np.ndarray:
        if window is None:
            return self._pixels.copy()
        r, c = int(window.row_off), int(window.col_off)
        return self._pixels[:, r : r + int(window.height), c : c + int(window.width)].copy()

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        if self._valid is None or window is None:
            return self._valid
        r, c = int(window.row_off), int(window.col_off)
        return self._valid[r : r + int(window.height), c : c + int(window.width)]

    def preview(self, max_size: int = 1024) -> np.ndarray:
        return self.base.preview(max_size)


class ArraySink(MaskSink):
    """Keeps ``classes`` ``(H, W) uint8`` (255 where unwritten) and ``confidence`` ``(H, W) float32`` in memory."""

    def __init__(self, height: int, width: int) -> None:
        self.classes = np.full((height, width), NODATA_CLASS, np.uint8)
        self.confidence = np.zeros((height, width), np.float32)

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        r, c = int(window.row_off), int(window.col_off)
        h, w = classes.shape
        self.classes[r : r + h, c : c + w] = classes
        self.confidence[r : r + h, c : c + w] = confidence

    def close(self) -> list[Artifact]:
        return []


class GridRestoringSink(ArraySink):
    """Collects a prediction made on a :class:`ResampledItem` and, on :meth:`close`, writes it to ``inner``
    (the input format's own sink) on the input grid ``(height, width)``.

    The sink only sees class ids and confidence, so per-class probabilities are rebuilt as confidence for
    the predicted class and an even share of the rest for the others (exact for two classes), resampled
    bilinearly and arg-maxed: edges follow the model's soft boundary instead of nearest-neighbour blocks.
    """

    def __init__(self, inner: MaskSink, model_shape: tuple[int, int], height: int, width: int,
                 num_classes: int, valid: np.ndarray | None = None, block_rows: int = 512) -> None:
        super().__init__(*model_shape)
        self.inner, self.height, self.width = inner, height, width
        self.num_classes, self.valid, self.block_rows = num_classes, valid, block_rows

    def close(self) -> list[Artifact]:
        k = self.num_classes
        cls, conf = self.classes, self.confidence
        nodata = cls == NODATA_CLASS
        rest = (1.0 - conf) / max(k - 1, 1)
        probs = np.repeat(rest[..., None], k, axis=-1)
        rr, cc = np.nonzero(~nodata)
        probs[rr, cc, cls[rr, cc]] = conf[rr, cc]
        probs[nodata] = 0.0
        mx = resample_matrix(self.width, cls.shape[1])
        tmp = np.einsum("pw,hwc->hpc", mx, probs, optimize=True)
        my = resample_matrix(self.height, cls.shape[0])
        nd = np.tensordot(my, np.tensordot(nodata.astype(np.float32), mx.T, axes=(1, 0)), axes=(1, 0))
        for r0 in range(0, self.height, self.block_rows):
            r1 = min(self.height, r0 + self.block_rows)
            block = np.tensordot(my[r0:r1], tmp, axes=(1, 0))
            total = np.maximum(block.sum(-1), 1e-6)
            out_cls, out_conf = label_and_confidence(block)
            out_conf = (out_conf / total).astype(np.float32)
            bad = nd[r0:r1] >= 0.5
            if self.valid is not None:
                bad |= ~self.valid[r0:r1]
            out_cls[bad] = NODATA_CLASS
            out_conf[bad] = 0.0
            self.inner.write(Window(0, r0, self.width, r1 - r0), out_cls, out_conf)
        return self.inner.close()


def segment_at_model_resolution(
    item: Item,
    model: LoadedModel,
    sink: MaskSink,
    *,
    ground_truth: np.ndarray | None = None,
    tolerance: float = 0.15,
) -> tuple[SemanticResult, float | None]:
    """:func:`pipelines.semantic.segment_item` at the model's ``ground_resolution_m``.

    When the spec has a ground resolution and the item's (:func:`ground_resolution_m`) differs by more
    than ``tolerance`` (relative), the item is resampled to it (:class:`ResampledItem`), segmented, and
    the result written into ``sink`` on the item's own grid (:class:`GridRestoringSink`) before this
    returns. As with ``segment_item``, the caller closes ``sink``.

    Returns ``(result, scale)``; ``scale`` is model pixels per input pixel (None = native grid used).
    Figures in ``result`` are counted on the model grid; areas are in true units either way.
    ``ground_truth`` ``(H, W)`` class ids on the input grid is resampled (nearest) for the figures.
    """
    spec: ModelSpec = model.spec
    target = spec.ground_resolution_m
    src = ground_resolution_m(item.info)
    if target is None or src is None or abs(src / target - 1.0) <= tolerance:
        return segment_item(item, model, sink, ground_truth=ground_truth), None
    scale = src / target
    h, w = _resampled_shape(item.info, scale)
    if h * w > _RESAMPLE_MAX_PIXELS:
        # A 300 m scene at a 0.5 m model's resolution is 600x larger per side: refuse it before allocating.
        raise AdapterError(
            f"{getattr(item, 'path', None) or 'item'}: ground resolution {src:.3g} m is {scale:.3g}x the "
            f"{target} m model {spec.name} was trained at; resampled to it, the "
            f"{item.info.width}x{item.info.height} raster would be {w}x{h} pixels (limit "
            f"{_RESAMPLE_MAX_PIXELS:,}). Use a model made for this resolution or a smaller extent"
        )
    view = ResampledItem(item, scale)
    h, w = view.info.height, view.info.width
    num_classes = max(c.id for c in spec.classes) + 1
    restoring = _FlushOnly(sink, (h, w), item.info.height, item.info.width, num_classes,
                           item.valid_mask(None))
    truth = None
    if ground_truth is not None:
        rows = np.minimum((np.arange(h) + 0.5) / scale, item.info.height - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) / scale, item.info.width - 1).astype(int)
        truth = ground_truth[np.ix_(rows, cols)]
    result = segment_item(view, model, restoring, ground_truth=truth)
    restoring.close()
    return result, scale


class _FlushOnly(GridRestoringSink):
    """Writes the restored blocks into ``inner`` but leaves closing ``inner`` to the caller."""

    def close(self) -> list[Artifact]:
        inner, self.inner = self.inner, _NoClose(self.inner)
        try:
            return super().close()
        finally:
            self.inner = inner


class _NoClose(MaskSink):
    def __init__(self, inner: MaskSink) -> None:
        self._inner = inner

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        self._inner.write(window, classes, confidence)

    def close(self) -> list[Artifact]:
        return []


# --------------------------------------------------------------------------------------------- readers


def _data_root(data_root: str | Path | None) -> Path:
    if data_root is not None:
        return Path(data_root)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_raster(path: Path) -> tuple[np.ndarray, object]:
    import rasterio

    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    try:
        with rasterio.open(path) as ds:
            return ds.read(masked=False), ds
    except rasterio.errors.RasterioError as e:
        raise AdapterError(f"{path.name}: cannot read raster: {e}") from e


def _stretch(pixels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``(C, H, W)`` raw -> ``(H, W, C) float32``: the runner's per-item percentile stretch."""
    stats = band_stats(pixels, BUILDINGS_NORM.low, BUILDINGS_NORM.high, valid)
    return normalize(pixels, BUILDINGS_NORM, stats)


def _binary_label(mask: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    label = (mask > 0).astype(np.uint8)
    if valid is not None:
        label[~valid] = IGNORE
    return label


def read_rio_tile(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tile of a folder laid out like SpaceNet 1 Rio: ``root/images/NAME.tif`` (RGB) and
    ``root/masks/NAME.tif`` (building > 0, same grid). Returns the image ``(3, H, W)``, the building mask
    ``(H, W) bool`` and the image footprint ``(H, W) bool`` (pixels black in all bands lie outside it)."""
    img, _ = _read_raster(root / "images" / f"{name}.tif")
    mask, _ = _read_raster(root / "masks" / f"{name}.tif")
    if img.shape[0] != 3 or mask.shape[1:] != img.shape[1:]:
        raise AdapterError(f"{root / name}: expected a 3-band image and a mask on the same grid")
    return img, mask[0] > 0, img.max(axis=0) > 0


def load_rio(root: Path, names: Sequence[str]) -> list[Sample]:
    """SpaceNet 1 Rio tiles (:func:`read_rio_tile`); pixels outside the footprint are ignored in the label."""
    out = []
    for name in names:
        img, mask, valid = read_rio_tile(root, name)
        out.append(Sample(name, "spacenet1_rio", _stretch(img, valid), _binary_label(mask, valid), 0.5))
    return out


def load_atlanta(root: Path) -> Sample:
    """SpaceNet 4 Atlanta panchromatic tile (uint16, 0.5 m), replicated to 3 channels as the runner does
    for a 1-band input to a 3-channel model."""
    img, _ = _read_raster(root / "image_pan.tif")
    mask, _ = _read_raster(root / "mask_buildings.tif")
    valid = img[0] > 0
    pan = np.repeat(img[:1], 3, axis=0)
    return Sample("atlanta_pan", "spacenet4_atlanta", _stretch(pan, valid), _binary_label(mask[0], valid), 0.5)


def load_quebec(root: Path, target_m: float = BUILDINGS_RES_M) -> list[Sample]:
    """NRCan Quebec RGB tiles (0.30 m and 0.15 m) resampled to ``target_m`` the way inference does
    (:func:`resample_pixels` on raw values, then the stretch); labels by area majority."""
    out = []
    for lbl in sorted((root / "labels").glob("tile_*.tif")):
        img, ds = _read_raster(root / "images" / lbl.name)
        mask, _ = _read_raster(lbl)
        res = abs(ds.transform.a)
        scale = res / target_m
        h, w = max(1, round(img.shape[1] * scale)), max(1, round(img.shape[2] * scale))
        small = resample_pixels(img, h, w)
        lab = resample_pixels((mask[:1] > 0).astype(np.float32), h, w)[0] >= 0.5
        out.append(Sample(f"quebec_{lbl.stem}", "nrcan_quebec", _stretch(small, None),
                          lab.astype(np.uint8), target_m))
    return out


def building_samples(split: str, data_root: str | Path | None = None) -> list[Sample]:
    """Samples of one split (``train``: Rio training tiles + Atlanta + Quebec; ``val`` / ``test``: Rio only)."""
    if split not in RIO_SPLIT:
        raise ValueError(f"split must be one of {sorted(RIO_SPLIT)}, got {split!r}")
    root = _data_root(data_root)
    out = load_rio(root / "spacenet1_rio_buildings", RIO_SPLIT[split])
    if split == "train":
        sat = root / "satellite_labeled"
        out.append(load_atlanta(sat / "spacenet4_atlanta_buildings"))
        out += load_quebec(sat / "nrcan_quebec_buildings")
    return out


def map_ct_labels(label: np.ndarray) -> np.ndarray:
    """TotalSegmentator ``total`` ids ``(H, W)`` -> :data:`CT_CLASSES` ids ``(H, W) uint8`` (others -> 0)."""
    lut = np.zeros(256, np.uint8)
    for cls, ids in CT_CLASSES:
        for i in ids:
            lut[i] = cls.id
    return lut[np.asarray(label, np.uint8)]


def read_ct_slice(root: Path, name: str) -> tuple[Item, np.ndarray]:
    """``(DICOM item via the adapter, label (512, 512) uint8 in CT_CLASSES ids)`` of one slice."""
    from PIL import Image

    from adapters.dicom import DicomFormat

    src = DicomFormat().open(str(root / "dicom_ct" / f"{name}.dcm"))
    item = next(iter(src.items()))
    label_path = root / "png" / "labels" / f"{name}.png"
    if not label_path.is_file():
        raise AdapterError(f"{label_path}: no such label file")
    label = map_ct_labels(np.asarray(Image.open(label_path)))
    if label.shape != (item.info.height, item.info.width):
        raise AdapterError(f"{label_path.name}: label {label.shape} does not match the DICOM grid")
    return item, label


def ct_samples(split: str, size: int = 256, data_root: str | Path | None = None) -> list[Sample]:
    """CT slices of one split, HU-windowed (:data:`CT_NORM`) and resized to ``size`` exactly as the runner's
    ``resize`` mode does (bilinear, no antialiasing); labels by nearest neighbour. Image ``(size, size, 1)``."""
    if split not in CT_SPLIT:
        raise ValueError(f"split must be one of {sorted(CT_SPLIT)}, got {split!r}")
    root = _data_root(data_root) / "medical_ct_totalsegmentator"
    out = []
    for name in CT_SPLIT[split]:
        item, label = read_ct_slice(root, name)
        x = resize_bilinear(normalize(item.read(None), CT_NORM), size, size)
        h, w = label.shape
        rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
        cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
        out.append(Sample(name, "totalsegmentator_ct", x, label[np.ix_(rows, cols)], None))
    return out


# --------------------------------------------------------------------------------------------- specs


def buildings_spec(input_size: int = 256, overlap: int = 32) -> ModelSpec:
    return ModelSpec(
        name="buildings-rgb", kind="semantic", source="model.keras",
        description="U-Net (Keras 3) for building footprints on RGB (or panchromatic) imagery at 0.5 m; "
                    "demonstration grade, trained on 11 small SpaceNet/NRCan tiles",
        classes=BUILDING_CLASSES, background_class=0, channels=3, normalization=BUILDINGS_NORM,
        input_size=input_size, mode="tile", overlap=overlap, batch_size=8, blend="gaussian",
        ground_resolution_m=BUILDINGS_RES_M, default_for=["geotiff"], truth_map=BUILDING_TRUTH,
    )


def ct_spec(input_size: int = 256) -> ModelSpec:
    return ModelSpec(
        name="ct-organs", kind="semantic", source="model.keras",
        description="U-Net (Keras 3) for liver, spleen, stomach, aorta and vertebra on axial CT slices "
                    "(HU window 40/400); demonstration grade, trained on 14 slices of one scan with "
                    "TotalSegmentator pseudo-labels",
        classes=[c for c, _ in CT_CLASSES], background_class=0, channels=1, normalization=CT_NORM,
        input_size=input_size, mode="resize", overlap=0, batch_size=8, blend="gaussian",
        # Trained on slices halved by resize_bilinear (ct_samples); the antialiased filter costs 1 point of
        # mean IoU on the held-out slices, most of it on the vertebra and the aorta.
        resize_filter="bilinear", default_for=["dicom"], truth_map=CT_TRUTH,
    )


# --------------------------------------------------------------------------------------------- training


@dataclass
class DomainTrainConfig:
    """A domain training run (written to ``OUT/config.json``)."""

    out: str
    crop: int = 128
    epochs: int = 30
    steps_per_epoch: int = 16
    batch_size: int = 8
    base_filters: int = 16
    depth: int = 3
    #: ``batch`` learned much faster here than ``group`` (measured: GroupNorm runs plateaued at train mean
    #: IoU 0.30 (CT) / 0.47 (buildings) where BatchNorm passed 0.46 / 0.6). BatchNorm's moving averages
    #: need a few hundred steps to settle, so keep epochs x steps_per_epoch >= ~400.
    norm: str = "batch"
    dropout: float = 0.1
    learning_rate: float = 2e-3
    warmup_epochs: int = 2
    dice_weight: float = 1.0
    patience: int = 1000
    seed: int = 0
    #: Satellite views have no "up": rotate by multiples of 90 degrees and flip. CT anatomy has a side.
    rotate: bool = True
    #: Probability of turning an RGB crop grey (so the model also reads panchromatic inputs).
    grey_prob: float = 0.0
    #: Random shift (pixels) for full-image crops (CT).
    max_shift: int = 0
    class_names: list[str] = field(default_factory=lambda: ["background", "building"])
    #: Start from these weights (a ``.keras`` file of the same architecture), e.g. to continue a run.
    init_from: str | None = None


def _crop_batch(samples: Sequence[Sample], cfg: DomainTrainConfig, rng: np.random.Generator):
    """One augmented batch: ``(B, crop, crop, C) float32`` and ``(B, crop, crop, 1) uint8``."""
    areas = np.array([s.label.size for s in samples], np.float64)
    picks = rng.choice(len(samples), size=cfg.batch_size, p=areas / areas.sum())
    xs, ys = [], []
    c = cfg.crop
    for i in picks:
        s = samples[i]
        img, lab = s.image, s.label
        h, w = lab.shape
        if h < c or w < c or cfg.max_shift:
            pad = max(c - h, c - w, 0) + cfg.max_shift
            img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
            lab = np.pad(lab, ((pad, pad), (pad, pad)), constant_values=IGNORE if not cfg.max_shift else 0)
            h, w = lab.shape
        for _ in range(10):  # prefer crops with some labeled pixels
            r, q = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            if (lab[r : r + c, q : q + c] != IGNORE).mean() > 0.5:
                break
        x, y = img[r : r + c, q : q + c].copy(), lab[r : r + c, q : q + c].copy()
        if cfg.rotate:
            k = int(rng.integers(0, 4))
            x, y = np.rot90(x, k), np.rot90(y, k)
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
        if cfg.grey_prob and rng.random() < cfg.grey_prob:
            x = np.repeat(x.mean(axis=-1, keepdims=True), x.shape[-1], axis=-1)
        # Brightness/contrast jitter around the stretch: sensors and windows never match exactly.
        gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08)
        x = np.clip((x - 0.5) * gain + 0.5 + bias, 0.0, 1.0)
        xs.append(x)
        ys.append(y)
    return np.stack(xs).astype(np.float32), np.stack(ys)[..., None].astype(np.uint8)


def _val_arrays(samples: Sequence[Sample], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``crop`` tiles covering each validation sample (edges padded with IGNORE)."""
    xs, ys = [], []
    for s in samples:
        h, w = s.label.shape
        ph, pw = -h % crop, -w % crop
        img = np.pad(s.image, ((0, ph), (0, pw), (0, 0)))
        lab = np.pad(s.label, ((0, ph), (0, pw)), constant_values=IGNORE)
        for r in range(0, h + ph, crop):
            for c in range(0, w + pw, crop):
                xs.append(img[r : r + crop, c : c + crop])
                ys.append(lab[r : r + crop, c : c + crop])
    return np.stack(xs).astype(np.float32), np.stack(ys)[..., None].astype(np.uint8)


def train_domain(train: Sequence[Sample], val: Sequence[Sample], cfg: DomainTrainConfig) -> Path:
    """Train a U-Net on in-memory samples; returns ``OUT/best.keras`` (best validation mean IoU).

    Uses :func:`pipelines.unet.build_unet` and the loss, metrics, checkpoint/CSV/TensorBoard/early-stop
    callbacks and training-curve plot of :mod:`pipelines.train`. Writes ``config.json``, ``split.json``,
    ``history.csv``, ``best.keras``, ``last.keras``, ``training_curve.png`` into ``cfg.out``.
    """
    import keras

    from pipelines import train as tr
    from pipelines.unet import UNetConfig, build_unet

    if not train or not val:
        raise AdapterError("need both training and validation samples")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "state.json").exists():
        raise FileExistsError(f"{out} already holds a training run; use another --out")
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    (out / "split.json").write_text(json.dumps(
        {"train": [s.name for s in train], "val": [s.name for s in val]}, indent=1))
    keras.utils.set_random_seed(cfg.seed)
    channels = train[0].image.shape[-1]
    tcfg = tr.TrainConfig(
        data="", out=str(out), epochs=cfg.epochs, size=cfg.crop, base_filters=cfg.base_filters,
        depth=cfg.depth, norm=cfg.norm, dropout=cfg.dropout, batch_size=cfg.batch_size, seed=cfg.seed,
        learning_rate=cfg.learning_rate, warmup_epochs=cfg.warmup_epochs, dice_weight=cfg.dice_weight,
        patience=cfg.patience, class_names=list(cfg.class_names),
    )
    model = build_unet(UNetConfig(input_size=cfg.crop, channels=channels, num_classes=len(cfg.class_names),
                                  base_filters=cfg.base_filters, depth=cfg.depth, norm=cfg.norm,
                                  dropout=cfg.dropout))
    if cfg.init_from:
        model.set_weights(keras.saving.load_model(cfg.init_from, compile=False).get_weights())
    tr._compile(model, tcfg)
    rng = np.random.default_rng(cfg.seed)

    class _Batches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return cfg.steps_per_epoch

        def __getitem__(self, idx: int):
            return _crop_batch(train, cfg, rng)

    vx, vy = _val_arrays(val, cfg.crop)
    t0 = time.time()
    state: dict = {}
    model.fit(_Batches(), validation_data=(vx, vy), validation_batch_size=cfg.batch_size, epochs=cfg.epochs,
              callbacks=tr._make_callbacks(tcfg, out, state), verbose=0)
    state["train_seconds"] = round(time.time() - t0, 1)
    (out / "state.json").write_text(json.dumps(state, indent=2))
    tr.write_training_curve(out / "history.csv", out / "training_curve.png")
    return out / "best.keras"


def export(checkpoint: str | Path, spec: ModelSpec, export_dir: str | Path) -> ModelSpec:
    """Write ``model.keras`` (fully convolutional copy: any input size divisible by ``2**depth``, no
    optimizer) and ``spec.json`` into ``export_dir``; returns the spec loaded back from disk."""
    import keras

    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = keras.saving.load_model(checkpoint, compile=False)
    inp = trained.inputs[0].shape
    convs = [ly for ly in trained.layers if ly.name.endswith("_conv1") and ly.name.startswith("enc")]
    from pipelines.unet import UNetConfig, build_unet

    names = {ly.name for ly in trained.layers}
    norm = "batch" if "enc0_1_bn" in names else "group" if "enc0_1_gn" in names else "none"
    cfg = UNetConfig(input_size=spec.input_size, channels=int(inp[-1]), num_classes=len(spec.classes),
                     base_filters=int(convs[0].filters), depth=len(convs), norm=norm, dropout=0.0)
    model = build_unet(cfg)
    # Same layer names and weight shapes; dropout layers carry no weights.
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(trained.get_layer(layer.name).get_weights())
    model.save(out / "model.keras")
    spec.to_file(out / "spec.json")
    return ModelSpec.from_file(out / "spec.json")


# --------------------------------------------------------------------------------------------- evaluation


def _evaluate_each(image_names: Sequence[str], class_names: Sequence[str],
                   score_one: Callable[[str], SemanticResult]) -> dict:
    """Scores summed over the images ``score_one`` segments, with per-image Dice/IoU and ``errors``
    (``[{"name", "error"}]``) for those that could not be read: one bad file costs its own image only.
    Raises :class:`AdapterError` when none could."""
    from pipelines.metrics import scores

    k = len(class_names)
    total = np.zeros((k, k), np.int64)
    per_image: dict[str, dict] = {}
    errors: list[dict[str, str]] = []
    for name in image_names:
        try:
            res = score_one(name)
        except (AdapterError, OSError) as e:
            log.warning("%s: not scored (%s)", name, e)
            errors.append({"name": name, "error": str(e)})
            continue
        total += res.confusion
        per_image[name] = {f.name: {"dice": f.dice, "iou": f.iou} for f in res.figures}
    if errors and not per_image:
        raise AdapterError(f"none of the {len(errors)} images could be scored; the first: {errors[0]['error']}")
    s = scores(total)
    for c in s["per_class"]:
        c["name"] = class_names[c["class_id"]]
    return {**s, "confusion": total.tolist(), "images": len(per_image), "per_image": per_image, "errors": errors}


def evaluate_buildings(model_dir: str | Path, names: Sequence[str] = RIO_SPLIT["test"],
                       data_root: str | Path | None = None, *, folder: str | Path | None = None) -> dict:
    """Per-class Dice/IoU of a buildings model on whole Rio tiles, read through the GeoTIFF adapter and
    segmented by the service's runner (tiles, blending, resampling to the model's resolution).

    ``folder``: a folder laid out like ``spacenet1_rio_buildings`` (``images/NAME.tif``, ``masks/NAME.tif``
    0/255 on the same grid); default the shared data's."""
    from adapters.geotiff import GeoTiffFormat
    from pipelines import registry

    model = registry.load(registry.get_spec(str(model_dir)))
    root = Path(folder) if folder is not None else _data_root(data_root) / "spacenet1_rio_buildings"

    def score_one(name: str) -> SemanticResult:
        mask, _ = _read_raster(root / "masks" / f"{name}.tif")
        src = GeoTiffFormat().open(str(root / "images" / f"{name}.tif"))
        try:
            item = next(iter(src.items()))
            img = item.read(None)
            truth = (mask[0] > 0).astype(np.uint8)
            truth[img.max(axis=0) == 0] = IGNORE
            res, _scale = segment_at_model_resolution(item, model, ArraySink(item.info.height, item.info.width),
                                                      ground_truth=truth)
        finally:
            src.close()
        return res

    return _evaluate_each(names, model.spec.class_names, score_one)


def evaluate_ct(model_dir: str | Path, names: Sequence[str] = CT_SPLIT["test"],
                data_root: str | Path | None = None, *, folder: str | Path | None = None) -> dict:
    """Per-class Dice/IoU of a CT model on whole 512x512 slices read through the DICOM adapter.

    ``folder``: laid out like ``medical_ct_totalsegmentator`` (``dicom_ct/NAME.dcm``,
    ``png/labels/NAME.png`` TotalSegmentator ids); default the shared data's."""
    from pipelines import registry

    model = registry.load(registry.get_spec(str(model_dir)))
    root = Path(folder) if folder is not None else _data_root(data_root) / "medical_ct_totalsegmentator"

    def score_one(name: str) -> SemanticResult:
        item, label = read_ct_slice(root, name)
        return segment_item(item, model, ArraySink(item.info.height, item.info.width), ground_truth=label)

    return _evaluate_each(names, model.spec.class_names, score_one)
