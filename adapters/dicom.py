"""DICOM adapter: single slices, series folders and multi-frame files in; PNG masks and DICOM SEG out.

Reading is lazy: :meth:`DicomFormat.open` parses headers only (pixel data deferred) and every
:meth:`DicomItem.read` decodes one frame. Values come back after the Modality LUT (Hounsfield units for CT),
with MONOCHROME1 inverted so that brighter always means more signal.

Outputs: each item gets a palette PNG class mask and an overlay PNG (:class:`DicomMaskSink`); each group
(a series, a multi-frame file, or a lone slice) gets one DICOM SEG written with highdicom
(:meth:`DicomFormat.finalize_group`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import re
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as _pixel_array
from pydicom.sr.codedict import codes
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from adapters.base import (
    DEFAULT_MAX_PIXELS,
    AdapterError,
    Artifact,
    Format,
    InputTooLarge,
    Item,
    ItemInfo,
    MaskSink,
    Source,
    Window,
    safe_stem,
)
from adapters.photo import blend_overlay, palette_bytes

__all__ = ["DICOM_MEDIA_TYPE", "DicomFormat", "DicomItem", "DicomMaskSink", "DicomSource", "SegLabels",
           "segmentation_labels"]

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
#: Nodata value in class-mask PNGs (pixels no block was written to).
NODATA = 255
#: A folder holding more files than this is refused rather than scanned for minutes.
MAX_FOLDER_FILES = 20_000
#: Files sniffed when deciding whether a folder is a DICOM series.
_SNIFF_FILES = 64
#: Default display window (soft tissue, HU) when a CT carries no VOI tags.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
_OVERLAY_ALPHA = 0.45
_SOFTWARE = "tileseg 0.1.0"


# --------------------------------------------------------------------------------------------------- headers


def _is_dicom_magic(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _read_header(path: Path) -> Dataset:
    """Header of ``path`` with pixel data deferred (read lazily, never decoded here).

    Raises :class:`AdapterError` ``"not a DICOM file"`` for anything pydicom cannot make sense of.
    """
    name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:
                head = f.read(132)
            if _is_dicom_magic(head):
                ds = pydicom.dcmread(path, defer_size=1024)
            else:
                # No preamble: accept only if a forced read finds a real image object.
                ds = pydicom.dcmread(path, defer_size=1024, force=True)
                if "SOPClassUID" not in ds and "PixelData" not in ds:
                    raise AdapterError(f"{name}: not a DICOM file")
    except AdapterError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AdapterError(f"{name}: not a DICOM file or corrupt header ({exc})") from exc
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        # Files without meta (rare) are implicit VR little endian by the standard's default.
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID attribute, "" when absent or blank (de-identified data often blanks them)."""
    v = ds.get(keyword)
    return str(v).strip() if v else ""


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(x) for x in out) else None


def _shared_group(ds: Dataset, seq: str, keyword: str) -> Any:
    """``keyword`` from the enhanced multi-frame shared functional groups, if any."""
    try:
        return getattr(ds.SharedFunctionalGroupsSequence[0][seq][0], keyword)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _frame_group(ds: Dataset, frame: int, seq: str, keyword: str) -> Any:
    try:
        return getattr(ds.PerFrameFunctionalGroupsSequence[frame][seq][0], keyword)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    v = ds.get("ImageOrientationPatient") or _shared_group(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    return _floats(v, 6) if v is not None else None


def _position(ds: Dataset, frame: int | None) -> tuple[float, ...] | None:
    v = None
    if frame is not None:
        v = _frame_group(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    if v is None:
        v = ds.get("ImagePositionPatient")
    return _floats(v, 3) if v is not None else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, from PixelSpacing (patient plane) only."""
    v = ds.get("PixelSpacing") or _shared_group(ds, "PixelMeasuresSequence", "PixelSpacing")
    sp = _floats(v, 2) if v is not None else None
    return (sp[0], sp[1]) if sp and sp[0] > 0 and sp[1] > 0 else None


def _normal(orientation: tuple[float, ...] | None) -> np.ndarray | None:
    if orientation is None:
        return None
    n = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None and str(v).strip() != "" else None
    except (TypeError, ValueError):
        return None


#: Modalities of DICOM objects that are not images to segment, though a SEG carries pixel data.
_NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO", "REG")
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _non_image_object(ds: Dataset) -> str | None:
    """The modality of a non-image object (a segmentation, structure set, report...), else None."""
    modality = str(ds.get("Modality", "")).upper()
    sop_class = _uid(ds, "SOPClassUID") or _uid(ds.file_meta, "MediaStorageSOPClassUID")
    if modality in _NON_IMAGE_MODALITIES:
        return modality
    if sop_class == _SEGMENTATION_STORAGE:
        return "SEG"
    return None


def _check_image(ds: Dataset, name: str, max_pixels: int) -> None:
    """Raise for headers we cannot decode: no pixel data, bad geometry, bomb, truncated native data."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise AdapterError(f"{name}: float pixel data is not supported")
        raise AdapterError(
            f"{name}: no pixel data (not an image object, e.g. a report or structure set, or the file is truncated)"
        )
    rows, cols = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    if not rows or not cols:
        raise AdapterError(f"{name}: missing or zero Rows/Columns")
    frames = _n_frames(ds)
    if rows * cols * frames > max_pixels:
        raise InputTooLarge(
            f"{name}: declared size {rows} x {cols} x {frames} frames = {rows * cols * frames} pixels "
            f"exceeds the limit of {max_pixels}"
        )
    spp = _int_or_none(ds.get("SamplesPerPixel")) or 1
    if spp not in (1, 3):
        raise AdapterError(f"{name}: SamplesPerPixel {spp} is not supported (1 or 3)")
    ts = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(ts) if ts.is_transfer_syntax else None
    except (NotImplementedError, KeyError, ValueError):
        decoder = None  # pydicom has no decoder at all for this syntax (e.g. MPEG, HTJ2K variants)
    if decoder is None or not decoder.is_available:
        label = ts.name if ts.is_transfer_syntax else "unknown"
        raise AdapterError(
            f"{name}: transfer syntax {label} ({ts}) cannot be decoded by the installed handlers"
            + (f": {_missing_plugins(decoder)}" if decoder is not None else "")
        )
    raw = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    filename = getattr(ds, "filename", None)
    # Offsets in a deflated file refer to the inflated stream, so the file size says nothing there.
    deflated = ts == DeflatedExplicitVRLittleEndian
    if length is not None and length != 0xFFFFFFFF and tell is not None and isinstance(filename, str) and not deflated:
        size = os.path.getsize(filename)
        if tell + length > size:
            raise AdapterError(
                f"{name}: truncated file: pixel data declares {length} bytes but the file ends after {size - tell}"
            )
    if not ts.is_compressed and not deflated and length not in (None, 0xFFFFFFFF):
        bits = _int_or_none(ds.get("BitsAllocated")) or 8
        # YBR_FULL_422 stores two chroma samples per pair of pixels: 2 values per pixel, not 3.
        per_pixel = 2 if spp == 3 and str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422" else spp
        expected = rows * cols * frames * per_pixel * bits // 8
        if length < expected:
            raise AdapterError(f"{name}: truncated pixel data: {length} bytes, {expected} expected")


def _missing_plugins(decoder: Any) -> str:
    try:
        missing = decoder.missing_dependencies
    except Exception:  # noqa: BLE001 - message only
        return "no decoder plugin available"
    return "; ".join(missing) if missing else "no decoder plugin available"


# ------------------------------------------------------------------------------------------------ pixel maths


def _rescale(ds: Dataset, frame: int | None) -> tuple[float, float] | None:
    """(slope, intercept) for this frame, from the top level or the enhanced functional groups."""
    slope, inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and frame is not None:
        slope = _frame_group(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _frame_group(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope = _shared_group(ds, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _shared_group(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        return None
    return float(slope), float(inter or 0.0)


def _modality_values(stored: np.ndarray, ds: Dataset, frame: int | None) -> np.ndarray:
    """Stored values -> modality units (HU for CT), float32, same shape."""
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    rs = _rescale(ds, frame)
    out = stored.astype(np.float32)
    if rs is not None:
        out = out * np.float32(rs[0]) + np.float32(rs[1])
    return out


def _modality_range(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """The range the Modality LUT can output, from the stored bit depth (not from the data)."""
    if "ModalityLUTSequence" in ds:
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = _int_or_none(ds.get("BitsStored")) or _int_or_none(ds.get("BitsAllocated")) or 16
    if (_int_or_none(ds.get("PixelRepresentation")) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0**bits - 1
    rs = _rescale(ds, frame)
    if rs is not None:
        lo, hi = sorted((lo * rs[0] + rs[1], hi * rs[0] + rs[1]))
    return lo, hi


def _voi_unit(values: np.ndarray, ds: Dataset, modality: str) -> np.ndarray:
    """Modality values -> display values in [0, 1] using the header's VOI (LUT or window), else a default.

    The default is the soft-tissue window for CT and a 1-99 percentile stretch otherwise.
    """
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    center = width = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = ds.WindowCenter, ds.WindowWidth
        c = c[0] if isinstance(c, pydicom.multival.MultiValue) else c
        w = w[0] if isinstance(w, pydicom.multival.MultiValue) else w
        try:
            center, width = float(c), float(w)
        except (TypeError, ValueError):
            center = width = None
    func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    v = values.astype(np.float32)
    if center is not None and width is not None and width > 0:
        # PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT and SIGMOID, mapped to [0, 1] rather than to the bit range.
        if func == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))).astype(np.float32)
        if func == "LINEAR_EXACT" or width <= 1:
            return np.clip((v - center) / width + 0.5, 0.0, 1.0)
        return np.clip((v - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if modality == "CT":
        c, w = SOFT_TISSUE_WINDOW
        return np.clip((v - (c - w / 2)) / w, 0.0, 1.0)
    lo, hi = (np.percentile(v, [1, 99]) if v.size else (0.0, 1.0))
    return np.clip((v - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def _to_display_size(rgb: np.ndarray, max_size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_size:
        return rgb
    s = max_size / max(h, w)
    img = Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------------- items


class _FrameCache:
    """Last few decoded frames of a source: the engine reads several windows per slice in a row."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._data: OrderedDict[tuple[str, int | None], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int | None]) -> np.ndarray | None:
        with self._lock:
            arr = self._data.get(key)
            if arr is not None:
                self._data.move_to_end(key)
            return arr

    def put(self, key: tuple[str, int | None], arr: np.ndarray) -> None:
        with self._lock:
            self._data[key] = arr
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


class DicomItem(Item):
    """One slice (a single-frame file) or one frame of a multi-frame file.

    ``dataset`` is the file's header (pixel data deferred); ``path`` the file; ``frame`` the 0-based frame
    index for multi-frame files, None for single-frame files.
    """

    streamable = False

    def __init__(
        self,
        key: str,
        group: str | None,
        info: ItemInfo,
        path: Path,
        frame: int | None,
        dataset: Dataset,
        cache: _FrameCache,
    ) -> None:
        self.key = key
        self.group = group
        self.info = info
        self.path = path
        self.frame = frame
        self.dataset = dataset
        self._cache = cache

    # Decoding ----------------------------------------------------------------------------------------

    def _stored(self) -> np.ndarray:
        """Decoded stored values of this frame, ``(H, W)`` or ``(H, W, 3)`` (colour converted to RGB)."""
        ck = (str(self.path), self.frame)
        cached = self._cache.get(ck)
        if cached is not None:
            return cached
        ds = self.dataset
        ts = UID(ds.file_meta.TransferSyntaxUID)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if ts == DeflatedExplicitVRLittleEndian:
                    # The path-based frame reader cannot inflate; read the whole (small) dataset instead.
                    arr = _pixel_array(pydicom.dcmread(self.path), index=self.frame)
                else:
                    arr = _pixel_array(str(self.path), index=self.frame)
        except (NotImplementedError, RuntimeError) as exc:
            raise AdapterError(
                f"{self.path.name}: cannot decode transfer syntax {ts.name} ({ts}): {_first_line(exc)}"
            ) from exc
        except (ValueError, EOFError, OSError, AttributeError, KeyError, TypeError, IndexError) as exc:
            raise AdapterError(f"{self.path.name}: corrupt or truncated pixel data ({_first_line(exc)})") from exc
        expect = (self.info.height, self.info.width)
        if arr.shape[:2] != expect:
            raise AdapterError(f"{self.path.name}: decoded frame is {arr.shape[:2]}, header says {expect}")
        if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        self._cache.put(ck, arr)
        return arr

    def _modality(self) -> np.ndarray:
        """``(C, H, W) float32`` modality values, no MONOCHROME1 inversion."""
        arr = self._stored()
        if arr.ndim == 3:
            return np.moveaxis(arr, -1, 0).astype(np.float32)
        return _modality_values(arr, self.dataset, self.frame)[None]

    def read(self, window: Window | None = None) -> np.ndarray:
        """``(C, h, w) float32``: C = 1 (grey, modality units: HU for CT) or 3 (RGB, 0-255 for 8-bit).

        MONOCHROME1 is inverted within the modality range so that higher always means brighter.
        The whole frame is decoded (DICOM frames are small) and then cut to ``window``.
        """
        vals = self._modality()
        if vals.shape[0] == 1 and str(self.dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            lo, hi = _modality_range(self.dataset, self.frame)
            vals = np.float32(lo + hi) - vals
        return _cut(vals, window, self.info, self.path.name)

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """``(H, W, 3) uint8``: VOI window from the header (or soft tissue for CT), MONOCHROME1 shown inverted."""
        vals = self._modality()
        if vals.shape[0] == 3:
            bits = _int_or_none(self.dataset.get("BitsStored")) or 8
            scale = 255.0 / float(2**bits - 1) if bits > 8 else 1.0
            rgb = np.clip(np.moveaxis(vals, 0, -1) * scale, 0, 255).astype(np.uint8)
        else:
            try:
                unit = _voi_unit(vals[0], self.dataset, self.info.modality)
            except (ValueError, KeyError, IndexError, TypeError):
                unit = _voi_unit(vals[0], Dataset(), self.info.modality)
            if str(self.dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                unit = 1.0 - unit
            grey = np.round(unit * 255.0).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=-1)
        return _to_display_size(rgb, max_size)


class _BrokenItem(Item):
    """A file in a series folder that cannot be read: it fails on its own, the rest of the series goes on."""

    def __init__(self, key: str, error: AdapterError) -> None:
        self.key = key
        self.group = None
        self.error = error
        self.info = ItemInfo(height=0, width=0, bands=0, dtype="float32", modality="OT", warnings=[str(error)])

    def read(self, window: Window | None = None) -> np.ndarray:
        raise self.error

    def preview(self, max_size: int = 1024) -> np.ndarray:
        raise self.error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(t.strip() for t in text[:3])[:300] if text else type(exc).__name__


def _cut(arr: np.ndarray, window: Window | None, info: ItemInfo, name: str) -> np.ndarray:
    if window is None:
        return arr
    c0, r0 = int(round(window.col_off)), int(round(window.row_off))
    w, h = int(round(window.width)), int(round(window.height))
    if c0 < 0 or r0 < 0 or w <= 0 or h <= 0 or c0 + w > info.width or r0 + h > info.height:
        raise AdapterError(f"{name}: window {window} is outside the {info.height} x {info.width} image")
    return np.ascontiguousarray(arr[:, r0 : r0 + h, c0 : c0 + w])


# --------------------------------------------------------------------------------------------------- source


@dataclass
class _Header:
    path: Path
    ds: Dataset


def _info(ds: Dataset, frame: int | None, warnings_: list[str]) -> ItemInfo:
    rows, cols = int(ds.Rows), int(ds.Columns)
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    bands = 3 if (_int_or_none(ds.get("SamplesPerPixel")) or 1) == 3 or pi == "PALETTE COLOR" else 1
    modality = str(ds.get("Modality") or "OT").upper()
    spacing = _pixel_spacing(ds)
    w = list(warnings_)
    if spacing is None:
        w.append("no PixelSpacing: areas are in pixels only")
    pos = _position(ds, frame)
    normal = _normal(_orientation(ds))
    extra: dict[str, Any] = {
        "file": Path(ds.filename).name if isinstance(getattr(ds, "filename", None), str) else None,
        "frame": frame,
        "instance_number": _int_or_none(ds.get("InstanceNumber")),
        "series_description": str(ds.get("SeriesDescription", "")) or None,
        "sop_instance_uid": _uid(ds, "SOPInstanceUID") or None,
        "series_instance_uid": _uid(ds, "SeriesInstanceUID") or None,
        "image_position": list(pos) if pos else None,
        "slice_position": float(np.dot(pos, normal)) if pos is not None and normal is not None else None,
        "spacing_between_slices": _spacing_tag(ds),
        "photometric_interpretation": pi or None,
        "transfer_syntax": UID(ds.file_meta.TransferSyntaxUID).name,
    }
    return ItemInfo(
        height=rows,
        width=cols,
        bands=bands,
        dtype="float32",
        modality=modality,
        pixel_area=spacing[0] * spacing[1] if spacing else None,
        area_unit="mm2" if spacing else None,
        warnings=w,
        extra=extra,
    )


def _spacing_tag(ds: Dataset) -> float | None:
    v = ds.get("SpacingBetweenSlices") or _shared_group(ds, "PixelMeasuresSequence", "SpacingBetweenSlices")
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _geometry_key(ds: Dataset) -> tuple[Any, ...]:
    o = _orientation(ds)
    sp = _pixel_spacing(ds)
    return (
        tuple(round(x, 4) for x in o) if o else None,
        int(ds.Rows),
        int(ds.Columns),
        tuple(round(x, 5) for x in sp) if sp else None,
    )


def _short_hash(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


class DicomSource(Source):
    """An opened DICOM file or folder. ``warnings`` lists files skipped while scanning a folder."""

    format = "dicom"

    def __init__(self, path: str, items: list[Item], warnings_: list[str]) -> None:
        self.path = path
        self._items = items
        self.warnings = warnings_

    def items(self) -> Iterator[Item]:
        return iter(self._items)


def _single_file_items(path: Path, ds: Dataset, cache: _FrameCache, key_prefix: str = "") -> list[DicomItem]:
    frames = _n_frames(ds)
    group = "file:" + (key_prefix.rstrip("/") or path.name) + ":" + _short_hash(str(path.resolve()))
    if frames == 1:
        return [DicomItem(key_prefix.rstrip("/"), group, _info(ds, None, []), path, None, ds, cache)]
    return [
        DicomItem(f"{key_prefix}frame-{i:04d}", group, _info(ds, i, []), path, i, ds, cache) for i in range(frames)
    ]


def _scan_folder(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            files.append(Path(dirpath) / fn)
            if len(files) > MAX_FOLDER_FILES:
                raise AdapterError(f"{root.name}: more than {MAX_FOLDER_FILES} files in the folder")
    return files


def looks_dicom(path: Path) -> bool:
    """True for files a series folder source takes (``.dcm`` or the DICM preamble); others in the folder
    are left to the other adapters."""
    return _looks_dicom(path)


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return _is_dicom_magic(f.read(132))
    except OSError:
        return False


def _open_folder(root: Path, max_pixels: int) -> DicomSource:
    cache = _FrameCache()
    warns: list[str] = []
    singles: list[_Header] = []
    items_multi: list[Item] = []
    broken: list[Item] = []
    skipped = 0
    for p in _scan_folder(root):
        rel = p.relative_to(root).as_posix()
        if p.name.upper() == "DICOMDIR" or not _looks_dicom(p):
            skipped += 1
            continue
        try:
            ds = _read_header(p)
        except AdapterError as exc:
            if p.suffix.lower() == ".dcm":
                broken.append(_BrokenItem(rel, exc))
            else:
                skipped += 1
            continue
        kind = _non_image_object(ds)
        if kind:
            warns.append(f"{rel}: skipped ({kind} object, not an image)")
            continue
        if "PixelData" not in ds and "Rows" not in ds:
            warns.append(f"{rel}: skipped (no pixel data: not an image object)")
            continue
        try:
            _check_image(ds, rel, max_pixels)
        except AdapterError as exc:
            broken.append(_BrokenItem(rel, exc))
            continue
        if _n_frames(ds) > 1:
            items_multi.extend(_single_file_items(p, ds, cache, key_prefix=rel + "/"))
        else:
            singles.append(_Header(p, ds))
    if skipped:
        warns.append(f"{skipped} non-DICOM file(s) ignored")
    series = _group_series(root, singles)
    items: list[Item] = []
    multi_series = len(series) > 1 or bool(items_multi)
    for gi, (gkey, members, gwarn) in enumerate(series):
        spacing = _series_spacing(members)
        for si, (h, pos) in enumerate(members):
            key = f"series-{gi:02d}/slice-{si:04d}" if multi_series else f"slice-{si:04d}"
            info = _info(h.ds, None, gwarn)
            info.extra["slice_position"] = pos
            if info.extra["spacing_between_slices"] is None:
                info.extra["spacing_between_slices"] = spacing
            info.extra["file"] = h.path.relative_to(root).as_posix()
            items.append(DicomItem(key, gkey, info, h.path, None, h.ds, cache))
    items.extend(items_multi)
    items.extend(broken)
    if not items:
        raise AdapterError(f"{root.name}: no DICOM images in the folder" + (f" ({'; '.join(warns)})" if warns else ""))
    if items and warns:
        items[0].info.warnings.extend(warns)
    return DicomSource(str(root), items, warns)


def _group_series(
    root: Path, headers: list[_Header]
) -> list[tuple[str, list[tuple[_Header, float | None]], list[str]]]:
    """Split single-frame headers into series and sort each along the slice normal.

    Group key: SeriesInstanceUID; when blank (de-identified data), folder + FrameOfReferenceUID. Within a
    key, differing geometry (orientation, matrix, spacing) splits further, since one SEG needs one grid.
    """
    buckets: dict[tuple[Any, ...], list[_Header]] = {}
    for h in headers:
        uid = _uid(h.ds, "SeriesInstanceUID")
        if uid:
            base: tuple[str, ...] = ("uid", uid)
        else:
            base = ("geo", h.path.parent.relative_to(root).as_posix(), _uid(h.ds, "FrameOfReferenceUID"))
        buckets.setdefault((base, _geometry_key(h.ds)), []).append(h)
    per_base: dict[Any, int] = {}
    for base, _ in buckets:
        per_base[base] = per_base.get(base, 0) + 1
    out = []
    for (base, geom), members in buckets.items():
        warn: list[str] = []
        if base[0] == "uid":
            key = f"series:{base[1]}"
            if per_base[base] > 1:
                key += f"#{_short_hash(geom)[:6]}"
        else:
            key = f"geometry:{_short_hash(base, geom)}"
            warn.append("SeriesInstanceUID is empty: series grouped by folder, frame of reference and geometry")
        out.append((key, _sort_slices(members), warn))

    def order(entry: tuple[str, list[tuple[_Header, float | None]], list[str]]) -> tuple[Any, ...]:
        first = entry[1][0][0]
        return (_int_or_none(first.ds.get("SeriesNumber")) or 0, str(first.path))

    return sorted(out, key=order)


def _sort_slices(members: list[_Header]) -> list[tuple[_Header, float | None]]:
    """Sort by ImagePositionPatient projected on the slice normal, else InstanceNumber, else file name."""
    normal = _normal(_orientation(members[0].ds))
    positions: list[float | None] = []
    for h in members:
        pos = _position(h.ds, None)
        positions.append(float(np.dot(pos, normal)) if pos is not None and normal is not None else None)
    if all(p is not None for p in positions):
        keyed = sorted(zip(members, positions, strict=True), key=lambda t: (t[1], str(t[0].path)))
        return list(keyed)
    keyed = sorted(
        zip(members, positions, strict=True),
        key=lambda t: (_int_or_none(t[0].ds.get("InstanceNumber")) or 0, str(t[0].path)),
    )
    return list(keyed)


def _series_spacing(members: list[tuple[_Header, float | None]]) -> float | None:
    pos = [p for _, p in members if p is not None]
    if len(pos) < 2 or len(pos) != len(members):
        return None
    d = np.diff(np.asarray(pos))
    return round(float(np.median(np.abs(d))), 6)


# ---------------------------------------------------------------------------------------------------- sinks


def _write_mask_png(classes: np.ndarray, colors: Sequence[tuple[int, int, int]], path: Path) -> None:
    img = Image.fromarray(classes.astype(np.uint8), mode="P")
    img.putpalette(palette_bytes(colors))
    img.save(path, optimize=False)


def _background_ids(class_names: Sequence[str]) -> set[int]:
    """Classes that are not segments: those named "background"; if none is, class 0."""
    named = {i for i, n in enumerate(class_names) if n.strip().lower() in ("background", "bg", "_background_")}
    return named or {0}


def _item_stem(item: Item) -> str:
    """The source file's stem, plus the item key for frames of multi-frame files (slice files of a series
    already have their own names)."""
    path = getattr(item, "path", None)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) if path else "image"
    if item.key and getattr(item, "frame", None) is not None:
        stem = f"{stem}_{re.sub(r'[^A-Za-z0-9._-]+', '_', item.key.rsplit('/', 1)[-1])}"
    return safe_stem(stem, "image")


class DicomMaskSink(MaskSink):
    """Collects one frame's class ids (frames are small) and writes a palette PNG mask and an overlay PNG.

    Mask PNG: ``(H, W)`` palette image of class ids, 255 where no block was written (nodata).
    """

    def __init__(
        self, item: DicomItem, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
    ) -> None:
        self.item = item
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        self.colors = list(colors)
        self.classes = np.full((item.info.height, item.info.width), NODATA, np.uint8)

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        c0, r0 = int(round(window.col_off)), int(round(window.row_off))
        h, w = classes.shape
        self.classes[r0 : r0 + h, c0 : c0 + w] = classes

    def close(self) -> list[Artifact]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = _item_stem(self.item)
        mask_path = self.out_dir / f"{stem}.mask.png"
        overlay_path = self.out_dir / f"{stem}.overlay.png"
        _write_mask_png(self.classes, self.colors, mask_path)
        base = self.item.preview(max_size=max(self.item.info.height, self.item.info.width))
        skip = _background_ids(self.class_names) | {NODATA}
        Image.fromarray(blend_overlay(base, self.classes, self.colors, skip=skip, alpha=_OVERLAY_ALPHA)).save(
            overlay_path)
        return [Artifact("mask_png", mask_path, "image/png"), Artifact("overlay", overlay_path, "image/png")]


# -------------------------------------------------------------------------------------------------- DICOM SEG


def _property_codes(name: str) -> tuple[Any, Any]:
    """(category, type) codes: SNOMED CT when the class name matches one (e.g. "liver"), else a local code."""
    camel = "".join(p[:1].upper() + p[1:].lower() for p in re.split(r"[\s_\-]+", name.strip()) if p)
    try:
        code = getattr(codes.SCT, camel)
        return codes.SCT.AnatomicalStructure, code
    except (AttributeError, KeyError):
        pass
    local = hd.sr.CodedConcept(value=_short_hash(name)[:8], scheme_designator="99TILESEG", meaning=name[:64] or "class")
    return codes.SCT.Tissue, local


def _segment_descriptions(
    ids: Sequence[int], class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> list[hd.seg.SegmentDescription]:
    algo = hd.AlgorithmIdentificationSequence(
        name="tileseg", family=codes.DCM.ArtificialIntelligence, version=_SOFTWARE.split()[-1]
    )
    out = []
    for number, cid in enumerate(ids, start=1):
        name = class_names[cid] if cid < len(class_names) else f"class {cid}"
        category, typ = _property_codes(name)
        color = colors[cid] if cid < len(colors) else (255, 0, 0)
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=typ,
                algorithm_type="AUTOMATIC",
                algorithm_identification=algo,
                display_color=hd.color.CIELabColor.from_rgb(*(float(x) for x in color)),
            )
        )
    return out


def _file_identity(ds: Dataset, path: Path) -> str:
    """Something that names a file on any machine, for deterministic generated UIDs."""
    media = _uid(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPInstanceUID")
    if media:
        return media
    return f"{path.name}:{os.path.getsize(path)}:{ds.get('InstanceNumber')}:{ds.get('ImagePositionPatient')}"


def _source_datasets(items: Sequence[DicomItem]) -> tuple[list[Dataset], list[str]]:
    """Header copies of the distinct source files of ``items`` (in item order), with blank UIDs filled.

    highdicom needs Study/Series/SOP Instance UIDs and SOPClassUID on its sources. De-identified data often
    blanks them, so we fill the *in-memory copies* (the input files are never changed) with UIDs derived
    deterministically from the files' identities: the same input gets the same UIDs on every run, and the
    SEG references exactly those. Returns the datasets and the warnings to record.
    """
    files: dict[str, DicomItem] = {}
    for it in items:
        files.setdefault(str(it.path), it)
    idents = [_file_identity(it.dataset, it.path) for it in files.values()]
    study_uid = generate_uid(entropy_srcs=["tileseg-study", *sorted(idents)])
    series_uid = generate_uid(entropy_srcs=["tileseg-series", *sorted(idents)])
    frame_uid = generate_uid(entropy_srcs=["tileseg-for", *sorted(idents)])
    out: list[Dataset] = []
    generated: set[str] = set()
    for it, ident in zip(files.values(), idents, strict=True):
        ds = copy.deepcopy(it.dataset)
        if "PixelData" in ds:
            del ds.PixelData  # highdicom only needs the header; avoids reading deferred pixel bytes
        if "FrameOfReferenceUID" not in ds and "PixelSpacing" in ds and "SliceThickness" not in ds:
            # No patient geometry: highdicom would write a Pixel Measures item without SliceThickness that
            # its own reader (and others) reject; the spacing means nothing without a frame of reference.
            del ds.PixelSpacing
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # blank (seen in real data) makes highdicom reject the source
        fill = {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": generate_uid(entropy_srcs=["tileseg-sop", ident]),
        }
        for keyword, value in fill.items():
            if not _uid(ds, keyword):
                setattr(ds, keyword, value)
                generated.add(keyword)
        if not _uid(ds, "SOPClassUID"):
            # Secondary Capture as a last resort when even the file meta has no class.
            ds.SOPClassUID = _uid(ds.file_meta, "MediaStorageSOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
            generated.add("SOPClassUID")
        if "FrameOfReferenceUID" in ds and not _uid(ds, "FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame_uid
            generated.add("FrameOfReferenceUID")
        out.append(ds)
    by_path = {path: ds for path, ds in zip(files, out, strict=True)}
    for it in items:
        # Lets callers find each item's frame in the SEG even when the UID had to be generated.
        it.info.extra["seg_source_sop_instance_uid"] = str(by_path[str(it.path)].SOPInstanceUID)
    warns = []
    if generated:
        warns.append(
            "source DICOM had blank " + ", ".join(sorted(generated)) + ": the DICOM SEG references generated UIDs"
        )
    return out, warns


def _write_seg(
    items: Sequence[DicomItem],
    frames: Sequence[np.ndarray],
    segment_ids: Sequence[int],
    class_names: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    out_path: Path,
    segmentation_type: str,
) -> list[str]:
    """Write a DICOM SEG. ``frames[i]`` belongs to ``items[i]``: ``(H, W)`` segment numbers (0 = none) or
    ``(H, W, S)`` bool (one plane per segment, may overlap; BINARY only). Returns warnings."""
    sources, warns = _source_datasets(items)
    name = items[0].path.name
    multi = items[0].frame is not None
    if multi:
        if len(sources) != 1:
            raise AdapterError(f"{name}: a group mixing multi-frame files cannot become one DICOM SEG")
        if "SharedFunctionalGroupsSequence" not in sources[0]:
            # highdicom only maps frames of enhanced (functional-group) multi-frame images.
            raise AdapterError(
                f"{name}: cannot write DICOM SEG for a legacy multi-frame image "
                f"({sources[0].get('Modality', 'OT')}, no functional groups); the PNG masks are still written"
            )
        n = _n_frames(sources[0])
        shape = (n, *frames[0].shape)
        pixels = np.zeros(shape, dtype=frames[0].dtype)
        for it, fr in zip(items, frames, strict=True):
            pixels[it.frame] = fr
    else:
        if len(sources) != len(items):
            raise AdapterError(f"{name}: the same slice appears twice in one group")
        pixels = np.stack(frames)
    if pixels.ndim == 3:
        pixels = pixels.astype(np.uint8 if len(segment_ids) < 256 else np.uint16)
    try:
        with warnings.catch_warnings():
            # highdicom warns about source quirks (one-component person names...), not about our output.
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=segmentation_type,
                segment_descriptions=_segment_descriptions(segment_ids, class_names, colors),
                series_instance_uid=generate_uid(),
                series_number=9001,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer="tileseg",
                manufacturer_model_name="tileseg",
                software_versions=_SOFTWARE,
                device_serial_number="0",
                series_description="tileseg segmentation",
                content_description=("source UIDs generated" if warns else "tileseg segmentation"),
                content_label="TILESEG",
                omit_empty_frames=True,
            )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(out_path)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types; the item must fail, not the process
        raise AdapterError(f"{name}: cannot write DICOM SEG: {_first_line(exc)}") from exc
    return warns


def _load_mask(path: Path, item: DicomItem) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except OSError as exc:
        raise AdapterError(f"{Path(path).name}: cannot read class mask ({exc})") from exc
    if arr.ndim != 2 or arr.shape != (item.info.height, item.info.width):
        raise AdapterError(
            f"{Path(path).name}: class mask is {arr.shape}, expected ({item.info.height}, {item.info.width})"
        )
    return arr


def _seg_stem(items: Sequence[DicomItem]) -> str:
    if len(items) == 1 and items[0].frame is None:
        return _item_stem(items[0])
    desc = str(items[0].dataset.get("SeriesDescription", "") or "series")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", desc).strip("_")[:40] or "series"
    return f"{slug}-{_short_hash(items[0].group)[:8]}"


# --------------------------------------------------------------------------------------------------- format


class DicomFormat(Format):
    """DICOM in (file, series folder, multi-frame file); PNG masks/overlays and DICOM SEG out.

    ``segmentation_type``: ``"BINARY"`` (default: what most viewers read) or ``"LABELMAP"`` for the SEGs
    written by :meth:`finalize_group` (instance SEGs are always BINARY, since instances may overlap).
    """

    name = "dicom"

    def __init__(self, segmentation_type: str = "BINARY") -> None:
        if segmentation_type not in ("BINARY", "LABELMAP"):
            raise ValueError("segmentation_type must be BINARY or LABELMAP")
        self.segmentation_type = segmentation_type

    def sniff(self, path: str, head: bytes) -> bool:
        """``DICM`` at offset 128, any ``.dcm`` (open() then rejects non-DICOM), or a folder of DICOM files."""
        if os.path.isdir(path):
            seen = 0
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for fn in sorted(filenames):
                    p = Path(dirpath) / fn
                    if fn.upper() != "DICOMDIR" and _looks_dicom(p):
                        return True
                    seen += 1
                    if seen >= _SNIFF_FILES:
                        return False
            return False
        return _is_dicom_magic(head) or path.lower().endswith(".dcm")

    def open(self, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomSource:
        """Open a DICOM file or series folder; headers only, pixels are decoded per item on read.

        Raises :class:`AdapterError` (not DICOM, no pixel data, undecodable transfer syntax, truncated) or
        :class:`InputTooLarge` (Rows * Columns * frames > ``max_pixels``). In a folder, a bad file becomes an
        item whose ``read`` raises, so the rest of the series is still processed.
        """
        p = Path(path)
        if p.is_dir():
            return _open_folder(p, max_pixels)
        if not p.is_file():
            raise AdapterError(f"{path}: no such file or folder")
        ds = _read_header(p)
        kind = _non_image_object(ds)
        if kind:
            # A SEG has frames of pixel data, but they are labels: segmenting them as CT would give nonsense.
            raise AdapterError(f"{p.name}: a DICOM {kind} object, not an image to segment")
        _check_image(ds, p.name, max_pixels)
        return DicomSource(str(p), list(_single_file_items(p, ds, _FrameCache())), [])

    def semantic_sink(
        self, item: Item, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
    ) -> DicomMaskSink:
        return DicomMaskSink(_dicom_item(item), out_dir, class_names, colors)

    def finalize_group(
        self,
        items: Sequence[Item],
        mask_files: Sequence[Path],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """One DICOM SEG for the group (a series, a multi-frame file, or a lone slice).

        Segments are numbered 1..N over the non-background classes in class-id order (every such class gets a
        segment, even if empty); nodata (255) counts as no segment. Frames with no segment are omitted. When
        the sources lack UIDs, in-memory header copies get generated ones (see :func:`_source_datasets`) and a
        warning is appended to each item's ``info.warnings``. Returns ``[]`` when no class is a segment.
        """
        if len(items) != len(mask_files):
            raise AdapterError("finalize_group: items and mask_files differ in length")
        if not items:
            return []
        ditems = [_dicom_item(it) for it in items]
        bg = _background_ids(class_names)
        seg_ids = [i for i in range(len(class_names)) if i not in bg]
        if not seg_ids:
            return []
        lut = np.zeros(256, np.uint16)
        for number, cid in enumerate(seg_ids, start=1):
            lut[cid] = number
        frames = []
        for it, mf in zip(ditems, mask_files, strict=True):
            m = _load_mask(Path(mf), it)
            bad = np.setdiff1d(np.unique(m), [*range(len(class_names)), NODATA])
            if bad.size:
                raise AdapterError(f"{Path(mf).name}: class ids {bad.tolist()} not in the model's classes")
            frames.append(lut[m])
        out_path = Path(out_dir) / f"{_seg_stem(ditems)}.seg.dcm"
        warns = _write_seg(ditems, frames, seg_ids, class_names, colors, out_path, self.segmentation_type)
        _record(ditems, warns)
        return [Artifact("dicom_seg", out_path, DICOM_MEDIA_TYPE)]

    def write_instances(
        self,
        item: Item,
        instances: Sequence[Any],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """A BINARY DICOM SEG with one segment per detected class (union of its instance masks) + overlay PNG.

        Segments are the non-background classes that have at least one instance, in class-id order. With no
        instances only the overlay is written.
        """
        from pycocotools import mask as mask_utils

        it = _dicom_item(item)
        h, w = it.info.height, it.info.width
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = _item_stem(it)
        base = it.preview(max_size=max(h, w)).astype(np.float32)
        bg = _background_ids(class_names)
        unions: dict[int, np.ndarray] = {}
        for inst in instances:
            rle = dict(inst.rle)
            if isinstance(rle.get("counts"), str):
                rle["counts"] = rle["counts"].encode()
            m = mask_utils.decode(rle).astype(bool)
            if m.shape != (h, w):
                raise AdapterError(f"{it.path.name}: instance mask is {m.shape}, item is ({h}, {w})")
            cid = int(inst.class_id)
            color = np.asarray(colors[cid] if cid < len(colors) else (255, 0, 0), np.float32)
            base[m] = (1 - _OVERLAY_ALPHA) * base[m] + _OVERLAY_ALPHA * color
            edge = m & ~_erode(m)
            base[edge] = color
            if cid not in bg:
                unions[cid] = unions.get(cid, np.zeros((h, w), bool)) | m
        overlay_path = out_dir / f"{stem}.instances.overlay.png"
        Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8)).save(overlay_path)
        arts = []
        if unions:
            seg_ids = sorted(unions)
            frame = np.stack([unions[c] for c in seg_ids], axis=-1)
            out_path = out_dir / f"{stem}.instances.seg.dcm"
            warns = _write_seg([it], [frame], seg_ids, class_names, colors, out_path, "BINARY")
            _record([it], warns)
            arts.append(Artifact("dicom_seg", out_path, DICOM_MEDIA_TYPE))
        arts.append(Artifact("overlay", overlay_path, "image/png"))
        return arts


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (for instance outlines) without scipy."""
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _record(items: Sequence[DicomItem], warns: list[str]) -> None:
    for msg in warns:
        log.warning("%s: %s", items[0].path.name, msg)
        for it in items:
            if msg not in it.info.warnings:
                it.info.warnings.append(msg)


def _dicom_item(item: Item) -> DicomItem:
    if not isinstance(item, DicomItem):
        raise AdapterError(f"item {getattr(item, 'key', '?')!r} is not a readable DICOM item")
    return item


@dataclass(frozen=True)
class SegLabels:
    """What a DICOM SEG says about one image: ``numbers`` ``(H, W) uint8`` segment numbers (0 = no segment),
    and ``labels`` ``{segment number: SegmentLabel}`` of all the SEG's segments."""

    numbers: np.ndarray
    labels: dict[int, str]


@functools.lru_cache(maxsize=2)
def _segread(path: str, mtime_ns: int, size: int) -> Any:
    """A parsed DICOM SEG, kept per process: every slice of a series reads the same SEG as its truth, and
    parsing a few hundred frames each time would cost more than segmenting the slice. ``mtime_ns`` and
    ``size`` make a rewritten file a new entry."""
    return hd.seg.segread(path)


def segmentation_labels(path: str | Path, target: ItemInfo) -> SegLabels | None:
    """The segments of the DICOM SEG at ``path`` on the image ``target`` (a slice or frame read by this
    adapter), found by the image's SOP Instance UID (and frame number, for multi-frame images), as ground
    truth; None when ``path`` is not a DICOM SEG. Raises :class:`AdapterError` when the SEG does not
    reference the image, or when highdicom cannot combine its segments into one label per pixel (overlaps
    between segments are not checked).

    A referenced image for which the SEG stores no frame has no segment on it (encoders omit empty frames).
    """
    path = Path(path)
    if not looks_dicom(path):
        return None
    ds = _read_header(path)
    if _non_image_object(ds) != "SEG":
        return None
    uid, frame = target.extra.get("sop_instance_uid"), target.extra.get("frame")
    name = path.name
    if not uid:
        raise AdapterError(f"{name}: a DICOM SEG scores DICOM images by their SOP Instance UID, and this image "
                           "has none (a de-identified or non-DICOM input); give the truth as a label image")
    try:
        st = path.stat()
        seg = _segread(str(path.resolve()), st.st_mtime_ns, st.st_size)
        labels = {n: str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
        referenced = {sop for _, _, sop in seg.get_source_image_uids()}
        if uid not in referenced:
            raise AdapterError(f"{name}: the SEG does not reference this image (SOP Instance UID {uid}); it "
                               f"segments {len(referenced)} other images")
        common = {"combine_segments": True, "ignore_spatial_locations": True, "skip_overlap_checks": True,
                  "assert_missing_frames_are_empty": True, "dtype": np.uint8}
        if frame is None:
            arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], **common)
        else:
            arr = seg.get_pixels_by_source_frame(source_sop_instance_uid=uid, source_frame_numbers=[frame + 1],
                                                 **common)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types for odd SEGs; name the file
        raise AdapterError(f"{name}: cannot read the DICOM SEG as labels ({type(exc).__name__}: {exc})") from exc
    numbers = np.asarray(arr)[0]
    if numbers.shape != (target.height, target.width):
        raise AdapterError(f"{name}: SEG frames are {numbers.shape[1]}x{numbers.shape[0]}, the image "
                           f"{target.width}x{target.height}")
    return SegLabels(numbers, labels)
