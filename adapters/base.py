"""The one small protocol every format adapter follows.

Data flows one way: an adapter opens an input (:class:`Source`), lists its :class:`Item` s (one image,
slice, frame or raster), reads pixel windows from them, and later writes the pipeline's outputs next to
them (:class:`MaskSink`). Adapters know nothing of the database, the queue or HTTP.

Adding a format means adding one module that defines a :class:`Format` and registering it in
``adapters/__init__.py``; nothing else changes.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

__all__ = [
    "AdapterError",
    "Artifact",
    "Format",
    "InputTooLarge",
    "Item",
    "ItemInfo",
    "MaskSink",
    "RegionItem",
    "Source",
    "UnsupportedInput",
    "Window",
    "full_window",
    "page_key",
    "page_number",
    "part_key",
    "safe_stem",
    "split_key",
]

#: Largest image we agree to open, in pixels (width * height). Checked on the *declared* size before any
#: pixel buffer is allocated, so decompression bombs fail fast. Rasters larger than this are still fine
#: when they are read window by window (see ``Item.streamable``).
DEFAULT_MAX_PIXELS = 40_000 * 40_000


#: Longest output file-name stem, in UTF-8 bytes: suffixes such as ``_confidence.partial.tif`` must still fit
#: the 255-byte name limit of common file systems.
MAX_STEM_BYTES = 120

_UNSAFE_NAME = re.compile(r"[^\w.-]+")


def safe_stem(name: str, default: str = "item") -> str:
    """``name`` made safe as a file-name stem for outputs: runs of anything but letters, digits (any script),
    ``_``, ``.`` and ``-`` become ``_`` (no separators, spaces, quotes or control characters, so the name
    also travels in a Content-Disposition header), and names longer than :data:`MAX_STEM_BYTES` are cut and
    end in a hash of the whole name."""
    stem = _UNSAFE_NAME.sub("_", name).strip("._") or default
    raw = stem.encode()
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    import hashlib

    digest = hashlib.sha1(raw).hexdigest()[:10]
    return raw[: MAX_STEM_BYTES - 11].decode(errors="ignore") + "-" + digest


class AdapterError(Exception):
    """An input cannot be read. The message is stored on the item and shown to the user."""


def _guarded(method: Any, what: str) -> Any:
    """Wrap an adapter method so that anything a decoder raises on hostile bytes (TypeError, KeyError,
    struct.error, GDAL/pydicom errors ...) surfaces as :class:`AdapterError` naming the input. The contract
    holds for every adapter, present or future, without each one catching every library's exceptions."""
    import functools

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (AdapterError, MemoryError, KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            raise_as_adapter_error(self, args, what)

    wrapper.__tileseg_guarded__ = True
    return wrapper


def raise_as_adapter_error(obj: Any, args: tuple, what: str) -> None:
    import os
    import sys

    exc = sys.exc_info()[1]
    name = getattr(obj, "path", None) or (args[0] if args and isinstance(args[0], str) else None)
    label = os.path.basename(str(name).rstrip("/")) if name else type(obj).__name__
    key = getattr(obj, "key", "")
    if key:
        label = f"{label} [{key}]"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    raise AdapterError(f"{label}: cannot be read ({type(exc).__name__}: {first})") from exc


def _guard_methods(cls: type, names: tuple[str, ...]) -> None:
    for name in names:
        method = cls.__dict__.get(name)
        if method is not None and callable(method) and not getattr(method, "__tileseg_guarded__", False):
            setattr(cls, name, _guarded(method, name))


class UnsupportedInput(AdapterError):
    """No adapter recognises the file (wrong format, empty file, not an image)."""


class InputTooLarge(AdapterError):
    """Declared dimensions exceed the configured limit (decompression bomb guard)."""


@dataclass
class ItemInfo:
    """What we know about one item before reading its pixels.

    ``transform`` is the GDAL/affine 6-tuple ``(a, b, c, d, e, f)`` mapping (col, row) to map coordinates,
    ``crs_wkt`` the CRS as WKT (any CRS, EPSG code or not). ``pixel_area`` is the physical area of one
    pixel in ``area_unit`` (``"m2"`` for projected rasters, ``"mm2"`` for DICOM with PixelSpacing);
    both are ``None`` when the input has no physical scale.
    """

    height: int
    width: int
    bands: int
    dtype: str
    modality: str
    crs_wkt: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    pixel_area: float | None = None
    area_unit: str | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict for the items table."""
        return {
            "height": self.height,
            "width": self.width,
            "bands": self.bands,
            "dtype": self.dtype,
            "modality": self.modality,
            "crs_wkt": self.crs_wkt,
            "transform": list(self.transform) if self.transform else None,
            "pixel_area": self.pixel_area,
            "area_unit": self.area_unit,
            "warnings": list(self.warnings),
            **self.extra,
        }


@dataclass(frozen=True)
class Artifact:
    """One output file written by a sink, before the store uploads it.

    ``kind`` names what it is (``class_raster``, ``confidence``, ``mask_png``, ``overlay``, ``geojson``,
    ``gpkg``, ``dicom_seg``, ``coco_json``, ``instance_raster``), ``path`` is the local file.
    """

    kind: str
    path: Path
    media_type: str


class Item(abc.ABC):
    """One image, slice, frame or raster inside a :class:`Source`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls, ("read", "valid_mask", "preview", "read_labels"))

    #: Stable key within its source ("" for single-image files, e.g. "frame-0003" for frames).
    key: str
    #: Items sharing a group are finalised together (a DICOM series -> one DICOM SEG).
    group: str | None = None
    info: ItemInfo
    #: True when the adapter can read arbitrary windows without decoding the whole image (tiled GeoTIFF).
    streamable: bool = False

    @abc.abstractmethod
    def read(self, window: Window | None = None) -> np.ndarray:
        """Pixels of ``window`` (whole item if None) as ``(C, H, W)``.

        Values are in the input's physical units: raw DNs for rasters, Hounsfield units (float32) for CT
        after the Modality LUT, uint8 RGB for photos. Model normalisation happens in the pipeline.
        """

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        """``(H, W) bool``, False where the input has no data (nodata, internal masks); None if all valid."""
        return None

    def read_labels(self, window: Window | None = None) -> np.ndarray:
        """``(h, w)`` integer values of ``window`` (whole item if None) read as a label image (ground truth):
        its first band as stored, not converted for display. Raises :class:`AdapterError` for non-integer
        values."""
        arr = np.asarray(self.read(window)[0])
        if arr.dtype.kind == "f":
            if not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
                raise AdapterError("label image holds values that are not integers; ground truth must hold "
                                   "class values")
            arr = arr.astype(np.int64)
        return arr

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """``(H, W, 3) uint8`` display image for overlays, at most ``max_size`` on its longer side."""
        raise AdapterError(f"{type(self).__name__}: no preview for this kind of item")


class Source(abc.ABC):
    """An opened input: a file, a folder (DICOM series) or an object-store URL."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls, ("items", "item"))

    path: str
    format: str

    @abc.abstractmethod
    def items(self) -> Iterator[Item]:
        """Every item of the input, in a stable order."""

    def item(self, key: str) -> Item:
        """The item with ``key`` (raises :class:`AdapterError` if absent)."""
        for it in self.items():
            if it.key == key:
                return it
        raise AdapterError(f"{self.path}: no item {key!r}")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MaskSink(abc.ABC):
    """Receives finished blocks of a semantic prediction and writes the item's outputs.

    The tiled engine calls :meth:`write` once per finished block (in any order, never overlapping), so a
    sink never holds the whole mask unless it wants to (small photos do; GeoTIFFs stream to disk).
    """

    @abc.abstractmethod
    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        """``classes`` ``(h, w) uint8`` class ids and ``confidence`` ``(h, w) float32`` in [0, 1]."""

    @abc.abstractmethod
    def close(self) -> list[Artifact]:
        """Flush and finalise; returns the artifacts written."""


class Format(abc.ABC):
    """One input/output format: recognises files, opens them, and creates sinks for their outputs.

    ``sniff``, ``open`` and every :class:`Item`'s ``read``/``valid_mask``/``preview`` are wrapped so that
    any exception other than :class:`AdapterError` becomes one naming the input (hostile files must never
    raise anything else). ``sniff`` returning an error means "not mine".
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls, ("open",))
        sniff = cls.__dict__.get("sniff")
        if sniff is not None and not getattr(sniff, "__tileseg_guarded__", False):
            import functools

            @functools.wraps(sniff)
            def safe_sniff(self: Any, path: str, head: bytes, _sniff: Any = sniff) -> bool:
                try:
                    return bool(_sniff(self, path, head))
                except Exception:  # noqa: BLE001 - a file that breaks a sniffer is simply not this format
                    return False

            safe_sniff.__tileseg_guarded__ = True
            cls.sniff = safe_sniff

    name: str

    @abc.abstractmethod
    def sniff(self, path: str, head: bytes) -> bool:
        """True if this format reads ``path`` whose first bytes are ``head`` (no full read)."""

    @abc.abstractmethod
    def open(self, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
        """Open ``path``; raises :class:`AdapterError` with a clear message for bad input."""

    @abc.abstractmethod
    def semantic_sink(
        self, item: Item, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
    ) -> MaskSink:
        """A sink writing this format's semantic outputs for ``item`` into ``out_dir``."""

    def finalize_group(
        self,
        items: Sequence[Item],
        mask_files: Sequence[Path],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """Outputs spanning a group of items, e.g. one DICOM SEG per series.

        ``mask_files[i]`` is the class-mask artifact this format's sink wrote for ``items[i]``.
        Default: nothing to add.
        """
        return []

    def write_instances(
        self,
        item: Item,
        instances: Sequence[Any],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """Instance outputs for ``item`` (``pipelines.instances.Instance`` objects in item pixel coordinates)."""
        raise AdapterError(f"format {self.name} cannot write instance outputs")


def full_window(info: ItemInfo) -> Window:
    """The window covering the whole item."""
    return Window(0, 0, info.width, info.height)


class RegionItem(Item):
    """Rows ``[start, stop)`` of a streamable item, as an item of its own (one part of a raster split over
    several tasks). Windows are in part coordinates; the transform is shifted so outputs written for the
    part are georeferenced where the rows lie in the source."""

    def __init__(self, base: Item, start: int, stop: int) -> None:
        if not 0 <= start < stop <= base.info.height:
            raise ValueError(f"rows {start}:{stop} outside an item of height {base.info.height}")
        self.base, self.start, self.stop = base, start, stop
        self.key = f"{base.key}@rows={start}:{stop}"
        self.group = base.group
        self.streamable = True
        info = base.info
        transform = info.transform
        if transform is not None:
            a, b, c, d, e, f = transform
            transform = (a, b, c + b * start, d, e, f + e * start)
        self.info = ItemInfo(height=stop - start, width=info.width, bands=info.bands, dtype=info.dtype,
                             modality=info.modality, crs_wkt=info.crs_wkt, transform=transform,
                             pixel_area=info.pixel_area, area_unit=info.area_unit, warnings=list(info.warnings),
                             extra={**info.extra, "part_rows": [start, stop], "source_height": info.height})
        self.path = getattr(base, "path", None)

    def _shift(self, window: Window | None) -> Window:
        if window is None:
            return Window(0, self.start, self.info.width, self.info.height)
        return Window(window.col_off, window.row_off + self.start, window.width, window.height)

    def read(self, window: Window | None = None) -> np.ndarray:
        return self.base.read(self._shift(window))

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        return self.base.valid_mask(self._shift(window))


def split_key(key: str) -> tuple[str, tuple[int, int] | None]:
    """``"key@rows=a:b"`` -> ``("key", (a, b))``; keys without a row range -> ``(key, None)``."""
    base, sep, rng = key.rpartition("@rows=")
    if not sep:
        return key, None
    start, _, stop = rng.partition(":")
    return base, (int(start), int(stop))


def part_key(key: str, start: int, stop: int) -> str:
    return f"{key}@rows={start}:{stop}"


def page_key(n: int) -> str:
    """Key of page ``n`` (0-based) of a multi-page file: ``page-0003``."""
    return f"page-{n:04d}"


def page_number(key: str, pages: int) -> int | None:
    """The page a :func:`page_key` names, or None when ``key`` is not one of ``pages`` pages."""
    m = re.fullmatch(r"page-(\d+)", key)
    return int(m.group(1)) if m and int(m.group(1)) < pages else None
